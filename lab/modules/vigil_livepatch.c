// SPDX-License-Identifier: GPL-2.0
/* Lab attack: a livepatch that replaces getppid's handler, the kernel's
 * sanctioned way to send a function elsewhere (klp's ftrace ops, handler
 * klp_ftrace_handler, moves the instruction pointer to this module's
 * function). No byte is written by the module. getppid then returns 4242. */
#include <linux/module.h>
#include <linux/livepatch.h>
#include <linux/ptrace.h>

static char *target = "__x64_sys_getppid";
module_param(target, charp, 0400);
MODULE_PARM_DESC(target, "function to replace, as /proc/kallsyms names it");

static long replacement(const struct pt_regs *regs)
{
	return 4242;
}

static struct klp_func funcs[] = {
	{ .new_func = replacement },
	{}
};

static struct klp_object objs[] = {
	{ .funcs = funcs }, /* no name: the kernel image */
	{}
};

static struct klp_patch patch = {
	.mod = THIS_MODULE,
	.objs = objs,
};

static int __init livepatch_init(void)
{
	int err;

	funcs[0].old_name = target;
	err = klp_enable_patch(&patch);
	pr_info("vigil-lab: livepatch of %s: %d\n", target, err);
	return err;
}

static void __exit livepatch_exit(void)
{
}
module_init(livepatch_init);
module_exit(livepatch_exit);
MODULE_LICENSE("GPL");
MODULE_INFO(livepatch, "Y");
