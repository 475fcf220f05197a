/* Test program for libdmem.so: exercises the malloc family and managed
 * memory, verifies every word, and prints a digest of what it computed so
 * that a run under dmem can be compared bit for bit with a plain run.
 * Usage: heap MODE MIB. Exit status 0 only when every check passed. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <malloc.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static size_t bad;
#define CHECK(c) do { if (!(c)) { bad++; fprintf(stderr, "check failed line %d: %s\n", __LINE__, #c); } } while (0)

static uint64_t val(uint64_t i, uint64_t v) { return (i + 1) * 0x9E3779B97F4A7C15ull ^ (v * 0xD1B54A32D192ED03ull); }
static uint64_t rng(uint64_t *s) { *s ^= *s << 13; *s ^= *s >> 7; *s ^= *s << 17; return *s; }
static uint64_t digest = 1469598103934665603ull;
static void mix(uint64_t x) { digest = (digest ^ x) * 1099511628211ull; }

/* An unlinked temporary file of 1 MiB holding val(j, 9) in word j. */
static int tag9_file(void) {
    char path[] = "/tmp/dmem-heap-file-XXXXXX";
    int fd = mkstemp(path);
    CHECK(fd >= 0);
    unlink(path);
    size_t mw = (1 << 20) / 8;
    uint64_t *buf = malloc(1 << 20);
    for (size_t j = 0; j < mw; j++) buf[j] = val(j, 9);
    CHECK(write(fd, buf, 1 << 20) == 1 << 20);
    free(buf);
    return fd;
}

/* Blocks of 1 MiB, written sequentially then verified and rewritten at random. */
static void seq_random(size_t mib) {
    size_t nb = mib, words = (1 << 20) / 8;
    uint64_t **b = malloc(nb * sizeof *b);
    uint32_t *ver = calloc(nb * words, sizeof *ver);
    for (size_t i = 0; i < nb; i++) {
        b[i] = malloc(1 << 20);
        for (size_t j = 0; j < words; j++) b[i][j] = val(i * words + j, 0);
    }
    uint64_t s = 88172645463325252ull;
    for (size_t k = 0; k < nb * 256; k++) {
        size_t i = rng(&s) % nb, j = rng(&s) % words, w = i * words + j;
        CHECK(b[i][j] == val(w, ver[w]));
        ver[w]++;
        b[i][j] = val(w, ver[w]);
    }
    for (size_t i = 0; i < nb; i++)
        for (size_t j = 0; j < words; j++) {
            size_t w = i * words + j;
            if (b[i][j] != val(w, ver[w])) bad++;
            mix(b[i][j]);
        }
    for (size_t i = 0; i < nb; i++) free(b[i]);
    free(b);
    free(ver);
}

