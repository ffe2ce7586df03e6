// SPDX-License-Identifier: GPL-2.0
/* Lab control: a module that does nothing, loaded and unloaded to show that
 * module lifecycle alone is no violation. Its one resident function is a
 * target for an inline hook in module text. */
#include <linux/module.h>

noinline int vigil_benign_work(int x)
{
	return x + 1;
}
EXPORT_SYMBOL_GPL(vigil_benign_work);

static int __init benign_init(void)
{
	return vigil_benign_work(0) == 1 ? 0 : -EINVAL;
}

static void __exit benign_exit(void)
{
}
module_init(benign_init);
module_exit(benign_exit);
MODULE_LICENSE("GPL");
