// SPDX-License-Identifier: GPL-2.0
/* Lab workload: a harmless module with a static key of its own, loaded and
 * unloaded in a loop by the storm; its jump label is flipped while it loads. */
#include <linux/module.h>
#include <linux/jump_label.h>

static DEFINE_STATIC_KEY_FALSE(churn_key);
static unsigned long churn_count;

static noinline void churn_work(void)
{
	if (static_branch_unlikely(&churn_key))
		churn_count++;
}

static int __init churn_init(void)
{
	static_branch_enable(&churn_key);
	churn_work();
	return 0;
}

static void __exit churn_exit(void)
{
	static_branch_disable(&churn_key);
	churn_work();
}

module_init(churn_init);
module_exit(churn_exit);
MODULE_LICENSE("GPL");
