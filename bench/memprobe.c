/* memprobe: how many random cache lines per second can this machine fetch
 * in the shape the kernel fetches them?
 *
 * Why: the kernel stalls on loads of index slots and rows although they were
 * prefetched.  If the machine (a VM with nested paging here) could not fetch
 * more random lines than the kernel already does, no kernel change would
 * help.  This measures the ceiling: each "request" reads one random line in
 * each of K tables; "chained" requests find table k+1's line in table k's
 * (slot -> row -> fraud ring), prefetched in K stages D requests apart, as
 * decide_batch does.
 *
 *   gcc -O2 -o /tmp/memprobe bench/memprobe.c
 *   taskset -c 0 /tmp/memprobe MIB_PER_TABLE K CHAINED D HUGE
 *   taskset -c 0 /tmp/memprobe 256 5 1 12 1
 *
 * Prints requests/s and lines/s.  bench/RESULTS.md (session 5) has figures.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>

enum { TABLES_MAX = 8, LINE_WORDS = 8 };
static const long REQUESTS = 20000000;

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static uint64_t rng_state = 88172645463325252ULL;
static inline uint64_t xorshift(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: %s MIB_PER_TABLE K CHAINED(0|1) D HUGE(0|1)\n", argv[0]);
        return 2;
    }
    size_t bytes = (size_t)atol(argv[1]) << 20;
    int k_tables = atoi(argv[2]), chained = atoi(argv[3]), dist = atoi(argv[4]), huge = atoi(argv[5]);
    if (k_tables < 1 || k_tables > TABLES_MAX || dist < 1 || bytes < 4096) {
        fprintf(stderr, "K must be 1..%d, D >= 1, tables >= 4 KiB\n", TABLES_MAX);
        return 2;
    }
    size_t lines = bytes / 64;
    uint64_t *table[TABLES_MAX];
    for (int k = 0; k < k_tables; k++) {
        table[k] = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (table[k] == MAP_FAILED) {
            perror("mmap");
            return 1;
        }
        madvise(table[k], bytes, huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
        for (size_t i = 0; i < lines; i++)  /* every line names a random line: the chain */
            table[k][i * LINE_WORDS] = xorshift() % lines;
    }
    uint64_t *start = malloc(REQUESTS * sizeof(uint64_t));
    for (long i = 0; i < REQUESTS; i++)
        start[i] = xorshift() % lines;

    uint64_t sum = 0;
    double t0 = now_s();
    for (long i = 0; i < REQUESTS; i++) {
        if (chained) {
            /* Stage s prefetches table s's line of request i + D*(K-s); its
               index is read from the earlier tables, prefetched stages ago. */
            for (int s = 0; s < k_tables; s++) {
                long r = i + (long)dist * (k_tables - s);
                if (r >= REQUESTS)
                    continue;
                uint64_t j = start[r];
                for (int q = 0; q < s; q++)
                    j = table[q][j * LINE_WORDS];
                __builtin_prefetch(&table[s][j * LINE_WORDS]);
            }
            uint64_t j = start[i];
            for (int k = 0; k < k_tables; k++) {
                j = table[k][j * LINE_WORDS];
                sum += j;
            }
        } else {
            if (i + dist < REQUESTS)
                for (int k = 0; k < k_tables; k++)
                    __builtin_prefetch(&table[k][((start[i + dist] + (uint64_t)k * 7919) % lines) * LINE_WORDS]);
            for (int k = 0; k < k_tables; k++)
                sum += table[k][((start[i] + (uint64_t)k * 7919) % lines) * LINE_WORDS];
        }
    }
    double dt = now_s() - t0;
    printf("tables %d x %zu MiB, %s, prefetch %d ahead, huge pages %s: %.2f M requests/s, %.1f M lines/s (check %lu)\n",
           k_tables, bytes >> 20, chained ? "chained" : "independent", dist, huge ? "asked" : "off",
           REQUESTS / dt / 1e6, REQUESTS * k_tables / dt / 1e6, (unsigned long)sum);
    return 0;
}