/* The malloc family's contract at and around the managed threshold. */
static void family(size_t mib) {
    size_t big = mib << 20;
    unsigned char *p = malloc(big);
    memset(p, 0xAB, big);
    free(p);
    unsigned char *z = calloc(big, 1); /* often the recycled block */
    for (size_t i = 0; i < big; i += 512) CHECK(z[i] == 0);
    CHECK(z[big - 1] == 0);
    free(z);
    /* realloc from small (glibc) across the threshold, then shrink back */
    unsigned char *r = malloc(1000);
    for (int i = 0; i < 1000; i++) r[i] = (unsigned char)(i * 7);
    r = realloc(r, big);
    for (int i = 0; i < 1000; i++) CHECK(r[i] == (unsigned char)(i * 7));
    memset(r + 1000, 0x5A, big - 1000);
    r = realloc(r, 2 * big);
    for (int i = 0; i < 1000; i++) CHECK(r[i] == (unsigned char)(i * 7));
    for (size_t i = 1000; i < big; i += 4093) CHECK(r[i] == 0x5A);
    r = realloc(r, 600);
    for (int i = 0; i < 600; i++) CHECK(r[i] == (unsigned char)(i * 7));
    CHECK(malloc_usable_size(r) >= 600);
    free(r);
    CHECK(realloc(malloc(big), 0) == NULL);
    /* overflow and argument checks */
    errno = 0;
    CHECK(malloc(SIZE_MAX) == NULL && errno == ENOMEM);
    unsigned char *keep = malloc(big);
    memset(keep, 0x3C, big);
    errno = 0;
    CHECK(realloc(keep, SIZE_MAX) == NULL && errno == ENOMEM);
    for (size_t i = 0; i < big; i += 4093) CHECK(keep[i] == 0x3C);
    free(keep);
    errno = 0;
    CHECK(calloc(SIZE_MAX / 2, 4) == NULL && errno == ENOMEM);
    errno = 0;
    CHECK(reallocarray(NULL, SIZE_MAX / 2, 4) == NULL && errno == ENOMEM);
    void *m = NULL;
    CHECK(posix_memalign(&m, 24, big) == EINVAL && m == NULL);
    CHECK(posix_memalign(&m, 1 << 21, big) == 0 && ((uintptr_t)m & ((1 << 21) - 1)) == 0);
    memset(m, 1, big);
    errno = 12345;
    free(m);
    CHECK(errno == 12345);
    void *a = aligned_alloc(1 << 16, big);
    CHECK(a && ((uintptr_t)a & 0xffff) == 0);
    CHECK(malloc_usable_size(a) >= big);
    free(a);
    void *v = valloc(big), *pv = pvalloc(big + 1), *ma = memalign(100, big);
    CHECK(v && ((uintptr_t)v & 4095) == 0);
    CHECK(pv && ((uintptr_t)pv & 4095) == 0 && malloc_usable_size(pv) >= big + 4096);
    CHECK(ma && ((uintptr_t)ma & 127) == 0);
    free(v); free(pv); free(ma);
    free(NULL);
    mix(bad);
}

/* Temporaries of a few sizes allocated, written, checked and freed over
 * and over (as numpy's are), while long-lived blocks are replaced one per
 * round: a freed block handed out again must never alias a live one, and
 * calloc must return zeros with freed blocks around. */
