/* A library whose atfork child handler reads a program's heap, registered
 * from its constructor: before libdmem.so's own (the library is a
 * dependency of the program, so it is initialised before the preload).
 * Built twice: with -DEARLY_LIB as libatfork_early.so, and without as the
 * program, linked against it. The child handler runs before any code of
 * the child's own; the program checks what it read there against the
 * parent's view. Usage: atfork_early MIB (heap pushed through). */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

uint64_t sum_of(const uint64_t *b, size_t n);
extern const uint64_t *volatile early_buf;
extern volatile size_t early_words;
extern volatile uint64_t early_sum;

#ifdef EARLY_LIB
const uint64_t *volatile early_buf;
volatile size_t early_words;
volatile uint64_t early_sum;

uint64_t sum_of(const uint64_t *b, size_t n) {
    uint64_t s = 0;
    for (size_t i = 0; i < n; i++) s = s * 31 + b[i];
    return s;
}
static void child_reads_heap(void) {
    if (early_buf) early_sum = sum_of(early_buf, early_words);
}
__attribute__((constructor)) static void early_init(void) {
    pthread_atfork(NULL, NULL, child_reads_heap);
}
#else
static uint64_t val(uint64_t i) { return (i + 1) * 0x9E3779B97F4A7C15ull; }

int main(int argc, char **argv) {
    size_t mib = argc > 1 ? strtoul(argv[1], 0, 10) : 64;
    size_t n = (8 << 20) / 8;
    uint64_t *b = malloc(n * 8);
    for (size_t i = 0; i < n; i++) b[i] = val(i);
    uint64_t want = sum_of(b, n);
    /* Push the block out of a dmem parent. */
    size_t tn = (mib << 20) / 8;
    uint64_t *volatile t = malloc(tn * 8);
    for (size_t i = 0; i < tn; i++) t[i] = i;
    free((void *)t);
    early_words = n;
    early_buf = b;
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) _exit(early_sum == want && sum_of(b, n) == want ? 0 : 1);
    int st = 0;
    waitpid(pid, &st, 0);
    int ok = WIFEXITED(st) && WEXITSTATUS(st) == 0;
    printf("atfork_early sum=%016llx child=%s\n", (unsigned long long)want, ok ? "ok" : "WRONG");
    return ok ? 0 : 1;
}
#endif
