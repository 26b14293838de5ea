/*
 * The thread pool shared by the native kernels (pool.c): parallel_for splits [0, n) over the
 * pool's threads, the caller included; one task runs at a time. The GIL is the caller's business.
 */
#ifndef MLX_LLAVA_NEXT_POOL_H
#define MLX_LLAVA_NEXT_POOL_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>

typedef void (*task_fn)(void *arg, Py_ssize_t begin, Py_ssize_t end);

#define MAX_THREADS 64

struct pool_state {
    pthread_mutex_t mu;
    pthread_cond_t start, done;
    int size;      /* threads wanted, the caller included */
    int running;   /* worker threads started */
    long epoch;    /* bumped for every task */
    long pending;  /* workers still busy with the current task */
    task_fn fn;
    void *arg;
    Py_ssize_t n, chunk; /* static split: thread i runs [i * chunk, (i + 1) * chunk) */
    Py_ssize_t grain;    /* > 0: dynamic split, threads claim grain-sized ranges from `next` */
    Py_ssize_t next;
};

extern struct pool_state pool; /* pool.size: threads a task uses (set_num_threads) */

/* One contiguous range per thread, boundaries on multiples of `align`. */
void parallel_for(task_fn fn, void *arg, Py_ssize_t n, Py_ssize_t align);
/* grain > 0: threads claim grain-sized ranges until none are left. */
void parallel_for_grain(task_fn fn, void *arg, Py_ssize_t n, Py_ssize_t align, Py_ssize_t grain);
int default_threads(void);
void after_fork_child(void);

#endif