static void churn_fill(uint64_t *b, size_t len, uint64_t tag) {
    for (size_t j = 0; j < len / 8; j++) b[j] = val(j, tag);
}
static void churn_check(const uint64_t *b, size_t len, uint64_t tag) {
    for (size_t j = 0; j < len / 8; j += 61) CHECK(b[j] == val(j, tag));
    CHECK(b[len / 8 - 1] == val(len / 8 - 1, tag));
    mix(b[len / 16]);
}
static void churn(size_t mib) {
    static const size_t sizes[] = {256 << 10, 1 << 20, 3 << 20, 4 << 20};
    enum { LIVE = 8 };
    uint64_t *live[LIVE];
    uint64_t tag[LIVE];
    /* The program maps over memory it freed (glibc had unmapped it), then
     * allocates again: its mapping reads zeros and nothing aliases it. */
    size_t mb = 1 << 20;
    uint64_t *f = malloc(mb);
    churn_fill(f, mb, 77);
    void *at = (void *)((uintptr_t)f & ~(uintptr_t)4095);
    free(f);
    uint64_t *m = mmap(at, mb, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
    CHECK(m == at);
    if (m == MAP_FAILED) exit(1);
    CHECK(m[0] == 0 && m[mb / 8 - 1] == 0);
    churn_fill(m, mb, 78);
    uint64_t *g = malloc(mb);
    churn_fill(g, mb, 79);
    CHECK(g != m);
    churn_check(m, mb, 78);
    munmap(m, mb);
    churn_check(g, mb, 79);
    free(g);
    for (size_t i = 0; i < LIVE; i++) {
        live[i] = malloc(sizes[i % 4]);
        tag[i] = 1000 + i;
        churn_fill(live[i], sizes[i % 4], tag[i]);
    }
    for (size_t round = 0; round < mib * 4; round++) {
        size_t len = sizes[round % 4];
        uint64_t *t = malloc(len);
        churn_fill(t, len, round);
        uint64_t *z = calloc(len / 8, 8);
        for (size_t j = 0; j < len / 8; j += 61) CHECK(z[j] == 0);
        CHECK(z[len / 8 - 1] == 0);
        churn_fill(z, len, ~round);
        size_t k = round % LIVE;
        free(live[k]);
        live[k] = malloc(sizes[k % 4]);
        tag[k] = 2000 + round;
        churn_fill(live[k], sizes[k % 4], tag[k]);
        churn_check(t, len, round);
        churn_check(z, len, ~round);
        free(z);
        free(t);
        for (size_t i = 0; i < LIVE; i++) churn_check(live[i], sizes[i % 4], tag[i]);
    }
    for (size_t i = 0; i < LIVE; i++) free(live[i]);
}

struct targ { uint64_t *a; size_t n, t, nt; };
static void *worker(void *x) {
    struct targ *g = x;
    uint64_t s = 0x1234567 + g->t;
    /* each thread owns the words i with i % nt == t; reads everything */
    for (size_t k = 0; k < 20000; k++) {
        size_t i = rng(&s) % g->n;
        uint64_t w = g->a[i];
        if (w != val(i, 0) && w != val(i, 1)) __atomic_add_fetch(&bad, 1, __ATOMIC_RELAXED);
        size_t o = (i / g->nt) * g->nt + g->t;
        if (o < g->n) g->a[o] = val(o, 1);
    }
    return NULL;
}
static void threads(size_t mib) {
    size_t n = (mib << 20) / 8, nt = 4;
    uint64_t *a = malloc(n * 8);
    for (size_t i = 0; i < n; i++) a[i] = val(i, 0);
    pthread_t th[4]; struct targ g[4];
    for (size_t t = 0; t < nt; t++) { g[t] = (struct targ){a, n, t, nt}; pthread_create(&th[t], 0, worker, &g[t]); }
    for (size_t t = 0; t < nt; t++) pthread_join(th[t], 0);
    for (size_t i = 0; i < n; i++) CHECK(a[i] == val(i, 0) || a[i] == val(i, 1));
    free(a);
}

/* read(2)/write(2) with managed (evicted) buffers, then DONTNEED. */
static void syscalls(size_t mib) {
    size_t n = mib << 20;
    uint64_t *src = malloc(n), *dst = malloc(n);
    for (size_t i = 0; i < n / 8; i++) src[i] = val(i, 9);
    char path[] = "/tmp/dmem-heap-XXXXXX";
    int fd = mkstemp(path);
    unlink(path);
    for (size_t off = 0; off < n;) { ssize_t w = write(fd, (char *)src + off, n - off); CHECK(w > 0); if (w <= 0) break; off += w; }
    lseek(fd, 0, SEEK_SET);
    for (size_t off = 0; off < n;) { ssize_t r = read(fd, (char *)dst + off, n - off); CHECK(r > 0); if (r <= 0) break; off += r; }
    close(fd);
    CHECK(memcmp(src, dst, n) == 0);
    /* DONTNEED on managed memory: zeros afterwards, neighbours intact */
    size_t lo = (((uintptr_t)dst + 4096) & ~(uintptr_t)4095) - (uintptr_t)dst;
    CHECK(madvise((char *)dst + lo, n / 2, MADV_DONTNEED) == 0);
    for (size_t i = 0; i < n / 8; i++) {
        size_t byte = i * 8;
        uint64_t want = (byte >= lo && byte < lo + n / 2) ? 0 : val(i, 9);
        if (dst[i] != want) bad++;
    }
    for (size_t i = 0; i < n / 8; i += 511) mix(src[i]);
    free(src); free(dst);
}

/* Waits for a forked child, which must have exited with status 0. */
static void reap_ok(pid_t pid) {
    int st = 0;
    waitpid(pid, &st, 0);
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0);
}

/* Frees `p` after letting it escape, so the compiler cannot drop the
 * writes into it (a malloc filled and freed unread may be elided). */
static void *volatile escaped;
static void escape_free(void *p) { escaped = p; free(p); }

