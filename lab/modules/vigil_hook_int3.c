// SPDX-License-Identifier: GPL-2.0
/* Lab attack: an int3 left over the first byte of a function's ftrace entry
 * (the NOP's tail stays, as in the middle of the kernel's own rewrite), and
 * a die notifier that catches the trap no kprobe claims and resumes at this
 * module's replacement, which returns 4242 to the function's caller. */
#include <linux/module.h>
#include <linux/kdebug.h>
#include <linux/notifier.h>
#include <linux/ptrace.h>
#include <linux/string.h>
#include "vigil_lab.h"

static unsigned long target;
module_param(target, ulong, 0400);
MODULE_PARM_DESC(target, "address of the function to hook, from /proc/kallsyms");
static unsigned long site;

static long replacement(const struct pt_regs *regs)
{
	return 4242;
}

static int trapped(struct notifier_block *nb, unsigned long val, void *data)
{
	struct die_args *args = data;

	if (val != DIE_INT3 || args->regs->ip != site + 1)
		return NOTIFY_DONE;
	args->regs->ip = (unsigned long)replacement;
	return NOTIFY_STOP;
}

static struct notifier_block nb = { .notifier_call = trapped, .priority = INT_MAX };

static int __init hook_init(void)
{
	static const u8 endbr[4] = { 0xf3, 0x0f, 0x1e, 0xfa };
	static const u8 nop5[5] = { 0x0f, 0x1f, 0x44, 0x00, 0x00 };
	int err;

	if (!target)
		return -EINVAL;
	site = target;
	if (!memcmp((void *)site, endbr, sizeof(endbr)))
		site += sizeof(endbr);
	if (memcmp((void *)site, nop5, sizeof(nop5)))
		return -ENOEXEC;
	err = register_die_notifier(&nb);
	if (err)
		return err;
	LAB_WITH_WP_CLEARED(*(volatile u8 *)site = 0xcc);
	pr_info("vigil-lab: int3 at %px, die notifier\n", (void *)site);
	return 0;
}
module_init(hook_init);
MODULE_LICENSE("GPL");
