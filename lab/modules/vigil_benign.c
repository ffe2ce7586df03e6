// SPDX-License-Identifier: GPL-2.0
/* Lab control: a module that does nothing, loaded and unloaded to show that
 * module lifecycle alone is no violation. */
#include <linux/module.h>

static int __init benign_init(void)
{
	return 0;
}

static void __exit benign_exit(void)
{
}
module_init(benign_init);
module_exit(benign_exit);
MODULE_LICENSE("GPL");