/* fork: parent and child each modify an `mib` MiB block afterwards (every
 * `k`th word from 0 the child, from 1 the parent); each must see exactly
 * its own view, including pages evicted at the time of the fork. With
 * `child_heap`, the parent first pushes the block out to a memory node
 * with a temporary heap of that many MiB and reads it back (so that the
 * block is present and clean, with remote copies, at the fork), and the
 * child, after its writes, pushes it out again with a heap of its own of
 * that size before checking it: its writes must have been seen (the block's pages were
 * clean at the fork) or they would be dropped and read back stale. The
 * child also writes a block that was all zero pages at the fork. */
static void fork_views(size_t mib, size_t k, size_t child_heap) {
    size_t n = (mib << 20) / 8;
    uint64_t *a = malloc(n * 8);
    for (size_t i = 0; i < n; i++) a[i] = val(i, 1);
    /* Read, never written: zero pages at the fork (clean, no remote copy). */
    size_t zn = (1 << 20) / 8;
    uint64_t *z = mmap(NULL, zn * 8, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(z != MAP_FAILED);
    for (size_t i = 0; i < zn; i += 512) CHECK(z[i] == 0);
    if (child_heap) {
        uint64_t *t = malloc(child_heap << 20);
        churn_fill(t, child_heap << 20, 5);
        escape_free(t);
        /* Read back: present and clean (with remote copies) at the fork. */
        for (size_t i = 0; i < n; i += 512) mix(a[i]);
    }
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        size_t cb = 0;
        for (size_t i = 0; i < n; i += k) a[i] = val(i, 2);
        for (size_t i = 0; i < zn; i++) z[i] = val(i, 4);
        for (size_t i = 0; i < n; i++) if (a[i] != val(i, i % k == 0 ? 2 : 1)) cb++;
        if (child_heap) seq_random(child_heap);
        for (size_t i = 0; i < n; i++) if (a[i] != val(i, i % k == 0 ? 2 : 1)) cb++;
        for (size_t i = 0; i < zn; i++) if (z[i] != val(i, 4)) cb++;
        _exit(cb || bad ? 1 : 0);
    }
    for (size_t i = 0; i < zn; i += 512) CHECK(z[i] == 0);
    munmap(z, zn * 8);
    for (size_t i = 1; i < n; i += k) a[i] = val(i, 3);
    reap_ok(pid);
    for (size_t i = 0; i < n; i++) if (a[i] != val(i, i % k == 1 ? 3 : 1)) bad++;
    for (size_t i = 0; i < n; i += 511) mix(a[i]);
    free(a);
}

/* A raw mremap (past the shim) in the parent after a fork, before its
 * child's session is set up. Block a (tag 1) is out on a memory node at
 * the fork, block b (tag 2) present and clean with remote copies. The
 * parent moves a over b and reads it, which fetches a's pages into b's
 * addresses clean. The child still has b as at the fork: it must not take
 * the parent's remote copies there for its own (they now hold a), which
 * it would read back after its heap of `mib` MiB pushed b out. The pager's
 * test delays the child's adoption so that the parent's move comes first.
 * Untouched 8 MiB gaps keep the prefetch of b off a. */
static void fork_remap(size_t mib) {
    size_t len = 4 << 20, n = len / 8, gap = 8 << 20;
    int prot = PROT_READ | PROT_WRITE, fl = MAP_PRIVATE | MAP_ANONYMOUS;
    uint64_t *a = mmap(NULL, len, prot, fl, -1, 0);
    void *g1 = mmap(NULL, gap, prot, fl, -1, 0);
    uint64_t *b = mmap(NULL, len, prot, fl, -1, 0);
    void *g2 = mmap(NULL, gap, prot, fl, -1, 0);
    CHECK(a != MAP_FAILED && b != MAP_FAILED && g1 != MAP_FAILED && g2 != MAP_FAILED);
    churn_fill(a, len, 1);
    churn_fill(b, len, 2);
    uint64_t *t = malloc(mib << 20);
    churn_fill(t, mib << 20, 5);
    escape_free(t);
    for (size_t i = 0; i < n; i += 512) mix(b[i]);
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        seq_random(mib);
        size_t cb = 0;
        for (size_t i = 0; i < n; i++) if (b[i] != val(i, 2) || a[i] != val(i, 1)) cb++;
        if (cb) fprintf(stderr, "fork-remap child: %zu words wrong\n", cb);
        _exit(cb || bad ? 1 : 0);
    }
    void *r = (void *)syscall(SYS_mremap, a, len, len, MREMAP_MAYMOVE | MREMAP_FIXED, b);
    CHECK(r == (void *)b);
    for (size_t i = 0; i < n; i++) if (b[i] != val(i, 1)) bad++;
    reap_ok(pid);
    for (size_t i = 0; i < n; i += 511) mix(b[i]);
}

