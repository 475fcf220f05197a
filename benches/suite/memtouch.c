/* memtouch: the memory-bound workloads of the benchmark suite.
 *
 *   memtouch scan MIB PASSES   sequential read passes over a heap of MIB MiB
 *   memtouch rand MIB OPS      OPS random 4 KiB read-modify-writes (one word
 *                              read, one written per touched page)
 *
 * The heap comes from malloc (so it is managed under libdmem.so) and is
 * filled before the timed phase. Prints seconds= (timed phase only), rate=
 * (GB/s for scan, operations/s for rand) and digest= (a checksum of the
 * whole heap afterwards: every contender must print the same one). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static uint64_t rng = 0x9E3779B97F4A7C15ull;
static uint64_t next(void) {
    rng ^= rng >> 12;
    rng ^= rng << 25;
    rng ^= rng >> 27;
    return rng * 0x2545F4914F6CDD1Dull;
}

int main(int argc, char **argv) {
    if (argc != 4 || (strcmp(argv[1], "scan") && strcmp(argv[1], "rand"))) {
        fprintf(stderr, "usage: memtouch scan MIB PASSES | memtouch rand MIB OPS\n");
        return 2;
    }
    size_t bytes = strtoull(argv[2], NULL, 10) << 20;
    uint64_t count = strtoull(argv[3], NULL, 10);
    size_t words = bytes / 8, pages = bytes / 4096;
    uint64_t *h = malloc(bytes);
    if (!h) {
        perror("malloc");
        return 1;
    }
    for (size_t i = 0; i < words; i++)
        h[i] = i * 0x100000001b3ull;
    double t0 = now(), rate;
    uint64_t acc = 0;
    if (!strcmp(argv[1], "scan")) {
        for (uint64_t p = 0; p < count; p++)
            for (size_t i = 0; i < words; i++)
                acc += h[i];
        double s = now() - t0;
        rate = (double)bytes * count / s / 1e9;
    } else {
        for (uint64_t k = 0; k < count; k++) {
            size_t pg = next() % pages;
            uint64_t *w = h + pg * 512 + (next() % 512);
            acc += *w;
            *w = acc ^ k;
        }
        double s = now() - t0;
        rate = count / s;
    }
    double seconds = now() - t0;
    uint64_t digest = acc;
    for (size_t i = 0; i < words; i++)
        digest = ((digest ^ h[i]) * 0x100000001b3ull) ^ (digest >> 29);
    printf("seconds=%.6f\nrate=%.6f\ndigest=%016llx\n", seconds, rate, (unsigned long long)digest);
    free(h);
    return 0;
}
