// SPDX-License-Identifier: GPL-2.0
/* Lab attack: point an IDT gate at this module, writing through the read-only
 * IDT alias that IDTR names, with CR0.WP briefly cleared. */
#include <linux/module.h>
#include <asm/desc.h>
#include "vigil_lab.h"

/* #OF: raised only by INTO, which is invalid in 64-bit mode, so never taken. */
#define LAB_VECTOR 4

static void fake_handler(void)
{
}

static int __init idt_init(void)
{
	struct desc_ptr idtr;
	gate_desc *gate;
	unsigned long addr = (unsigned long)fake_handler;

	store_idt(&idtr);
	gate = (gate_desc *)idtr.address + LAB_VECTOR;
	LAB_WITH_WP_CLEARED({
		gate->offset_low = (u16)addr;
		gate->offset_middle = (u16)(addr >> 16);
		gate->offset_high = (u32)(addr >> 32);
	});
	pr_info("vigil-lab: IDT vector %d redirected\n", LAB_VECTOR);
	return 0;
}
module_init(idt_init);
MODULE_LICENSE("GPL");