/* The setup of the kept-block modes: a live 1 MiB block (returned, filled
 * with tag 7) and a freed 4 MiB block kept for reuse are both pushed out
 * by a heap of `mib` MiB, freed again. A 40 MiB spacer, freed, keeps the
 * prefetch of the live block off the kept one. */

static uint64_t *live_and_kept_evicted(size_t mib) {
    size_t cn = (1 << 20) / 8, an = (4 << 20) / 8, sn = (40 << 20) / 8, bn = (mib << 20) / 8;
    uint64_t *c = malloc(cn * 8);
    churn_fill(c, cn * 8, 7);
    uint64_t *spacer = malloc(sn * 8);
    churn_fill(spacer, sn * 8, 9);
    uint64_t *a = malloc(an * 8);
    churn_fill(a, an * 8, 8);
    escape_free(spacer);
    escape_free(a);
    uint64_t *b = malloc(bn * 8);
    churn_fill(b, bn * 8, 10);
    escape_free(b);
    return c;
}

/* fork() with a freed block kept for reuse and a live block both evicted:
 * the child sees the live block intact; the freed one is not brought back
 * (the test checks that in the pager's stats). */
static void fork_kept(size_t mib) {
    size_t cn = (1 << 20) / 8;
    uint64_t *c = live_and_kept_evicted(mib);
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        for (size_t i = 0; i < cn; i++) if (c[i] != val(i, 7)) _exit(1);
        _exit(0);
    }
    reap_ok(pid);
    churn_check(c, cn * 8, 7);
    free(c);
}

/* A freed block kept for reuse is evicted along with live data; a block
 * of its size is then allocated and used. The test checks in the pager's
 * stats that the kept block was dropped when evicted (not written back and
 * fetched again for the new owner). */
static void evict_kept(size_t mib) {
    size_t cn = (1 << 20) / 8, an = (4 << 20) / 8;
    uint64_t *c = live_and_kept_evicted(mib);
    uint64_t *r = malloc(an * 8);
    churn_fill(r, an * 8, 11);
    churn_check(r, an * 8, 11);
    churn_check(c, cn * 8, 7);
    free(r);
    free(c);
}

/* The mmap family on a large anonymous mapping (managed under dmem): data
 * survives eviction, munmap then MAP_FIXED and MAP_FIXED over live data
 * give zeros, a file mapped over part of it reads the file, and mremap
 * growth, shrinking and MREMAP_FIXED keep the data. */
