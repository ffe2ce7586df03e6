/* grind [PASSES]: a CPU- and memory-bound workload for the lab guest that
 * times itself. One process, no system calls while timed, the same work
 * every run: each pass streams through a 64 MiB buffer (read and write),
 * reads it at 1 Mi pseudo-random places (a cache and TLB miss each), and
 * mixes integers in registers. Prints the nanoseconds the passes took by
 * CLOCK_MONOTONIC, then a checksum so that no work can be left out.
 *
 * grind -f NONCE: the same work for ever, counting units of it (a 1024th
 * of a pass each) in a page of its own that starts with NONCE (a 64-bit
 * number) and its complement, then the count: a host reading guest memory
 * finds the page by those two words and times the work by its own clock.
 *
 * Built static by lab/setup.sh into the initramfs as /bin/grind. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define WORDS (64u << 20) / 8
#define UNITS 1024u /* a pass's units of work */
static uint64_t buf[WORDS];

static volatile struct {
    uint64_t nonce, not_nonce, units;
} progress __attribute__((aligned(4096)));

static uint64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

/* One unit of work: a 1024th of the stream, of the random reads and of
 * the mixing. */
static uint64_t unit(uint64_t sum, uint64_t *x, uint32_t u)
{
    uint32_t from = u * (WORDS / UNITS);
    for (uint32_t i = from; i < from + WORDS / UNITS; i++) {
        sum += buf[i];
        buf[i] = sum ^ i;
    }
    for (uint32_t i = 0; i < (1u << 20) / UNITS; i++) {
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        sum += buf[*x % WORDS];
    }
    for (uint32_t i = 0; i < (1u << 24) / UNITS; i++)
        sum = (sum ^ (sum >> 31)) * 0x9e3779b97f4a7c15u + i;
    return sum;
}

int main(int argc, char **argv)
{
    if (argc == 3 && argv[1][0] == '-' && argv[1][1] == 'f' && !argv[1][2]) {
        char *end;
        uint64_t nonce = strtoull(argv[2], &end, 0);
        if (*end || !nonce) {
            fprintf(stderr, "grind: -f needs a nonzero number, not %s\n", argv[2]);
            return 2;
        }
        for (uint32_t i = 0; i < WORDS; i++)
            buf[i] = i;
        progress.units = 0;
        progress.not_nonce = ~nonce;
        progress.nonce = nonce;
        uint64_t sum = 0, x = 88172645463325252u;
        for (uint64_t u = 0;; u++) {
            sum = unit(sum, &x, (uint32_t)(u % UNITS));
            progress.units = u + 1;
            if (sum == 42) /* never, but the work must count */
                printf("%llx\n", (unsigned long long)sum);
        }
    }
    long passes = argc > 1 ? strtol(argv[1], NULL, 10) : 4;
    if (passes < 1 || passes > 1000) {
        fprintf(stderr, "grind: PASSES must be 1 to 1000\n");
        return 2;
    }
    for (uint32_t i = 0; i < WORDS; i++) /* fault the pages in, untimed */
        buf[i] = i;

    uint64_t sum = 0, x = 88172645463325252u;
    uint64_t start = now_ns();
    for (long p = 0; p < passes; p++)
        for (uint32_t u = 0; u < UNITS; u++)
            sum = unit(sum, &x, u);
    uint64_t took = now_ns() - start;
    printf("%llu %llx\n", (unsigned long long)took, (unsigned long long)sum);
    return 0;
}
