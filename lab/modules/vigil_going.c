// SPDX-License-Identifier: GPL-2.0
/* Lab attack: a module that hides its own text from checks by writing its
 * module state. `after` seconds after loading it says it is unloading (or,
 * built as vigil_coming, loading) and rewrites the first byte of one of its
 * functions; with `back` set it says it is live again `back` seconds later,
 * as though nothing had happened. */
#include <linux/module.h>
#include <linux/workqueue.h>
#include "vigil_lab.h"

#ifndef VIGIL_CLAIMED_STATE
#define VIGIL_CLAIMED_STATE MODULE_STATE_GOING
#endif

static unsigned int after = 3;
module_param(after, uint, 0400);
MODULE_PARM_DESC(after, "seconds after loading until it claims to unload");
static unsigned int back;
module_param(back, uint, 0400);
MODULE_PARM_DESC(back, "seconds after that until it claims to be live again (0: never)");

static noinline int going_work(int x)
{
	return 3 * x + 1;
}

static bool went;
static void flip(struct work_struct *work);
static DECLARE_DELAYED_WORK(flip_work, flip);

static void flip(struct work_struct *work)
{
	u8 *text = (u8 *)going_work;

	if (went) {
		THIS_MODULE->state = MODULE_STATE_LIVE;
		pr_info("vigil-lab: %s live again\n", THIS_MODULE->name);
		return;
	}
	went = true;
	THIS_MODULE->state = VIGIL_CLAIMED_STATE;
	LAB_WITH_WP_CLEARED(WRITE_ONCE(*text, *text ^ 0xff));
	pr_info("vigil-lab: %s claims state %d, text at %px rewritten\n", THIS_MODULE->name,
		VIGIL_CLAIMED_STATE, text);
	if (back)
		schedule_delayed_work(&flip_work, back * HZ);
}

/* No exit function: it cannot be unloaded, and its work stays valid. */
static int __init going_init(void)
{
	if (going_work(1) != 4)
		return -EINVAL;
	schedule_delayed_work(&flip_work, after * HZ);
	return 0;
}
module_init(going_init);
MODULE_LICENSE("GPL");