static void mapped(size_t mib) {
    const int rw = PROT_READ | PROT_WRITE, anon = MAP_PRIVATE | MAP_ANONYMOUS;
    size_t len = mib << 20, n = len / 8, mw = (1 << 20) / 8;
    uint64_t *a = mmap(0, len, rw, anon, -1, 0);
    CHECK(a != MAP_FAILED);
    if (a == MAP_FAILED) return;
    for (size_t i = 0; i < n; i += 512) CHECK(a[i] == 0);
    for (size_t i = 0; i < n; i++) a[i] = val(i, 1);
    for (size_t i = 0; i < n; i++) if (a[i] != val(i, 1)) bad++;

    /* A 1 MiB hole unmapped and mapped again reads zeros. */
    size_t h = (n / 2) & ~(mw - 1);
    CHECK(munmap(a + h, 1 << 20) == 0);
    uint64_t *r = mmap(a + h, 1 << 20, rw, anon | MAP_FIXED, -1, 0);
    CHECK(r == a + h);
    for (size_t j = 0; j < mw; j++) { CHECK(r[j] == 0); r[j] = val(h + j, 1); }

    /* MAP_FIXED anonymous over live data: zeros. */
    size_t h2 = (n / 4) & ~(mw - 1);
    r = mmap(a + h2, 64 << 10, rw, anon | MAP_FIXED, -1, 0);
    CHECK(r == a + h2);
    for (size_t j = 0; j < (64 << 10) / 8; j++) { CHECK(r[j] == 0); r[j] = val(h2 + j, 1); }

    /* A file mapped over 1 MiB of it reads the file; unmapped and mapped
     * anonymous again, zeros. */
    int fd = tag9_file();
    size_t h3 = (3 * n / 4) & ~(mw - 1);
    r = mmap(a + h3, 1 << 20, PROT_READ, MAP_PRIVATE | MAP_FIXED, fd, 0);
    CHECK(r == a + h3);
    for (size_t j = 0; j < mw; j++) CHECK(r[j] == val(j, 9));
    CHECK(munmap(r, 1 << 20) == 0);
    r = mmap(a + h3, 1 << 20, rw, anon | MAP_FIXED, -1, 0);
    CHECK(r == a + h3);
    for (size_t j = 0; j < mw; j++) { CHECK(r[j] == 0); r[j] = val(h3 + j, 1); }
    close(fd);
    for (size_t i = 0; i < n; i++) if (a[i] != val(i, 1)) bad++;

    /* mremap: grow (data kept, new tail zeros), shrink in place, and move
     * to a fixed address. */
    a = mremap(a, len, 2 * len, MREMAP_MAYMOVE);
    CHECK(a != MAP_FAILED);
    if (a == MAP_FAILED) return;
    for (size_t i = 0; i < n; i++) if (a[i] != val(i, 1)) bad++;
    for (size_t i = n; i < 2 * n; i += 512) CHECK(a[i] == 0);
    for (size_t i = n; i < 2 * n; i++) a[i] = val(i, 2);
    uint64_t *s = mremap(a, 2 * len, len + (1 << 20), 0);
    CHECK(s == a);
    size_t m = n + mw;
    for (size_t i = 0; i < m; i++) if (a[i] != val(i, i < n ? 1 : 2)) bad++;
    uint64_t *t = mmap(0, len + (1 << 20), PROT_NONE, anon, -1, 0);
    CHECK(t != MAP_FAILED);
    s = mremap(a, len + (1 << 20), len + (1 << 20), MREMAP_MAYMOVE | MREMAP_FIXED, t);
    CHECK(s == t);
    for (size_t i = 0; i < m; i++) {
        if (s[i] != val(i, i < n ? 1 : 2)) bad++;
        if (i % 509 == 0) mix(s[i]);
    }
    CHECK(munmap(s, len + (1 << 20)) == 0);
}

/* fork() with the parent leaving at once: the pages it had paged out at
 * the fork must still reach the child after the parent's session ended
 * (they live on in the pager's fork snapshot). This process keeps a small
 * managed block (so its child gets a session of its own) and forks a
 * middle process, which fills an `mib` MiB block (pushed out under its
 * own limit), forks, and exits. The grandchild waits until it is gone,
 * checks the block, rewrites a tenth of it, checks it again, and reports
 * on a pipe. */
static void fork_orphan(size_t mib) {
    int fds[2];
    CHECK(pipe(fds) == 0);
    uint64_t *keep = malloc(1 << 20);
    churn_fill(keep, 1 << 20, 3);
    fflush(stdout);
    pid_t mid = fork();
    if (mid == 0) {
        close(fds[0]);
        size_t n = (mib << 20) / 8;
        uint64_t *a = malloc(n * 8);
        for (size_t i = 0; i < n; i++) a[i] = val(i, 5);
        pid_t me = getpid();
        if (fork() == 0) {
            while (getppid() == me) usleep(1000);
            char ok = 'y';
            for (size_t i = 0; i < n; i++) if (a[i] != val(i, 5)) { ok = 'n'; break; }
            for (size_t i = 0; i < n; i += 10) a[i] = val(i, 6);
            for (size_t i = 0; i < n; i++) if (a[i] != val(i, i % 10 ? 5 : 6)) { ok = 'n'; break; }
            if (write(fds[1], &ok, 1) != 1) _exit(1);
            _exit(0);
        }
        _exit(0);
    }
    close(fds[1]);
    reap_ok(mid);
    char verdict = 0;
    CHECK(read(fds[0], &verdict, 1) == 1 && verdict == 'y');
    close(fds[0]);
    churn_check(keep, 1 << 20, 3);
    free(keep);
}

