/*
 * leaky_cache: the workload `cargo xtask demo` traces with memprof.
 *
 * A toy server handles REQUESTS requests, one per millisecond (about 3 s). Per request:
 *   - parse_header() copies the request line into a 64 B buffer that handle_request() never
 *     frees: a steady leak of 64 B per request, the oldest as old as the run.
 *   - cache_lookup()/cache_insert(): a cache of CACHE_CAP entries (216 B each) over KEYS
 *     keys; once full, each miss evicts the oldest entry, so it fills in about half a second
 *     and then plateaus. Its entries are young: --min-age hides most of them.
 *   - render_response() allocates a 4 KiB buffer that send_response() frees: churn, many
 *     allocations and no outstanding bytes.
 *   - append_access_log() appends to one buffer grown with realloc, doubling (the last
 *     growth, to 128 KiB, is served by glibc with mmap inside realloc).
 * Once: cache_create() callocs the bucket table (8 KiB), and load_assets() maps 1 MiB of
 * anonymous memory with mmap directly and keeps it. Every 500 requests, compact_scratch()
 * maps and unmaps 256 KiB.
 * Nothing is freed at exit, as in many real programs. Keys come from a fixed LCG, so every
 * run ends with the same outstanding memory:
 *   parse_header        192,000 B in 3,000 blocks (malloc)
 *   append_access_log   131,072 B in 1 block      (realloc)
 *   cache_insert         86,400 B in 400 blocks   (malloc; 2,242 allocated, 1,842 freed)
 *   cache_create          8,192 B in 1 block      (calloc)
 *   load_assets       1,048,576 B in 1 mapping    (mmap)
 * plus stdio's buffer for the final printf.
 *
 * Build: cc -O2 -g -fno-omit-frame-pointer -o leaky_cache leaky_cache.c
 */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

/* noipa: no inlining, cloning or other interprocedural changes, so every function keeps its
 * own frame and its plain name in the stacks memprof reports. */
#define TRACED __attribute__((noipa))

#define REQUESTS 3000
#define KEYS 1500
#define CACHE_BUCKETS 1024
#define CACHE_CAP 400
#define VALUE_SIZE 200
#define HEADER_SIZE 64
#define RESPONSE_SIZE 4096
#define ASSETS_SIZE (1 << 20)
#define SCRATCH_SIZE (256 << 10)
#define SCRATCH_EVERY 500

struct entry {
    struct entry *next; /* bucket chain */
    unsigned key;
    char value[VALUE_SIZE];
};

struct cache {
    struct entry **buckets;         /* calloc'd once */
    struct entry *fifo[CACHE_CAP];  /* insertion order, for eviction */
    size_t head, len;
    unsigned long hits, misses;
};

struct access_log {
    char *buf;
    size_t len, cap;
};

static struct cache cache;
static struct access_log access_log;
static unsigned char *assets;

static void die(const char *what) {
    perror(what);
    exit(1);
}

TRACED static unsigned next_key(void) {
    static uint32_t state = 12345;
    state = state * 1103515245u + 12345u;
    return (state >> 8) % KEYS;
}

TRACED static void cache_create(void) {
    cache.buckets = calloc(CACHE_BUCKETS, sizeof *cache.buckets);
    if (cache.buckets == NULL)
        die("calloc");
}

TRACED static struct entry *cache_lookup(unsigned key) {
    for (struct entry *e = cache.buckets[key % CACHE_BUCKETS]; e != NULL; e = e->next)
        if (e->key == key)
            return e;
    return NULL;
}

TRACED static void cache_evict_oldest(void) {
    struct entry *old = cache.fifo[cache.head];
    struct entry **link = &cache.buckets[old->key % CACHE_BUCKETS];
    while (*link != old)
        link = &(*link)->next;
    *link = old->next;
    free(old);
    cache.head = (cache.head + 1) % CACHE_CAP;
    cache.len--;
}

TRACED static struct entry *cache_insert(unsigned key) {
    if (cache.len == CACHE_CAP)
        cache_evict_oldest();
    struct entry *e = malloc(sizeof *e);
    if (e == NULL)
        die("malloc");
    e->key = key;
    snprintf(e->value, sizeof e->value, "value of item %u", key);
    e->next = cache.buckets[key % CACHE_BUCKETS];
    cache.buckets[key % CACHE_BUCKETS] = e;
    cache.fifo[(cache.head + cache.len) % CACHE_CAP] = e;
    cache.len++;
    return e;
}

/* The leak: the caller uses the copy and forgets it. */
TRACED static char *parse_header(unsigned id, unsigned key) {
    char *header = malloc(HEADER_SIZE);
    if (header == NULL)
        die("malloc");
    snprintf(header, HEADER_SIZE, "GET /items/%u HTTP/1.1 #%u", key, id);
    return header;
}

TRACED static char *render_response(const char *header, const struct entry *e) {
    char *body = malloc(RESPONSE_SIZE);
    if (body == NULL)
        die("malloc");
    memset(body, ' ', RESPONSE_SIZE - 1);
    body[RESPONSE_SIZE - 1] = '\0';
    snprintf(body, RESPONSE_SIZE, "200 OK (%s): %s", header, e->value);
    return body;
}

TRACED static size_t send_response(char *body) {
    size_t sent = strlen(body);
    free(body);
    return sent;
}

TRACED static void append_access_log(const char *header, int hit) {
    char line[HEADER_SIZE + 16];
    int n = snprintf(line, sizeof line, "%s -> %s\n", header, hit ? "hit" : "miss");
    if (access_log.len + (size_t)n + 1 > access_log.cap) {
        size_t cap = access_log.cap ? access_log.cap * 2 : 1024;
        char *grown = realloc(access_log.buf, cap);
        if (grown == NULL)
            die("realloc");
        access_log.buf = grown;
        access_log.cap = cap;
    }
    memcpy(access_log.buf + access_log.len, line, (size_t)n + 1);
    access_log.len += (size_t)n;
}

TRACED static void load_assets(void) {
    assets = mmap(NULL, ASSETS_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (assets == MAP_FAILED)
        die("mmap");
    memset(assets, 0xa5, ASSETS_SIZE);
}

TRACED static void compact_scratch(void) {
    unsigned char *scratch =
        mmap(NULL, SCRATCH_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (scratch == MAP_FAILED)
        die("mmap");
    memset(scratch, 0, SCRATCH_SIZE);
    if (munmap(scratch, SCRATCH_SIZE) != 0)
        die("munmap");
}

TRACED static size_t handle_request(unsigned id) {
    unsigned key = next_key();
    char *header = parse_header(id, key); /* never freed */
    struct entry *e = cache_lookup(key);
    int hit = e != NULL;
    if (hit)
        cache.hits++;
    else {
        cache.misses++;
        e = cache_insert(key);
    }
    char *body = render_response(header, e);
    append_access_log(header, hit);
    return send_response(body);
}

int main(void) {
    const struct timespec tick = {.tv_sec = 0, .tv_nsec = 1000 * 1000};
    size_t sent = 0;

    cache_create();
    load_assets();
    for (unsigned id = 0; id < REQUESTS; id++) {
        sent += handle_request(id);
        if (id % SCRATCH_EVERY == SCRATCH_EVERY - 1)
            compact_scratch();
        nanosleep(&tick, NULL);
    }
    printf("leaky_cache: %u requests, %zu bytes sent, cache %zu entries (%lu hits, %lu misses), "
           "access log %zu bytes\n",
           REQUESTS, sent, cache.len, cache.hits, cache.misses, access_log.len);
    return 0;
}
