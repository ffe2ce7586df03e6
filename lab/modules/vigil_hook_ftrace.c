// SPDX-License-Identifier: GPL-2.0
/* Lab attack: hook a syscall handler through the kernel's own API, as
 * current rootkits do: an ftrace ops with IPMODIFY and SAVE_REGS whose
 * callback moves the instruction pointer to this module's replacement. No
 * byte of text is written by the module; ftrace patches the function entry.
 * The handler then returns 4242 (getppid: $PPID reads 4242). With plain=1
 * the ops asks for neither (no flag says it redirects), and still does. */
#include <linux/module.h>
#include <linux/ftrace.h>
#include <linux/ptrace.h>
#include <linux/string.h>
#include <linux/version.h>

static char *target = "__x64_sys_getppid";
module_param(target, charp, 0400);
MODULE_PARM_DESC(target, "function to hook, as available_filter_functions names it");

static long replacement(const struct pt_regs *regs)
{
	return 4242;
}

static void notrace redirect(unsigned long ip, unsigned long parent_ip,
			     struct ftrace_ops *op, struct ftrace_regs *fregs)
{
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 6, 0)
	ftrace_regs_set_instruction_pointer(fregs, (unsigned long)replacement);
#else
	ftrace_instruction_pointer_set(fregs, (unsigned long)replacement);
#endif
}

static bool plain;
module_param(plain, bool, 0400);
MODULE_PARM_DESC(plain, "register without SAVE_REGS and IPMODIFY: on x86-64 ftrace's caller "
			"still takes the instruction pointer the callback sets");

static struct ftrace_ops ops = {
	.func = redirect,
	.flags = FTRACE_OPS_FL_SAVE_REGS | FTRACE_OPS_FL_IPMODIFY | FTRACE_OPS_FL_RECURSION,
};

static int __init hook_init(void)
{
	int err;

	if (plain)
		ops.flags = FTRACE_OPS_FL_RECURSION;
	err = ftrace_set_filter(&ops, target, strlen(target), 1);

	if (!err)
		err = register_ftrace_function(&ops);
	pr_info("vigil-lab: ftrace hook of %s: %d\n", target, err);
	return err;
}

static void __exit hook_exit(void)
{
	unregister_ftrace_function(&ops);
}
module_init(hook_init);
module_exit(hook_exit);
MODULE_LICENSE("GPL");