/* Four threads fork at the same moment, most of the block paged out:
 * each child must see the whole block as at its fork (every child's fork
 * snapshot is its own), then writes and checks a fresh block of its own. */
struct farg { uint64_t *a; size_t n; pthread_barrier_t *go; int ok; };
static void *forker(void *p) {
    struct farg *f = p;
    pthread_barrier_wait(f->go);
    pid_t pid = fork();
    if (pid == 0) {
        for (size_t i = 0; i < f->n; i++) if (f->a[i] != val(i, 1)) _exit(1);
        size_t mn = (4 << 20) / 8;
        uint64_t *mine = malloc(mn * 8);
        for (size_t i = 0; i < mn; i++) mine[i] = val(i, 40 + getpid());
        for (size_t i = 0; i < mn; i++) if (mine[i] != val(i, 40 + getpid())) _exit(1);
        _exit(0);
    }
    int st = 0;
    f->ok = pid > 0 && waitpid(pid, &st, 0) == pid && WIFEXITED(st) && WEXITSTATUS(st) == 0;
    return 0;
}
static void fork_threads(size_t mib) {
    size_t n = (mib << 20) / 8;
    uint64_t *a = malloc(n * 8);
    for (size_t i = 0; i < n; i++) a[i] = val(i, 1);
    pthread_barrier_t go;
    pthread_barrier_init(&go, 0, 4);
    pthread_t th[4]; struct farg f[4];
    fflush(stdout);
    for (int t = 0; t < 4; t++) { f[t] = (struct farg){a, n, &go, 0}; pthread_create(&th[t], 0, forker, &f[t]); }
    for (int t = 0; t < 4; t++) { pthread_join(th[t], 0); CHECK(f[t].ok); }
    pthread_barrier_destroy(&go);
    for (size_t i = 0; i < n; i++) if (a[i] != val(i, 1)) bad++;
    for (size_t i = 0; i < n; i += 509) mix(a[i]);
    free(a);
}

/* Many children alive at once, as under a pre-forking server: 300
 * children of one parent, most of its block paged out or clean with remote
 * copies, all sharing the parent's pages (a page's remote copy is then
 * referenced by every one of them). Each checks every 64th page of the
 * block as at its fork, reports on a pipe, and waits until all have
 * checked before it exits. */
#define MANY 300
static void fork_many(size_t mib) {
    size_t n = (mib << 20) / 8;
    uint64_t *a = malloc(n * 8);
    for (size_t i = 0; i < n; i++) a[i] = val(i, 1);
    /* Read back the first quarter: present and clean, with remote copies. */
    for (size_t i = 0; i < n / 4; i += 512) mix(a[i]);
    int ready[2], go[2];
    CHECK(pipe(ready) == 0 && pipe(go) == 0);
    pid_t kids[MANY];
    fflush(stdout);
    for (int c = 0; c < MANY; c++) {
        kids[c] = fork();
        CHECK(kids[c] >= 0);
        if (kids[c] == 0) {
            close(ready[0]); close(go[1]);
            char ok = 'y';
            for (size_t i = (size_t)c * 512 % (64 * 512); i < n; i += 64 * 512)
                if (a[i] != val(i, 1)) ok = 'n';
            if (write(ready[1], &ok, 1) != 1) _exit(2);
            char x;
            /* EOF once the parent has heard from every child. */
            while (read(go[0], &x, 1) > 0) {}
            _exit(ok == 'y' ? 0 : 1);
        }
    }
    close(ready[1]); close(go[0]);
    size_t heard = 0;
    char r;
    while (heard < MANY && read(ready[0], &r, 1) == 1) { CHECK(r == 'y'); heard++; }
    CHECK(heard == MANY);
    close(go[1]); close(ready[0]);
    for (int c = 0; c < MANY; c++) if (kids[c] > 0) reap_ok(kids[c]);
    for (size_t i = 0; i < n; i++) if (a[i] != val(i, 1)) bad++;
    for (size_t i = 0; i < n; i += 509) mix(a[i]);
    free(a);
}

