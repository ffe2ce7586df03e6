# vigil guest profile: one kernel build. Made by `vigil profile build`; see guest-profiles/README.md.
format vigil-guest-profile 1
release 6.1.0-56-cloud-amd64
banner Linux version 6.1.0-56-cloud-amd64 (debian-kernel@lists.debian.org) (gcc-12 (Debian 12.2.0-14+deb12u1) 12.2.0, GNU ld (GNU Binutils for Debian) 2.40) #1 SMP PREEMPT_DYNAMIC Debian 6.1.192-2 (2026-11-16)
source vmlinuz blake3 21d07e56c960248648d670c762609f985b072666baa5aa05553cd15ff0e38731
syscall64 0 __x64_sys_read
syscall64 1 __x64_sys_write
syscall64 2 __x64_sys_open
syscall64 3 __x64_sys_close
syscall64 4 __x64_sys_newstat
syscall64 5 __x64_sys_newfstat
syscall64 6 __x64_sys_newlstat
syscall64 7 __x64_sys_poll
syscall64 8 __x64_sys_lseek
syscall64 9 __x64_sys_mmap
syscall64 10 __x64_sys_mprotect
syscall64 11 __x64_sys_munmap
syscall64 12 __x64_sys_brk
syscall64 13 __x64_sys_rt_sigaction
syscall64 14 __x64_sys_rt_sigprocmask
offset module.list 8
offset module.name 24
offset module.state 0
offset module.core_layout.base 320
offset module.core_layout.size 328
offset module.core_layout.text_size 332
offset module.core_layout.ro_size 336
offset module.jump_entries 696
offset module.num_jump_entries 704
offset module.static_call_sites 792
offset module.num_static_call_sites 788
offset module.kallsyms 544
offset mod_kallsyms.symtab 0
offset mod_kallsyms.num_symtab 8
offset ftrace_page.next 0
table jump_table 5980 2dc5276e7f37d0e6a6e6a4289f1a58f440aa0390240446e14003819cd9479fa0
table static_call_sites 4276 ea8e5d40ef8c5f467c77f9b3610c0bf2e74b5183e9f188c5268321859ddab00b
fentry 1c10 1c50 1c90 1cd0 22a0 2460 2650 2680 26c0 2700 2720 2bc0 2c00 2c10 2c20 3320
fentry 45d0 4650 4710 4880 4aa0 4ac0 4bc0 4d00 4da0 4dd0 4e30 4ee0 4f20 5110 5160 5500
fentry 5540 5590 5600 7090 70e0 7100 7120 7140 7190 7220 7250 72d0 7300 7310 7320 73b0
fentry 7450 7550 7560 75f0 7640 7690 76c0 7810 7820 78b0 78c0 7970 7b10 7b80 7c80 7cc0
fentry 7cf0 7d60 7dc0 7e00 7e50 7f00 82a0 82f0 83b0 8420 8630 8740 8a60 8bf0 8e60 9030
fentry 9390 9480 94a0 9560 9590 95b0 9740 97a0 9a60 9b90 9cb0 9cf0 9fc0 9fd0 a0a0 a240
fentry a3b0 a3f0 a420 a580 a5b0 a6d0 a6f0 a7e0 a910 abf0 ac50 aca0 acb0 add0 af60 b1b0
fentry b1c0 b1e0 b250 b280 b2a0 b310 b5c0 b5e0 b610 b640 b670 b6a0 b6e0 b800 b820 b840
fentry b850 b8b0 b8c0 b950 b9c0 b9e0 ba20 bb40 bbd0 bcd0 bd50 bd60 bdb0 be20 be40 be90
fentry beb0 bee0 bf60 bff0 c130 c1f0 c2b0 c5c0 c930 ca40 cad0 cb60 cbc0 cbf0 cca0 cd30
fentry ce50 ce70 cec0 ced0 cef0 cf10 cf20 cf50 cf80 d120 d180 d1b0 d1e0 d220 d240 d2e0
fentry d4f0 d510 d660 d6b0 e2d0 e330 e3c0 e400 e540 e5d0 e5f0 e610 e700 e7b0 e7e0 e820
fentry e860 e8a0 e8d0 e910 e940 e970 e9a0 e9d0 ea00 ea30 ea60 ea90 eab0 ebc0 ecc0 ed10
fentry edb0 eed0 efc0 f040 f0a0 f100 f170 f190 f1b0 f1d0 f1f0 f280 f2b0 f380 f3e0 f4a0
fentry f4b0 f4c0 f540 f5b0 f620 f660 f6a0 f6b0 f6e0 f700 f720 f740 f760 f780 f7b0 f7f0
sym ffffffff81000000 T _stext
sym ffffffff81000000 T _text
sym ffffffff81000000 T startup_64
sym ffffffff81000070 T secondary_startup_64
sym ffffffff81000075 T secondary_startup_64_no_verify
sym ffffffff81000160 t verify_cpu
sym ffffffff81000260 T sev_verify_cbit
sym ffffffff810002c0 T start_cpu0
sym ffffffff810002cc T vc_boot_ghcb
sym ffffffff81000340 T __startup_64
sym ffffffff810007e0 T startup_64_setup_env
sym ffffffff81000850 t pvh_start_xen
sym ffffffff810008e0 t sev_es_terminate
sym ffffffff81000910 t early_set_pages_state
sym ffffffff810009e0 t snp_cpuid
