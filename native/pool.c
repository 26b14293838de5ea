/*
 * The small pthread pool every kernel file shares (see pool.h): work split over rows, workers
 * that poll briefly before sleeping, one task at a time, a fresh pool after fork().
 */
#include "pool.h"

#include <sched.h>
#include <stdint.h>
#include <time.h>
#include <unistd.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

struct pool_state pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, 0, 0,
                         NULL, NULL, 0, 0, 0, 0};

static pthread_mutex_t call_mu = PTHREAD_MUTEX_INITIALIZER; /* one task at a time */

static void run_share(task_fn fn, void *arg, Py_ssize_t n, Py_ssize_t chunk, Py_ssize_t grain, int index) {
    if (grain > 0) {
        for (;;) {
            Py_ssize_t begin = __atomic_fetch_add(&pool.next, grain, __ATOMIC_RELAXED);
            if (begin >= n) return;
            fn(arg, begin, begin + grain < n ? begin + grain : n);
        }
    }
    Py_ssize_t begin = index * chunk, end = begin + chunk;
    if (end > n) end = n;
    if (begin < end) fn(arg, begin, end);
}

static long born_epoch[MAX_THREADS]; /* the epoch a worker was started in: tasks after it are its */

/*
 * Waking a sleeping thread costs 50-150 us on a virtual machine, as much as a 4096x4096 4-bit
 * GEMV takes. Decoding calls the kernels every few hundred microseconds, so a thread that has just
 * finished polls for spin_ns before it sleeps on the condition variable (yielding the core to
 * anything else runnable while it polls).
 */
static const long spin_ns = 2000000;

static long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

/* Poll until (*value != old) == changed, or until the spin budget is spent. */
static void spin_on(const long *value, long old, int changed) {
    long deadline = 0;
    for (int i = 0;; i++) {
        if ((__atomic_load_n(value, __ATOMIC_ACQUIRE) != old) == changed) return;
        if ((i & 63) == 63) {
            long t = now_ns();
            if (!deadline) deadline = t + spin_ns;
            else if (t > deadline) return;
            sched_yield();
        }
#if defined(__x86_64__)
        _mm_pause();
#endif
    }
}

static void *worker(void *p) {
    int index = (int)(intptr_t)p;
    pthread_mutex_lock(&pool.mu);
    long seen = born_epoch[index];
    for (;;) {
        if (pool.epoch == seen) {
            pthread_mutex_unlock(&pool.mu);
            spin_on(&pool.epoch, seen, 1); /* until a new task */
            pthread_mutex_lock(&pool.mu);
        }
        while (pool.epoch == seen) pthread_cond_wait(&pool.start, &pool.mu);
        seen = pool.epoch;
        task_fn fn = pool.fn;
        void *arg = pool.arg;
        Py_ssize_t n = pool.n, chunk = pool.chunk, grain = pool.grain;
        int active = index < pool.size;
        pthread_mutex_unlock(&pool.mu);
        if (active) run_share(fn, arg, n, chunk, grain, index);
        pthread_mutex_lock(&pool.mu);
        if (active && __atomic_sub_fetch(&pool.pending, 1, __ATOMIC_RELEASE) == 0) pthread_cond_signal(&pool.done);
    }
    return NULL;
}

void after_fork_child(void) {
    /* threads do not survive fork(): start a fresh pool on first use */
    pthread_mutex_init(&call_mu, NULL);
    pthread_mutex_init(&pool.mu, NULL);
    pthread_cond_init(&pool.start, NULL);
    pthread_cond_init(&pool.done, NULL);
    pool.running = 0;
    pool.pending = 0;
}

int default_threads(void) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
#ifdef CPU_COUNT
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) n = CPU_COUNT(&set);
#endif
    if (n < 1) n = 1;
    if (n > MAX_THREADS) n = MAX_THREADS;
    return (int)n;
}

/*
 * Run fn over [0, n) on the pool. grain = 0: one contiguous range per thread, boundaries on
 * multiples of `align` (e.g. a tile). grain > 0: threads claim grain-sized ranges until none are
 * left, so a thread the hypervisor or another process slows down does not hold up the others.
 */
void parallel_for_grain(task_fn fn, void *arg, Py_ssize_t n, Py_ssize_t align, Py_ssize_t grain) {
    if (n <= 0) return;
    int threads = pool.size;
    Py_ssize_t chunk = (n + threads - 1) / threads;
    chunk = (chunk + align - 1) / align * align;
    int used = (int)((n + chunk - 1) / chunk);
    if (used <= 1) {
        fn(arg, 0, n);
        return;
    }
    pthread_mutex_lock(&call_mu);
    pthread_mutex_lock(&pool.mu);
    while (pool.running < used - 1) {
        pthread_t t;
        born_epoch[pool.running + 1] = pool.epoch;
        if (pthread_create(&t, NULL, worker, (void *)(intptr_t)(pool.running + 1)) != 0) break;
        pthread_detach(t);
        pool.running++;
    }
    if (pool.running < used - 1) { /* could not start threads: do it all here */
        pthread_mutex_unlock(&pool.mu);
        pthread_mutex_unlock(&call_mu);
        fn(arg, 0, n);
        return;
    }
    pool.fn = fn;
    pool.arg = arg;
    pool.n = n;
    pool.chunk = chunk;
    pool.grain = grain;
    pool.next = 0;
    pool.size = used;
    pool.pending = used - 1;
    __atomic_store_n(&pool.epoch, pool.epoch + 1, __ATOMIC_RELEASE);
    pthread_cond_broadcast(&pool.start);
    pthread_mutex_unlock(&pool.mu);
    run_share(fn, arg, n, chunk, grain, 0);
    spin_on(&pool.pending, 0, 0); /* until no worker is busy */
    pthread_mutex_lock(&pool.mu);
    while (pool.pending > 0) pthread_cond_wait(&pool.done, &pool.mu);
    pool.size = threads;
    pthread_mutex_unlock(&pool.mu);
    pthread_mutex_unlock(&call_mu);
}

void parallel_for(task_fn fn, void *arg, Py_ssize_t n, Py_ssize_t align) {
    parallel_for_grain(fn, arg, n, align, 0);
}