/* fork() with a file mapped over part of a managed block (the program's
 * own mapping inside the arena) and most of the block paged out: the
 * child sees both the block and the file. */
static void fork_foreign(size_t mib) {
    size_t n = (mib << 20) / 8, mw = (1 << 20) / 8;
    uint64_t *a = malloc(n * 8);
    for (size_t i = 0; i < n; i++) a[i] = val(i, 1);
    int fd = tag9_file();
    /* Page-aligned, inside the block (glibc's blocks are not aligned). */
    uint64_t *tail = (uint64_t *)((uintptr_t)(a + n - 2 * mw) & ~(uintptr_t)4095);
    size_t tail_at = tail - a;
    uint64_t *r = mmap(tail, 1 << 20, PROT_READ, MAP_PRIVATE | MAP_FIXED, fd, 0);
    CHECK(r == tail);
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        for (size_t i = 0; i < n; i++) {
            uint64_t want = i >= tail_at && i < tail_at + mw ? val(i - tail_at, 9) : val(i, 1);
            if (a[i] != want) _exit(1);
        }
        _exit(0);
    }
    reap_ok(pid);
    /* Where the file lies depends on the block's alignment: the digest
     * takes only whether each word is right. */
    for (size_t i = 0; i < n; i++) {
        uint64_t want = i >= tail_at && i < tail_at + mw ? val(i - tail_at, 9) : val(i, 1);
        if (a[i] != want) bad++;
        if (i % 509 == 0) mix(a[i] == want);
    }
    CHECK(munmap(r, 1 << 20) == 0);
    close(fd);
    free(a);
}

/* Touches memory forever (until killed), for the pager-death test. */
static void forever(size_t mib) {
    size_t n = (mib << 20) / 8;
    uint64_t *a = malloc(n * 8);
    for (size_t i = 0; i < n; i++) a[i] = val(i, 5);
    printf("ready\n");
    fflush(stdout);
    for (uint64_t round = 0;; round++)
        for (size_t i = 0; i < n; i += 512)
            if (a[i] != val(i, 5)) { fprintf(stderr, "WRONG DATA at word %zu\n", i); exit(3); }
}

int main(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "usage: heap MODE MIB\n"); return 2; }
    size_t mib = strtoul(argv[2], 0, 10);
    const char *m = argv[1];
    if (!strcmp(m, "seq-random")) seq_random(mib);
    else if (!strcmp(m, "family")) family(mib);
    else if (!strcmp(m, "churn")) churn(mib);
    else if (!strcmp(m, "threads")) threads(mib);
    else if (!strcmp(m, "syscalls")) syscalls(mib);
    else if (!strcmp(m, "fork")) fork_views(mib, 3, 0);
    else if (!strcmp(m, "fork-kept")) fork_kept(mib);
    else if (!strcmp(m, "fork-orphan")) fork_orphan(mib);
    else if (!strcmp(m, "fork-threads")) fork_threads(mib);
    else if (!strcmp(m, "fork-foreign")) fork_foreign(mib);
    else if (!strcmp(m, "fork-many")) fork_many(mib);
    else if (!strcmp(m, "fork-remap")) fork_remap(mib);
    else if (!strcmp(m, "fork-child")) fork_views(4, 2, mib);
    else if (!strcmp(m, "evict-kept")) evict_kept(mib);
    else if (!strcmp(m, "mmap")) mapped(mib);
    else if (!strcmp(m, "forever")) forever(mib);
    else { fprintf(stderr, "unknown mode %s\n", m); return 2; }
    printf("%s digest=%016llx bad=%zu\n", m, (unsigned long long)digest, bad);
    return bad ? 1 : 0;
}
