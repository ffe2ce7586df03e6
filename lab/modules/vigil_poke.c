// SPDX-License-Identifier: GPL-2.0
/* Lab attack: write arbitrary bytes at an address in kernel text, as a rootkit
 * that mimics the kernel's own patching does (a jmp at a jump-label site, a
 * call at a function entry, an int3 nobody registered). The test chooses the
 * place and the bytes; the module only writes them. */
#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/string.h>
#include "vigil_lab.h"

static unsigned long addr;
module_param(addr, ulong, 0400);
MODULE_PARM_DESC(addr, "where to write");
static char *bytes;
module_param(bytes, charp, 0400);
MODULE_PARM_DESC(bytes, "what to write, in hex (at most 16 bytes)");

static int __init poke_init(void)
{
	u8 buf[16];
	size_t n;

	if (!addr || !bytes)
		return -EINVAL;
	n = strlen(bytes);
	if (n == 0 || n % 2 || n / 2 > sizeof(buf) || hex2bin(buf, bytes, n / 2))
		return -EINVAL;
	LAB_WITH_WP_CLEARED(memcpy((void *)addr, buf, n / 2));
	pr_info("vigil-lab: poked %zu byte(s) at %px\n", n / 2, (void *)addr);
	return 0;
}

static void __exit poke_exit(void)
{
}

module_init(poke_init);
module_exit(poke_exit);
MODULE_LICENSE("GPL");
