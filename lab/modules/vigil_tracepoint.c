// SPDX-License-Identifier: GPL-2.0
/* Lab module: a probe on the sys_enter tracepoint, registered through the
 * kernel's API (tracepoint_probe_register), as monitoring agents and
 * rootkits that watch every system call do. It only counts: an observing
 * hook, which vigil lists with its owner. */
#include <linux/module.h>
#include <linux/tracepoint.h>
#include <linux/string.h>
#include <linux/atomic.h>

static struct tracepoint *sys_enter;
static atomic_long_t calls;

static void probe(void *data, struct pt_regs *regs, long id)
{
	atomic_long_inc(&calls);
}

static void find(struct tracepoint *tp, void *priv)
{
	if (strcmp(tp->name, "sys_enter") == 0)
		sys_enter = tp;
}

static int __init tp_init(void)
{
	int err;

	for_each_kernel_tracepoint(find, NULL);
	if (!sys_enter)
		return -ENOENT;
	err = tracepoint_probe_register(sys_enter, probe, NULL);
	pr_info("vigil-lab: sys_enter probe: %d\n", err);
	return err;
}

static void __exit tp_exit(void)
{
	tracepoint_probe_unregister(sys_enter, probe, NULL);
	tracepoint_synchronize_unregister();
}
module_init(tp_init);
module_exit(tp_exit);
MODULE_LICENSE("GPL");
