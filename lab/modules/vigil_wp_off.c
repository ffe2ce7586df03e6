// SPDX-License-Identifier: GPL-2.0
/* Lab attack: leave CR0.WP cleared, so the kernel can write read-only pages. */
#include <linux/module.h>
#include "vigil_lab.h"

static int __init wp_init(void)
{
	lab_write_cr0(lab_read_cr0() & ~X86_CR0_WP);
	pr_info("vigil-lab: CR0.WP left cleared\n");
	return 0;
}
module_init(wp_init);
MODULE_LICENSE("GPL");
