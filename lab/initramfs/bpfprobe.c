/* bpfprobe FUNCTION: attaches a BPF program to a kprobe on FUNCTION, as
 * observability tools do (a perf kprobe event, PERF_EVENT_IOC_SET_BPF),
 * and keeps it attached until killed. The program only returns 0. Prints
 * "bpfprobe: attached" once in place.
 *
 * Built static by lab/setup.sh into the initramfs as /bin/bpfprobe; raw
 * system calls, no libbpf. */
#include <linux/bpf.h>
#include <linux/perf_event.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

static int fail(const char *what)
{
    perror(what);
    return 1;
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: bpfprobe FUNCTION\n");
        return 2;
    }
    /* r0 = 0; exit */
    struct bpf_insn prog[2] = {
        { .code = BPF_ALU64 | BPF_MOV | BPF_K, .dst_reg = BPF_REG_0, .imm = 0 },
        { .code = BPF_JMP | BPF_EXIT },
    };
    static char log[4096];
    union bpf_attr attr;
    memset(&attr, 0, sizeof(attr));
    attr.prog_type = BPF_PROG_TYPE_KPROBE;
    attr.insns = (uint64_t)(uintptr_t)prog;
    attr.insn_cnt = 2;
    attr.license = (uint64_t)(uintptr_t)"GPL";
    attr.log_buf = (uint64_t)(uintptr_t)log;
    attr.log_size = sizeof(log);
    attr.log_level = 1;
    strncpy(attr.prog_name, "vigil_lab", sizeof(attr.prog_name) - 1);
    int prog_fd = syscall(SYS_bpf, BPF_PROG_LOAD, &attr, sizeof(attr));
    if (prog_fd < 0) {
        fprintf(stderr, "%s", log);
        return fail("bpf(BPF_PROG_LOAD)");
    }
    FILE *f = fopen("/sys/bus/event_source/devices/kprobe/type", "r");
    int type;
    if (!f || fscanf(f, "%d", &type) != 1)
        return fail("/sys/bus/event_source/devices/kprobe/type");
    fclose(f);
    struct perf_event_attr pe;
    memset(&pe, 0, sizeof(pe));
    pe.size = sizeof(pe);
    pe.type = type;
    pe.config1 = (uint64_t)(uintptr_t)argv[1]; /* kprobe_func */
    pe.config2 = 0;                            /* probe_offset */
    pe.sample_period = 1;
    pe.wakeup_events = 1;
    int fd = syscall(SYS_perf_event_open, &pe, -1, 0, -1, PERF_FLAG_FD_CLOEXEC);
    if (fd < 0)
        return fail("perf_event_open(kprobe)");
    if (ioctl(fd, PERF_EVENT_IOC_SET_BPF, prog_fd) < 0)
        return fail("PERF_EVENT_IOC_SET_BPF");
    if (ioctl(fd, PERF_EVENT_IOC_ENABLE, 0) < 0)
        return fail("PERF_EVENT_IOC_ENABLE");
    printf("bpfprobe: attached to %s\n", argv[1]);
    fflush(stdout);
    for (;;)
        pause();
}
