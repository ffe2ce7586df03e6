// SPDX-License-Identifier: GPL-2.0
/* Lab attack: overwrite the first bytes of a kernel function with a jmp rel32
 * into this module, as an inline hook does. */
#include <linux/module.h>
#include <linux/ptrace.h>
#include "vigil_lab.h"

static unsigned long target;
module_param(target, ulong, 0400);
MODULE_PARM_DESC(target, "address of the function to hook, from /proc/kallsyms");

static long replacement(const struct pt_regs *regs)
{
	return 4343;
}

static int __init hook_init(void)
{
	u8 patch[5];
	s64 rel;

	if (!target)
		return -EINVAL;
	rel = (s64)(unsigned long)replacement - (s64)(target + sizeof(patch));
	if (rel != (s32)rel)
		return -ERANGE;
	patch[0] = 0xe9;
	memcpy(&patch[1], &(s32){ (s32)rel }, 4);
	LAB_WITH_WP_CLEARED(memcpy((void *)target, patch, sizeof(patch)));
	pr_info("vigil-lab: inline hook at %px\n", (void *)target);
	return 0;
}
module_init(hook_init);
MODULE_LICENSE("GPL");
