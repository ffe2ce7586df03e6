// SPDX-License-Identifier: GPL-2.0
/* Lab attack: a kprobe whose pre-handler redirects the probed function to
 * this module's replacement (it sets regs->ip and returns 1, so the kernel
 * resumes there). Registered through register_kprobe: the kernel patches
 * its own text. The handler then returns 4242. */
#include <linux/module.h>
#include <linux/kprobes.h>
#include <linux/ptrace.h>

static char *target = "__x64_sys_getppid";
module_param(target, charp, 0400);
MODULE_PARM_DESC(target, "function to hook");

static long replacement(const struct pt_regs *regs)
{
	return 4242;
}

static int redirect(struct kprobe *p, struct pt_regs *regs)
{
	regs->ip = (unsigned long)replacement;
	return 1;
}

static struct kprobe kp = { .pre_handler = redirect };

static int __init hook_init(void)
{
	int err;

	kp.symbol_name = target;
	err = register_kprobe(&kp);
	pr_info("vigil-lab: kprobe hook of %s: %d\n", target, err);
	return err;
}

static void __exit hook_exit(void)
{
	unregister_kprobe(&kp);
}
module_init(hook_init);
module_exit(hook_exit);
MODULE_LICENSE("GPL");
