/* bpfprobe [--fentry | --fmod-ret] FUNCTION: attaches a BPF program to
 * FUNCTION and keeps it attached until killed. Prints "bpfprobe: attached"
 * once in place.
 *
 *   (default)   a perf kprobe event with the program on it
 *               (PERF_EVENT_IOC_SET_BPF), as observability tools do; the
 *               program returns 0.
 *   --fentry    a BPF trampoline called at FUNCTION's entry (BPF_TRACE_FENTRY,
 *               an ftrace direct call); the program returns 0.
 *   --fmod-ret  a BPF trampoline that runs the program before FUNCTION and
 *               returns what it returns, skipping FUNCTION, when non-zero
 *               (BPF_MODIFY_RETURN). The program returns 4242: a syscall
 *               hooked by BPF, as BPF rootkits do.
 *
 * FUNCTION's BTF id is looked up in /sys/kernel/btf/vmlinux.
 * Built static by lab/setup.sh into the initramfs as /bin/bpfprobe; raw
 * system calls, no libbpf. */
#include <linux/bpf.h>
#include <linux/btf.h>
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

/* The id of the BTF FUNC named NAME in the kernel's BTF, or -1. */
static int btf_func_id(const char *name)
{
    FILE *f = fopen("/sys/kernel/btf/vmlinux", "rb");
    if (!f)
        return -1;
    static unsigned char buf[16 << 20];
    size_t len = fread(buf, 1, sizeof(buf), f);
    fclose(f);
    struct btf_header h;
    if (len < sizeof(h))
        return -1;
    memcpy(&h, buf, sizeof(h));
    if (h.magic != BTF_MAGIC || (size_t)h.hdr_len + h.str_off + h.str_len > len)
        return -1;
    const unsigned char *types = buf + h.hdr_len + h.type_off;
    const char *strs = (const char *)buf + h.hdr_len + h.str_off;
    uint32_t at = 0, id = 1;
    while (at + sizeof(struct btf_type) <= h.type_len) {
        struct btf_type t;
        memcpy(&t, types + at, sizeof(t));
        uint32_t kind = BTF_INFO_KIND(t.info), vlen = BTF_INFO_VLEN(t.info);
        if (kind == BTF_KIND_FUNC && t.name_off < h.str_len &&
            strcmp(strs + t.name_off, name) == 0)
            return (int)id;
        at += sizeof(t);
        switch (kind) {
        case BTF_KIND_INT: case BTF_KIND_VAR: case BTF_KIND_DECL_TAG: at += 4; break;
        case BTF_KIND_ARRAY: at += 12; break;
        case BTF_KIND_STRUCT: case BTF_KIND_UNION: case BTF_KIND_DATASEC: at += 12 * vlen; break;
        case BTF_KIND_ENUM: case BTF_KIND_FUNC_PROTO: at += 8 * vlen; break;
        case 19 /* BTF_KIND_ENUM64 */: at += 12 * vlen; break;
        default: break;
        }
        id++;
    }
    return -1;
}

static int load(int type, int attach, int btf_id, int ret)
{
    /* r0 = ret; exit */
    struct bpf_insn prog[2] = {
        { .code = BPF_ALU64 | BPF_MOV | BPF_K, .dst_reg = BPF_REG_0, .imm = ret },
        { .code = BPF_JMP | BPF_EXIT },
    };
    static char log[4096];
    union bpf_attr attr;
    memset(&attr, 0, sizeof(attr));
    attr.prog_type = type;
    attr.expected_attach_type = attach;
    attr.attach_btf_id = btf_id;
    attr.insns = (uint64_t)(uintptr_t)prog;
    attr.insn_cnt = 2;
    attr.license = (uint64_t)(uintptr_t)"GPL";
    attr.log_buf = (uint64_t)(uintptr_t)log;
    attr.log_size = sizeof(log);
    attr.log_level = 1;
    strncpy(attr.prog_name, "vigil_lab", sizeof(attr.prog_name) - 1);
    int fd = syscall(SYS_bpf, BPF_PROG_LOAD, &attr, sizeof(attr));
    if (fd < 0)
        fprintf(stderr, "%s", log);
    return fd;
}

static int kprobe(const char *func)
{
    int prog_fd = load(BPF_PROG_TYPE_KPROBE, 0, 0, 0);
    if (prog_fd < 0)
        return fail("bpf(BPF_PROG_LOAD)");
    FILE *f = fopen("/sys/bus/event_source/devices/kprobe/type", "r");
    int type;
    if (!f || fscanf(f, "%d", &type) != 1)
        return fail("/sys/bus/event_source/devices/kprobe/type");
    fclose(f);
    struct perf_event_attr pe;
    memset(&pe, 0, sizeof(pe));
    pe.size = sizeof(pe);
    pe.type = type;
    pe.config1 = (uint64_t)(uintptr_t)func; /* kprobe_func */
    pe.config2 = 0;                         /* probe_offset */
    pe.sample_period = 1;
    pe.wakeup_events = 1;
    int fd = syscall(SYS_perf_event_open, &pe, -1, 0, -1, PERF_FLAG_FD_CLOEXEC);
    if (fd < 0)
        return fail("perf_event_open(kprobe)");
    if (ioctl(fd, PERF_EVENT_IOC_SET_BPF, prog_fd) < 0)
        return fail("PERF_EVENT_IOC_SET_BPF");
    if (ioctl(fd, PERF_EVENT_IOC_ENABLE, 0) < 0)
        return fail("PERF_EVENT_IOC_ENABLE");
    return 0;
}

static int trampoline(const char *func, int attach, int ret)
{
    int id = btf_func_id(func);
    if (id < 0) {
        fprintf(stderr, "bpfprobe: no BTF function %s in /sys/kernel/btf/vmlinux\n", func);
        return 1;
    }
    int prog_fd = load(BPF_PROG_TYPE_TRACING, attach, id, ret);
    if (prog_fd < 0)
        return fail("bpf(BPF_PROG_LOAD)");
    union bpf_attr attr;
    memset(&attr, 0, sizeof(attr));
    attr.raw_tracepoint.prog_fd = prog_fd;
    if (syscall(SYS_bpf, BPF_RAW_TRACEPOINT_OPEN, &attr, sizeof(attr)) < 0)
        return fail("bpf(BPF_RAW_TRACEPOINT_OPEN)");
    return 0;
}

int main(int argc, char **argv)
{
    const char *mode = argc == 3 ? argv[1] : "";
    const char *func = argv[argc - 1];
    int rc;
    if (argc == 2)
        rc = kprobe(func);
    else if (argc == 3 && strcmp(mode, "--fentry") == 0)
        rc = trampoline(func, BPF_TRACE_FENTRY, 0);
    else if (argc == 3 && strcmp(mode, "--fmod-ret") == 0)
        rc = trampoline(func, BPF_MODIFY_RETURN, 4242);
    else {
        fprintf(stderr, "usage: bpfprobe [--fentry | --fmod-ret] FUNCTION\n");
        return 2;
    }
    if (rc)
        return rc;
    printf("bpfprobe: attached to %s%s%s\n", func, *mode ? " by " : "", mode);
    fflush(stdout);
    for (;;)
        pause();
}
