// SPDX-License-Identifier: GPL-2.0
/* Lab control: a benign hooking module, as security and observability
 * agents are. It registers a kprobe and an ftrace callback through the
 * kernel's own APIs, and both only count calls: nothing is redirected. The
 * kernel patches its own text for them (an int3 or a jump for the kprobe,
 * a call at the function's ftrace site), which is no violation.
 *
 *   kprobe on `kprobe_target` (default __x64_sys_getpid)
 *   ftrace on `ftrace_target` (default __x64_sys_getppid)
 *
 * The counts are in /sys/module/vigil_count/parameters/. */
#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/kprobes.h>
#include <linux/ftrace.h>
#include <linux/atomic.h>
#include <linux/string.h>

static char *kprobe_target = "__x64_sys_getpid";
module_param(kprobe_target, charp, 0400);
static char *ftrace_target = "__x64_sys_getppid";
module_param(ftrace_target, charp, 0400);
static unsigned long kprobe_hits;
module_param(kprobe_hits, ulong, 0444);
static unsigned long ftrace_hits;
module_param(ftrace_hits, ulong, 0444);

static int count_pre(struct kprobe *p, struct pt_regs *regs)
{
	WRITE_ONCE(kprobe_hits, READ_ONCE(kprobe_hits) + 1);
	return 0;
}

static struct kprobe kp = { .pre_handler = count_pre };

static void notrace count_call(unsigned long ip, unsigned long parent_ip,
			       struct ftrace_ops *op, struct ftrace_regs *fregs)
{
	WRITE_ONCE(ftrace_hits, READ_ONCE(ftrace_hits) + 1);
}

static struct ftrace_ops ops = { .func = count_call };

static int __init count_init(void)
{
	int err;

	kp.symbol_name = kprobe_target;
	err = register_kprobe(&kp);
	if (err) {
		pr_info("vigil_count: kprobe on %s: %d\n", kprobe_target, err);
		return err;
	}
	err = ftrace_set_filter(&ops, ftrace_target, strlen(ftrace_target), 1);
	if (!err)
		err = register_ftrace_function(&ops);
	if (err) {
		pr_info("vigil_count: ftrace on %s: %d\n", ftrace_target, err);
		unregister_kprobe(&kp);
		return err;
	}
	return 0;
}

static void __exit count_exit(void)
{
	unregister_ftrace_function(&ops);
	unregister_kprobe(&kp);
}
module_init(count_init);
module_exit(count_exit);
MODULE_LICENSE("GPL");
