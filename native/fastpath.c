/*
 * x86 CPU kernels for MLX affine-quantized matrices (see mlx_llava_next/fastpath.py).
 *
 * MLX's layout: weights packed in uint32 words, low bits first (4-bit: 8 values a word, 8-bit:
 * 4), per-group scale and bias, w = scale * q + bias, groups of 32/64/128 along a row.
 *
 *   qmv:        out[M, N] = x[M, K] @ W^T for small M (decode), streaming W once per 4 rows of
 *               x. Per group it computes scale * dot(q, x_g) + bias * sum(x_g), so W is never
 *               dequantized. AVX2+FMA when the CPU has it (checked at run time), scalar C else.
 *   qgemm:      the same product for large M (prefill): dequantize a tile of W rows to float32
 *               and hand it to cblas_sgemm of the process's BLAS (OpenBLAS, see blas.py); the
 *               float32 copy never exceeds one tile.
 *   dequantize: W -> float32 [N, K], bit for bit as mx.dequantize (scale * q, then + bias).
 *   attend:     decode attention (one query per head) over a KV cache: softmax(q K^T * scale) V,
 *               each key/value row read once for all query heads of its group (GQA).
 *   attend_causal: prompt attention (many queries, MLX's mask="causal", or no mask for CLIP) on
 *               the BLAS, with a vector exp for the softmax; swiglu: the MLP's gate * sigmoid(gate)
 *               * x; quick_gelu: CLIP's x * sigmoid(1.702 x).
 *   stream_sum: sum of a float32 buffer on all threads (the benchmark's bandwidth probe).
 *
 * Work is split over output rows on a small pthread pool. The GIL is released while it runs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dlfcn.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_X86 1
#include <immintrin.h>
#define AVX2_FN __attribute__((target("avx2,fma,f16c")))
#else
#define HAVE_X86 0
#endif

#include "pool.h"
#include "common.h"

/* ---------------------------------------------------------------------------------------- */
/* scale/bias decoding                                                                      */



/* One row's scales and biases as float32 (a row has at most K/32 groups). */
static void row_params(const void *scales, const void *biases, int dtype, Py_ssize_t row,
                       Py_ssize_t groups, float *s, float *b) {
    for (Py_ssize_t g = 0; g < groups; g++) {
        s[g] = load_param(scales, dtype, row * groups + g);
        b[g] = load_param(biases, dtype, row * groups + g);
    }
}

/* ---------------------------------------------------------------------------------------- */
/* thread pool: tasks split [0, n) into one contiguous range per thread                      */

/* ---------------------------------------------------------------------------------------- */
/* problem description shared by the tasks                                                   */

typedef struct {
    const float *x;      /* [M, K] (qmv: x after the 4-bit lane permutation) */
    const float *xsum;   /* [M, groups]: sum of x over each group */
    const uint32_t *w;   /* [N, K * bits / 32] */
    const void *scales, *biases;
    float *out;          /* qmv/qgemm: [M, N]; dequantize: [N, K] */
    Py_ssize_t M, N, K;
    int bits, group, dtype;
    Py_ssize_t tile;     /* qgemm rows per tile */
} Problem;

static int use_avx2 = 0;

/* ---- scalar kernels ---------------------------------------------------------------------- */

static void dequant_row_scalar(const Problem *p, Py_ssize_t n, float *dst) {
    Py_ssize_t groups = p->K / p->group, words = p->K * p->bits / 32;
    const uint32_t *w = p->w + n * words;
    uint32_t mask = (1u << p->bits) - 1;
    int per = 32 / p->bits;
    for (Py_ssize_t g = 0; g < groups; g++) {
        float s = load_param(p->scales, p->dtype, n * groups + g);
        float b = load_param(p->biases, p->dtype, n * groups + g);
        for (Py_ssize_t k = g * p->group; k < (g + 1) * p->group; k++) {
            uint32_t q = (w[k / per] >> (p->bits * (k % per))) & mask;
            dst[k] = s * (float)q + b;
        }
    }
}

static void qmv_rows_scalar(const Problem *p, Py_ssize_t n0, Py_ssize_t n1) {
    /* scalar path: x is in natural order */
    Py_ssize_t groups = p->K / p->group, words = p->K * p->bits / 32;
    uint32_t mask = (1u << p->bits) - 1;
    int per = 32 / p->bits;
    for (Py_ssize_t n = n0; n < n1; n++) {
        const uint32_t *w = p->w + n * words;
        for (Py_ssize_t m = 0; m < p->M; m++) {
            const float *x = p->x + m * p->K;
            float total = 0.0f;
            for (Py_ssize_t g = 0; g < groups; g++) {
                float dot = 0.0f;
                for (Py_ssize_t k = g * p->group; k < (g + 1) * p->group; k++)
                    dot += (float)((w[k / per] >> (p->bits * (k % per))) & mask) * x[k];
                total += load_param(p->scales, p->dtype, n * groups + g) * dot +
                         load_param(p->biases, p->dtype, n * groups + g) * p->xsum[m * groups + g];
            }
            p->out[m * p->N + n] = total;
        }
    }
}

/* ---- AVX2 kernels ------------------------------------------------------------------------ */
#if HAVE_X86



/* row_params with F16C/shift conversions: 8 scales at a time */
AVX2_FN static void row_params_avx2(const void *scales, const void *biases, int dtype, Py_ssize_t row,
                                    Py_ssize_t groups, float *s, float *b) {
    if (dtype == DT_F32 || groups % 8 != 0) {
        row_params(scales, biases, dtype, row, groups, s, b);
        return;
    }
    const uint16_t *sh = (const uint16_t *)scales + row * groups, *bh = (const uint16_t *)biases + row * groups;
    for (Py_ssize_t g = 0; g < groups; g += 8) {
        __m128i sv = _mm_loadu_si128((const __m128i *)(sh + g)), bv = _mm_loadu_si128((const __m128i *)(bh + g));
        if (dtype == DT_F16) {
            _mm256_storeu_ps(s + g, _mm256_cvtph_ps(sv));
            _mm256_storeu_ps(b + g, _mm256_cvtph_ps(bv));
        } else {
            _mm256_storeu_ps(s + g, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(sv), 16)));
            _mm256_storeu_ps(b + g, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bv), 16)));
        }
    }
}

/*
 * 32 weights decoded to four float vectors, in the order x's lanes expect.
 * 4-bit: 8 bytes hold 16 values; byte j holds value 2j (low nibble) and 2j+1 (high nibble).
 * Zero-extending the 8 bytes to 8 int32 lanes gives the even values (& 0xf) and the odd values
 * (>> 4) with two instructions, so x is pre-permuted per 16 values: evens first, then odds.
 * 8-bit: byte j is value j, so x stays in natural order.
 */
AVX2_FN static inline void decode32_4(const uint8_t *w, __m256 q[4]) {
    const __m256i low = _mm256_set1_epi32(0xf);
    __m256i v0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)w));
    __m256i v1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(w + 8)));
    q[0] = _mm256_cvtepi32_ps(_mm256_and_si256(v0, low));
    q[1] = _mm256_cvtepi32_ps(_mm256_srli_epi32(v0, 4));
    q[2] = _mm256_cvtepi32_ps(_mm256_and_si256(v1, low));
    q[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(v1, 4));
}

AVX2_FN static inline void decode32_8(const uint8_t *w, __m256 q[4]) {
    for (int i = 0; i < 4; i++)
        q[i] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(w + 8 * i))));
}

/*
 * BITS-bit weights, MB rows of x, groups of GROUP: each decoded weight vector is shared by the MB
 * rows. The group size is a compile-time constant so its loop unrolls: with a run-time trip count
 * the same loop streamed weights about 12% slower (A/B in one process).
 */
#define DEFINE_QMV(BITS, MB, GROUP)                                                              \
    AVX2_FN static void qmv##BITS##_rows_##MB##_g##GROUP(const Problem *p, Py_ssize_t n0,         \
                                                         Py_ssize_t n1, Py_ssize_t m0) {          \
        const Py_ssize_t K = p->K, groups = K / GROUP, words = K * BITS / 32;                      \
        float s[4096], b[4096];                                                                   \
        for (Py_ssize_t n = n0; n < n1; n++) {                                                    \
            const uint8_t *w = (const uint8_t *)(p->w + n * words);                               \
            row_params_avx2(p->scales, p->biases, p->dtype, n, groups, s, b);                     \
            __m256 total[MB];                                                                     \
            float bias_part[MB];                                                                  \
            for (int m = 0; m < MB; m++) {                                                        \
                total[m] = _mm256_setzero_ps();                                                   \
                bias_part[m] = 0.0f;                                                              \
            }                                                                                     \
            Py_ssize_t k = 0;                                                                     \
            for (Py_ssize_t g = 0; g < groups; g++) {                                             \
                __m256 a0[MB], a1[MB], a2[MB], a3[MB];                                            \
                for (int m = 0; m < MB; m++) a0[m] = a1[m] = a2[m] = a3[m] = _mm256_setzero_ps(); \
                for (int j = 0; j < GROUP; j += 32, k += 32, w += 4 * BITS) {                      \
                    __m256 q[4];                                                                  \
                    decode32_##BITS(w, q);                                                        \
                    for (int m = 0; m < MB; m++) {                                                \
                        const float *x = p->x + (m0 + m) * K + k;                                 \
                        a0[m] = _mm256_fmadd_ps(q[0], _mm256_loadu_ps(x), a0[m]);                 \
                        a1[m] = _mm256_fmadd_ps(q[1], _mm256_loadu_ps(x + 8), a1[m]);             \
                        if (MB == 1) { /* four chains hide the FMA latency */                     \
                            a2[m] = _mm256_fmadd_ps(q[2], _mm256_loadu_ps(x + 16), a2[m]);        \
                            a3[m] = _mm256_fmadd_ps(q[3], _mm256_loadu_ps(x + 24), a3[m]);        \
                        } else {                                                                  \
                            a0[m] = _mm256_fmadd_ps(q[2], _mm256_loadu_ps(x + 16), a0[m]);        \
                            a1[m] = _mm256_fmadd_ps(q[3], _mm256_loadu_ps(x + 24), a1[m]);        \
                        }                                                                         \
                    }                                                                             \
                }                                                                                 \
                __m256 scale = _mm256_set1_ps(s[g]);                                              \
                for (int m = 0; m < MB; m++) {                                                    \
                    __m256 dot = _mm256_add_ps(_mm256_add_ps(a0[m], a1[m]), _mm256_add_ps(a2[m], a3[m])); \
                    total[m] = _mm256_fmadd_ps(dot, scale, total[m]);                             \
                    bias_part[m] += b[g] * p->xsum[(m0 + m) * groups + g];                        \
                }                                                                                 \
            }                                                                                     \
            for (int m = 0; m < MB; m++) p->out[(m0 + m) * p->N + n] = hsum256(total[m]) + bias_part[m]; \
        }                                                                                         \
    }

#define DEFINE_QMV_GROUPS(BITS, MB) DEFINE_QMV(BITS, MB, 32) DEFINE_QMV(BITS, MB, 64) DEFINE_QMV(BITS, MB, 128)
DEFINE_QMV_GROUPS(4, 1)
DEFINE_QMV_GROUPS(4, 2)
DEFINE_QMV_GROUPS(4, 3)
DEFINE_QMV_GROUPS(4, 4)
DEFINE_QMV_GROUPS(8, 1)
DEFINE_QMV_GROUPS(8, 2)
DEFINE_QMV_GROUPS(8, 3)
DEFINE_QMV_GROUPS(8, 4)

typedef void (*rows_fn)(const Problem *, Py_ssize_t, Py_ssize_t, Py_ssize_t);
#define QMV_ROW(BITS, G) {NULL, qmv##BITS##_rows_1_g##G, qmv##BITS##_rows_2_g##G, qmv##BITS##_rows_3_g##G, qmv##BITS##_rows_4_g##G}
/* [bits 4/8][group 32/64/128][rows of x] */
static const rows_fn qmv_kernels[2][3][5] = {
    {QMV_ROW(4, 32), QMV_ROW(4, 64), QMV_ROW(4, 128)},
    {QMV_ROW(8, 32), QMV_ROW(8, 64), QMV_ROW(8, 128)},
};

AVX2_FN static void qmv_rows_avx2(const Problem *p, Py_ssize_t n0, Py_ssize_t n1) {
    const rows_fn *kernels = qmv_kernels[p->bits == 8][p->group == 32 ? 0 : p->group == 64 ? 1 : 2];
    /* row blocks keep the active slice of W in cache while up to 4 rows of x pass over it */
    const Py_ssize_t block = 16;
    for (Py_ssize_t r = n0; r < n1; r += block) {
        Py_ssize_t r1 = r + block < n1 ? r + block : n1;
        for (Py_ssize_t m = 0; m < p->M; m += 4) {
            Py_ssize_t mb = p->M - m < 4 ? p->M - m : 4;
            kernels[mb](p, r, r1, m);
        }
    }
}

AVX2_FN static void dequant_row_avx2(const Problem *p, Py_ssize_t n, float *dst) {
    const Py_ssize_t K = p->K, groups = K / p->group, words = K * p->bits / 32;
    const uint32_t *w = p->w + n * words;
    if (p->bits == 4) {
        const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
        const __m256i low = _mm256_set1_epi32(0xf);
        for (Py_ssize_t g = 0; g < groups; g++) {
            __m256 s = _mm256_set1_ps(load_param(p->scales, p->dtype, n * groups + g));
            __m256 b = _mm256_set1_ps(load_param(p->biases, p->dtype, n * groups + g));
            for (Py_ssize_t k = g * p->group; k < (g + 1) * p->group; k += 8) {
                __m256i q = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)w[k / 8]), shifts), low);
                _mm256_storeu_ps(dst + k, _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(q), s), b));
            }
        }
    } else {
        const uint8_t *bytes = (const uint8_t *)w;
        for (Py_ssize_t g = 0; g < groups; g++) {
            __m256 s = _mm256_set1_ps(load_param(p->scales, p->dtype, n * groups + g));
            __m256 b = _mm256_set1_ps(load_param(p->biases, p->dtype, n * groups + g));
            for (Py_ssize_t k = g * p->group; k < (g + 1) * p->group; k += 8) {
                __m256i q = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(bytes + k)));
                _mm256_storeu_ps(dst + k, _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(q), s), b));
            }
        }
    }
}

AVX2_FN static double sum_avx2(const float *x, Py_ssize_t n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    Py_ssize_t i = 0;
    for (; i + 32 <= n; i += 32) {
        a0 = _mm256_add_ps(a0, _mm256_loadu_ps(x + i));
        a1 = _mm256_add_ps(a1, _mm256_loadu_ps(x + i + 8));
        a2 = _mm256_add_ps(a2, _mm256_loadu_ps(x + i + 16));
        a3 = _mm256_add_ps(a3, _mm256_loadu_ps(x + i + 24));
    }
    double total = hsum256(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; i < n; i++) total += x[i];
    return total;
}
#endif /* HAVE_X86 */

static void dequant_row(const Problem *p, Py_ssize_t n, float *dst) {
#if HAVE_X86
    if (use_avx2) {
        dequant_row_avx2(p, n, dst);
        return;
    }
#endif
    dequant_row_scalar(p, n, dst);
}

/* ---------------------------------------------------------------------------------------- */
/* tasks                                                                                     */

static void qmv_task(void *arg, Py_ssize_t n0, Py_ssize_t n1) {
    const Problem *p = (const Problem *)arg;
#if HAVE_X86
    if (use_avx2) {
        qmv_rows_avx2(p, n0, n1);
        return;
    }
#endif
    qmv_rows_scalar(p, n0, n1);
}

static void dequant_task(void *arg, Py_ssize_t n0, Py_ssize_t n1) {
    const Problem *p = (const Problem *)arg;
    for (Py_ssize_t n = n0; n < n1; n++) dequant_row(p, n, p->out + n * p->K);
}

typedef struct {
    const float *x;
    Py_ssize_t n;
    double sum;
} SumPart;

static void sum_task(void *arg, Py_ssize_t i0, Py_ssize_t i1) {
    SumPart *parts = (SumPart *)arg;
    for (Py_ssize_t i = i0; i < i1; i++) {
        double total = 0.0;
#if HAVE_X86
        if (use_avx2) {
            total = sum_avx2(parts[i].x, parts[i].n);
        } else
#endif
        {
            for (Py_ssize_t j = 0; j < parts[i].n; j++) total += parts[i].x[j];
        }
        parts[i].sum = total;
    }
}

/* cblas_sgemm of whatever BLAS is loaded globally (blas.py loads OpenBLAS that way). */
typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *, int,
                         float, float *, int);
static sgemm_fn cblas_sgemm_ptr = NULL;

static void find_sgemm(void) {
    if (!cblas_sgemm_ptr) cblas_sgemm_ptr = (sgemm_fn)dlsym(RTLD_DEFAULT, "cblas_sgemm");
}

/* ---------------------------------------------------------------------------------------- */
/* argument handling                                                                         */


static int check_shape(Py_ssize_t M, Py_ssize_t N, Py_ssize_t K, int bits, int group, int dtype) {
    if (bits != 4 && bits != 8) {
        PyErr_SetString(PyExc_ValueError, "bits must be 4 or 8");
        return -1;
    }
    if (group != 32 && group != 64 && group != 128) {
        PyErr_SetString(PyExc_ValueError, "group_size must be 32, 64 or 128");
        return -1;
    }
    if (dtype < DT_F32 || dtype > DT_BF16) {
        PyErr_SetString(PyExc_ValueError, "unknown scale dtype code");
        return -1;
    }
    if (M < 0 || N <= 0 || K <= 0 || K % group != 0 || K / group > 4096) {
        PyErr_SetString(PyExc_ValueError, "bad shape: K must be a positive multiple of group_size");
        return -1;
    }
    return 0;
}

/* The weight buffers every function takes: (w, scales, biases) for [N, K] at bits/group. */
static int weight_bufs(PyObject *w, PyObject *s, PyObject *b, Buf *bufs, Problem *p) {
    Py_ssize_t psize = p->dtype == DT_F32 ? 4 : 2, groups = p->K / p->group;
    if (get_buf(w, &bufs[0], 0, p->N * p->K * p->bits / 8, "weight") < 0) return -1;
    if (get_buf(s, &bufs[1], 0, p->N * groups * psize, "scales") < 0) return -1;
    if (get_buf(b, &bufs[2], 0, p->N * groups * psize, "biases") < 0) return -1;
    p->w = (const uint32_t *)bufs[0].view.buf;
    p->scales = bufs[1].view.buf;
    p->biases = bufs[2].view.buf;
    return 0;
}

/* x -> (permuted x, group sums) for qmv. */
static int prepare_x(Problem *p, const float *x, float **xp_out, float **xs_out) {
    Py_ssize_t groups = p->K / p->group;
    float *xp = (float *)malloc(sizeof(float) * (p->M * p->K + 8));
    float *xs = (float *)malloc(sizeof(float) * (p->M * groups + 1));
    if (!xp || !xs) {
        free(xp);
        free(xs);
        PyErr_NoMemory();
        return -1;
    }
    int permute = use_avx2 && p->bits == 4;
    for (Py_ssize_t m = 0; m < p->M; m++) {
        const float *src = x + m * p->K;
        float *dst = xp + m * p->K;
        for (Py_ssize_t g = 0; g < groups; g++) {
            float total = 0.0f;
            for (Py_ssize_t k = g * p->group; k < (g + 1) * p->group; k++) total += src[k];
            xs[m * groups + g] = total;
        }
        if (permute) {
            for (Py_ssize_t k = 0; k < p->K; k += 16)
                for (int j = 0; j < 8; j++) {
                    dst[k + j] = src[k + 2 * j];
                    dst[k + 8 + j] = src[k + 2 * j + 1];
                }
        } else {
            memcpy(dst, src, sizeof(float) * p->K);
        }
    }
    *xp_out = xp;
    *xs_out = xs;
    return 0;
}

/* qmv(x, w, scales, biases, out, M, N, K, bits, group_size, dtype) */
static PyObject *py_qmv(PyObject *self, PyObject *args) {
    PyObject *x, *w, *s, *b, *out;
    Problem p = {0};
    if (!PyArg_ParseTuple(args, "OOOOOnnniii", &x, &w, &s, &b, &out, &p.M, &p.N, &p.K, &p.bits, &p.group,
                          &p.dtype))
        return NULL;
    if (check_shape(p.M, p.N, p.K, p.bits, p.group, p.dtype) < 0) return NULL;
    Buf bufs[5];
    memset(bufs, 0, sizeof(bufs));
    float *xp = NULL, *xs = NULL;
    if (weight_bufs(w, s, b, bufs, &p) < 0) goto fail;
    if (get_buf(x, &bufs[3], 0, p.M * p.K * 4, "x") < 0) goto fail;
    if (get_buf(out, &bufs[4], 1, p.M * p.N * 4, "out") < 0) goto fail;
    if (prepare_x(&p, (const float *)bufs[3].view.buf, &xp, &xs) < 0) goto fail;
    p.x = xp;
    p.xsum = xs;
    p.out = (float *)bufs[4].view.buf;
    Py_BEGIN_ALLOW_THREADS
    /* about 8 claims a thread: small enough to even out, large enough to stream */
    Py_ssize_t grain = (p.N / (8 * pool.size) + 7) / 8 * 8;
    parallel_for_grain(qmv_task, &p, p.N, 8, grain < 8 ? 8 : grain);
    Py_END_ALLOW_THREADS
    free(xp);
    free(xs);
    release(bufs, 5);
    Py_RETURN_NONE;
fail:
    release(bufs, 5);
    return NULL;
}

/* dequantize(w, scales, biases, out, N, K, bits, group_size, dtype) */
static PyObject *py_dequantize(PyObject *self, PyObject *args) {
    PyObject *w, *s, *b, *out;
    Problem p = {0};
    if (!PyArg_ParseTuple(args, "OOOOnniii", &w, &s, &b, &out, &p.N, &p.K, &p.bits, &p.group, &p.dtype))
        return NULL;
    if (check_shape(0, p.N, p.K, p.bits, p.group, p.dtype) < 0) return NULL;
    Buf bufs[4];
    memset(bufs, 0, sizeof(bufs));
    if (weight_bufs(w, s, b, bufs, &p) < 0) goto fail;
    if (get_buf(out, &bufs[3], 1, p.N * p.K * 4, "out") < 0) goto fail;
    p.out = (float *)bufs[3].view.buf;
    Py_BEGIN_ALLOW_THREADS
    parallel_for(dequant_task, &p, p.N, 1);
    Py_END_ALLOW_THREADS
    release(bufs, 4);
    Py_RETURN_NONE;
fail:
    release(bufs, 4);
    return NULL;
}

/* qgemm(x, w, scales, biases, out, M, N, K, bits, group_size, dtype): tile-wise dequantize + sgemm */
static PyObject *py_qgemm(PyObject *self, PyObject *args) {
    PyObject *x, *w, *s, *b, *out;
    Problem p = {0};
    Py_ssize_t tile_bytes = 32 << 20;
    if (!PyArg_ParseTuple(args, "OOOOOnnniii|n", &x, &w, &s, &b, &out, &p.M, &p.N, &p.K, &p.bits, &p.group,
                          &p.dtype, &tile_bytes))
        return NULL;
    if (check_shape(p.M, p.N, p.K, p.bits, p.group, p.dtype) < 0) return NULL;
    find_sgemm();
    if (!cblas_sgemm_ptr) {
        PyErr_SetString(PyExc_RuntimeError, "no cblas_sgemm in the process (load a BLAS globally first)");
        return NULL;
    }
    Buf bufs[5];
    memset(bufs, 0, sizeof(bufs));
    if (weight_bufs(w, s, b, bufs, &p) < 0) goto fail;
    if (get_buf(x, &bufs[3], 0, p.M * p.K * 4, "x") < 0) goto fail;
    if (get_buf(out, &bufs[4], 1, p.M * p.N * 4, "out") < 0) goto fail;
    /* a tile of about 32 MB of float32 weights, a multiple of 64 rows and at least 256 rows:
     * smaller or skinnier tiles leave sgemm repacking x for too little work (measured: the
     * 14336-wide down projection ran at 90 GFLOP/s with 128-row tiles, ~135 with 256+) */
    Py_ssize_t tile = tile_bytes / (4 * p.K);
    tile = tile < 256 ? 256 : tile / 64 * 64;
    if (tile > p.N) tile = p.N;
    float *buffer = (float *)malloc(sizeof(float) * tile * p.K);
    if (!buffer) {
        PyErr_NoMemory();
        goto fail;
    }
    const float *xb = (const float *)bufs[3].view.buf;
    float *ob = (float *)bufs[4].view.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t n0 = 0; n0 < p.N; n0 += tile) {
        Py_ssize_t rows = p.N - n0 < tile ? p.N - n0 : tile;
        Problem t = p;
        t.w = p.w + n0 * (p.K * p.bits / 32);
        t.scales = (const char *)p.scales + n0 * (p.K / p.group) * (p.dtype == DT_F32 ? 4 : 2);
        t.biases = (const char *)p.biases + n0 * (p.K / p.group) * (p.dtype == DT_F32 ? 4 : 2);
        t.N = rows;
        t.out = buffer;
        parallel_for(dequant_task, &t, rows, 1);
        /* CblasRowMajor=101, CblasNoTrans=111, CblasTrans=112: out[:, n0:n0+rows] = x @ tile^T */
        cblas_sgemm_ptr(101, 111, 112, (int)p.M, (int)rows, (int)p.K, 1.0f, xb, (int)p.K, buffer, (int)p.K,
                        0.0f, ob + n0, (int)p.N);
    }
    Py_END_ALLOW_THREADS
    free(buffer);
    release(bufs, 5);
    Py_RETURN_NONE;
fail:
    release(bufs, 5);
    return NULL;
}

/* ---------------------------------------------------------------------------------------- */
/* a vector exp (MLX's CPU exp is scalar on x86) and the softmax of a row built on it      */

#if HAVE_X86
/* e^x for 8 floats: Cephes' expf (reduction by ln 2 in two parts, degree-5 polynomial). */

#endif

static void softmax_row(float *row, Py_ssize_t n, Py_ssize_t width) {
#if HAVE_X86
    if (use_avx2) {
        softmax_row_avx2(row, n, width);
        return;
    }
#endif
    float top = row[0], total = 0.0f;
    for (Py_ssize_t j = 1; j < n; j++) top = row[j] > top ? row[j] : top;
    for (Py_ssize_t j = 0; j < n; j++) {
        row[j] = expf(row[j] - top);
        total += row[j];
    }
    for (Py_ssize_t j = 0; j < n; j++) row[j] *= 1.0f / total;
    memset(row + n, 0, sizeof(float) * (width - n));
}

/* ---------------------------------------------------------------------------------------- */
/* decode attention                                                                          */

typedef struct {
    const float *q; /* [H, D] */
    const char *k, *v; /* [Hkv, L, D] with byte strides below; rows contiguous */
    Py_ssize_t k_head, k_row, v_head, v_row;
    float *out;    /* [H, D] */
    float *scores; /* [H, L] scratch */
    Py_ssize_t H, Hkv, L, D;
    float scale;
} Attention;

#if HAVE_X86
AVX2_FN static float dot_avx2(const float *a, const float *b, Py_ssize_t n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = s0;
    Py_ssize_t i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    float total = hsum256(_mm256_add_ps(s0, s1));
    for (; i < n; i++) total += a[i] * b[i];
    return total;
}

AVX2_FN static void axpy_avx2(float *y, float a, const float *x, Py_ssize_t n) {
    __m256 av = _mm256_set1_ps(a);
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += a * x[i];
}
#endif

static float dot(const float *a, const float *b, Py_ssize_t n) {
#if HAVE_X86
    if (use_avx2) return dot_avx2(a, b, n);
#endif
    float total = 0.0f;
    for (Py_ssize_t i = 0; i < n; i++) total += a[i] * b[i];
    return total;
}

static void axpy(float *y, float a, const float *x, Py_ssize_t n) {
#if HAVE_X86
    if (use_avx2) {
        axpy_avx2(y, a, x, n);
        return;
    }
#endif
    for (Py_ssize_t i = 0; i < n; i++) y[i] += a * x[i];
}

/* kv heads [h0, h1): scores for the group's query heads, softmax, weighted sum of values */
static void attend_task(void *arg, Py_ssize_t h0, Py_ssize_t h1) {
    const Attention *a = (const Attention *)arg;
    Py_ssize_t G = a->H / a->Hkv, L = a->L, D = a->D;
    for (Py_ssize_t h = h0; h < h1; h++) {
        float *p = a->scores + h * G * L;
        const char *k = a->k + h * a->k_head, *v = a->v + h * a->v_head;
        const float *q = a->q + h * G * D;
        float *out = a->out + h * G * D;
        for (Py_ssize_t j = 0; j < L; j++) {
            const float *row = (const float *)(k + j * a->k_row);
            for (Py_ssize_t g = 0; g < G; g++) p[g * L + j] = dot(q + g * D, row, D) * a->scale;
        }
        for (Py_ssize_t g = 0; g < G; g++) {
            softmax_row(p + g * L, L, L);
            memset(out + g * D, 0, sizeof(float) * D);
        }
        for (Py_ssize_t j = 0; j < L; j++) {
            const float *row = (const float *)(v + j * a->v_row);
            for (Py_ssize_t g = 0; g < G; g++) axpy(out + g * D, p[g * L + j], row, D);
        }
    }
}

static int strided_4d(PyObject *obj, Py_buffer *view, const char *name) {
    if (PyObject_GetBuffer(obj, view, PyBUF_STRIDED_RO | PyBUF_FORMAT) < 0) return -1;
    if (view->ndim != 4 || view->itemsize != 4 || !view->format || strcmp(view->format, "f") != 0 ||
        view->strides[3] != 4 || view->shape[0] != 1) {
        PyErr_Format(PyExc_ValueError, "%s: expected float32 [1, heads, L, D] with contiguous rows", name);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

/* attend(q [1, H, 1, D] float32 C order, k, v [1, Hkv, L, D] float32 (rows contiguous), out like q, scale) */
static PyObject *py_attend(PyObject *self, PyObject *args) {
    PyObject *qo, *ko, *vo, *oo;
    float scale;
    if (!PyArg_ParseTuple(args, "OOOOf", &qo, &ko, &vo, &oo, &scale)) return NULL;
    Py_buffer k, v;
    Buf q_out[2];
    memset(q_out, 0, sizeof(q_out));
    if (strided_4d(ko, &k, "k") < 0) return NULL;
    if (strided_4d(vo, &v, "v") < 0) {
        PyBuffer_Release(&k);
        return NULL;
    }
    Attention a = {0};
    a.Hkv = k.shape[1];
    a.L = k.shape[2];
    a.D = k.shape[3];
    PyObject *result = NULL;
    if (v.shape[1] != a.Hkv || v.shape[2] != a.L || v.shape[3] != a.D || a.L < 1) {
        PyErr_SetString(PyExc_ValueError, "k and v shapes differ");
        goto done;
    }
    if (PyObject_GetBuffer(qo, &q_out[0].view, PyBUF_C_CONTIGUOUS) < 0) goto done;
    q_out[0].held = 1;
    a.H = q_out[0].view.len / 4 / a.D;
    if (a.H * a.D * 4 != q_out[0].view.len || a.H % a.Hkv != 0) {
        PyErr_SetString(PyExc_ValueError, "q: expected [1, H, 1, D] with H a multiple of the kv heads");
        goto done;
    }
    if (get_buf(oo, &q_out[1], 1, a.H * a.D * 4, "out") < 0) goto done;
    a.q = (const float *)q_out[0].view.buf;
    a.out = (float *)q_out[1].view.buf;
    a.k = (const char *)k.buf;
    a.v = (const char *)v.buf;
    a.k_head = k.strides[1];
    a.k_row = k.strides[2];
    a.v_head = v.strides[1];
    a.v_row = v.strides[2];
    a.scale = scale;
    a.scores = (float *)malloc(sizeof(float) * a.H * a.L);
    if (!a.scores) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    parallel_for(attend_task, &a, a.Hkv, 1);
    Py_END_ALLOW_THREADS
    free(a.scores);
    Py_INCREF(Py_None);
    result = Py_None;
done:
    release(q_out, 2);
    PyBuffer_Release(&k);
    PyBuffer_Release(&v);
    return result;
}

/* ---------------------------------------------------------------------------------------- */
/* prompts: attention over many queries (causal, or CLIP's unmasked), SwiGLU, quick GELU   */
/* MLX's CPU exp is scalar on x86: in a 2,048-token chunk the softmax of the attention and   */
/* the SiLU of the MLP cost more than the attention's matrix products. These use a vector    */
/* exp, and the attention's products go to the process's BLAS, a block of queries at a time. */

/* g * sigmoid(alpha * g) * x: SwiGLU with alpha = 1; CLIP's quick GELU with alpha = 1.702, no x */
static inline float gated1(float g, float alpha, const float *x) {
    float y = g / (1.0f + expf(-alpha * g));
    return x ? y * *x : y;
}

#if HAVE_X86
AVX2_FN static void gated_avx2(const float *g, float alpha, const float *x, float *out, Py_ssize_t n) {
    Py_ssize_t i = 0;
    const __m256 one = _mm256_set1_ps(1.0f), minus_alpha = _mm256_set1_ps(-alpha);
    for (; i + 8 <= n; i += 8) {
        __m256 gv = _mm256_loadu_ps(g + i);
        __m256 y = _mm256_div_ps(gv, _mm256_add_ps(one, exp256(_mm256_mul_ps(minus_alpha, gv))));
        _mm256_storeu_ps(out + i, x ? _mm256_mul_ps(y, _mm256_loadu_ps(x + i)) : y);
    }
    for (; i < n; i++) out[i] = gated1(g[i], alpha, x ? x + i : NULL);
}
#endif

typedef struct {
    float *scores;           /* [rows, width] */
    Py_ssize_t width, first; /* row r sees its first `first + r` keys */
} SoftmaxRows;

static void softmax_task(void *arg, Py_ssize_t r0, Py_ssize_t r1) {
    const SoftmaxRows *s = (const SoftmaxRows *)arg;
    for (Py_ssize_t r = r0; r < r1; r++) {
        Py_ssize_t n = s->first + r < s->width ? s->first + r : s->width;
        softmax_row(s->scores + r * s->width, n, s->width);
    }
}

typedef struct {
    const float *g, *x; /* x may be NULL */
    float alpha;
    float *out;
} Gated;

static void gated_task(void *arg, Py_ssize_t i0, Py_ssize_t i1) {
    const Gated *a = (const Gated *)arg;
    const float *x = a->x ? a->x + i0 : NULL;
#if HAVE_X86
    if (use_avx2) {
        gated_avx2(a->g + i0, a->alpha, x, a->out + i0, i1 - i0);
        return;
    }
#endif
    for (Py_ssize_t i = i0; i < i1; i++) a->out[i] = gated1(a->g[i], a->alpha, x ? x + (i - i0) : NULL);
}

#define CAUSAL_BLOCK 256 /* queries per product: 256 x 3,000 keys of scores is 3 MB */

/*
 * attend_causal(q [1, H, L, D] float32 C order, k, v [1, Hkv, S, D] float32 (rows contiguous),
 * out like q, scale, causal=True): softmax(q K^T * scale + causal mask) V with query i seeing
 * keys [0, S - L + i], MLX's mask="causal"; causal=False: every query sees every key (CLIP).
 * Per query head and block of queries: scores = one sgemm over the keys the block can see, a
 * masked softmax a row per thread, out = one sgemm.
 */
static PyObject *py_attend_causal(PyObject *self, PyObject *args) {
    PyObject *qo, *ko, *vo, *oo;
    float scale;
    int causal = 1;
    if (!PyArg_ParseTuple(args, "OOOOf|p", &qo, &ko, &vo, &oo, &scale, &causal)) return NULL;
    find_sgemm();
    if (!cblas_sgemm_ptr) {
        PyErr_SetString(PyExc_RuntimeError, "no cblas_sgemm in the process (load a BLAS globally first)");
        return NULL;
    }
    Py_buffer q, k, v;
    Buf out_buf;
    memset(&out_buf, 0, sizeof(out_buf));
    if (strided_4d(ko, &k, "k") < 0) return NULL;
    if (strided_4d(vo, &v, "v") < 0) {
        PyBuffer_Release(&k);
        return NULL;
    }
    PyObject *result = NULL;
    float *scores = NULL;
    int have_q = 0;
    if (PyObject_GetBuffer(qo, &q, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) goto done;
    have_q = 1;
    Py_ssize_t Hkv = k.shape[1], S = k.shape[2], D = k.shape[3];
    if (q.ndim != 4 || q.itemsize != 4 || !q.format || strcmp(q.format, "f") != 0 || q.shape[0] != 1 ||
        q.shape[3] != D || q.shape[1] % Hkv != 0 || q.shape[2] > S || q.shape[2] < 1 ||
        v.shape[1] != Hkv || v.shape[2] != S || v.shape[3] != D || k.strides[2] % 4 || v.strides[2] % 4) {
        PyErr_SetString(PyExc_ValueError,
                        "attend_causal: expected q [1, H, L, D], k and v [1, Hkv, S, D] with S >= L, H a multiple of Hkv");
        goto done;
    }
    Py_ssize_t H = q.shape[1], L = q.shape[2], G = H / Hkv;
    if (get_buf(oo, &out_buf, 1, H * L * D * 4, "out") < 0) goto done;
    scores = (float *)malloc(sizeof(float) * CAUSAL_BLOCK * S);
    if (!scores) {
        PyErr_NoMemory();
        goto done;
    }
    const float *qb = (const float *)q.buf;
    float *ob = (float *)out_buf.view.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t h = 0; h < H; h++) {
        const float *kh = (const float *)((const char *)k.buf + (h / G) * k.strides[1]);
        const float *vh = (const float *)((const char *)v.buf + (h / G) * v.strides[1]);
        for (Py_ssize_t i0 = 0; i0 < L; i0 += CAUSAL_BLOCK) {
            Py_ssize_t rows = L - i0 < CAUSAL_BLOCK ? L - i0 : CAUSAL_BLOCK;
            SoftmaxRows sm = {scores, causal ? S - L + i0 + rows : S, causal ? S - L + i0 + 1 : S};
            /* CblasRowMajor=101, CblasNoTrans=111, CblasTrans=112 */
            cblas_sgemm_ptr(101, 111, 112, (int)rows, (int)sm.width, (int)D, scale, qb + (h * L + i0) * D, (int)D,
                            kh, (int)(k.strides[2] / 4), 0.0f, scores, (int)sm.width);
            parallel_for(softmax_task, &sm, rows, 1);
            cblas_sgemm_ptr(101, 111, 111, (int)rows, (int)D, (int)sm.width, 1.0f, scores, (int)sm.width, vh,
                            (int)(v.strides[2] / 4), 0.0f, ob + (h * L + i0) * D, (int)D);
        }
    }
    Py_END_ALLOW_THREADS
    Py_INCREF(Py_None);
    result = Py_None;
done:
    free(scores);
    release(&out_buf, 1);
    if (have_q) PyBuffer_Release(&q);
    PyBuffer_Release(&k);
    PyBuffer_Release(&v);
    return result;
}

/* out = g * sigmoid(alpha * g) [* x], float32 buffers of one length */
static PyObject *gated(PyObject *go, PyObject *xo, PyObject *oo, float alpha) {
    Buf bufs[3];
    memset(bufs, 0, sizeof(bufs));
    if (PyObject_GetBuffer(go, &bufs[0].view, PyBUF_C_CONTIGUOUS) < 0) return NULL;
    bufs[0].held = 1;
    Py_ssize_t n = bufs[0].view.len / 4;
    if ((xo && get_buf(xo, &bufs[1], 0, n * 4, "x") < 0) || get_buf(oo, &bufs[2], 1, n * 4, "out") < 0) {
        release(bufs, 3);
        return NULL;
    }
    Gated a = {(const float *)bufs[0].view.buf, xo ? (const float *)bufs[1].view.buf : NULL, alpha,
               (float *)bufs[2].view.buf};
    Py_BEGIN_ALLOW_THREADS
    parallel_for(gated_task, &a, n, 1 << 15); /* a decode step's row (< 32K values) on one thread */
    Py_END_ALLOW_THREADS
    release(bufs, 3);
    Py_RETURN_NONE;
}

/* swiglu(gate, x, out): out = gate * sigmoid(gate) * x */
static PyObject *py_swiglu(PyObject *self, PyObject *args) {
    PyObject *go, *xo, *oo;
    if (!PyArg_ParseTuple(args, "OOO", &go, &xo, &oo)) return NULL;
    return gated(go, xo, oo, 1.0f);
}

/* quick_gelu(x, out): out = x * sigmoid(1.702 x), CLIP's activation (MLX's gelu_fast_approx) */
static PyObject *py_quick_gelu(PyObject *self, PyObject *args) {
    PyObject *xo, *oo;
    if (!PyArg_ParseTuple(args, "OO", &xo, &oo)) return NULL;
    return gated(xo, NULL, oo, 1.702f);
}

/* stream_sum(float32 buffer) -> sum, read on all threads */
static PyObject *py_stream_sum(PyObject *self, PyObject *args) {
    PyObject *obj;
    if (!PyArg_ParseTuple(args, "O", &obj)) return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(obj, &view, PyBUF_C_CONTIGUOUS) < 0) return NULL;
    Py_ssize_t n = view.len / 4, parts_n = pool.size;
    SumPart parts[MAX_THREADS];
    for (Py_ssize_t i = 0; i < parts_n; i++) {
        Py_ssize_t a = n * i / parts_n, z = n * (i + 1) / parts_n;
        parts[i].x = (const float *)view.buf + a;
        parts[i].n = z - a;
        parts[i].sum = 0.0;
    }
    Py_BEGIN_ALLOW_THREADS
    parallel_for(sum_task, parts, parts_n, 1);
    Py_END_ALLOW_THREADS
    double total = 0.0;
    for (Py_ssize_t i = 0; i < parts_n; i++) total += parts[i].sum;
    PyBuffer_Release(&view);
    return PyFloat_FromDouble(total);
}

static PyObject *py_set_num_threads(PyObject *self, PyObject *args) {
    int n;
    if (!PyArg_ParseTuple(args, "i", &n)) return NULL;
    if (n < 1) n = default_threads();
    if (n > MAX_THREADS) n = MAX_THREADS;
    pthread_mutex_lock(&pool.mu);
    pool.size = n;
    pthread_mutex_unlock(&pool.mu);
    Py_RETURN_NONE;
}

static PyObject *py_set_simd(PyObject *self, PyObject *args) {
    /* tests: force the scalar path (0) or restore detection (1) */
    int on;
    if (!PyArg_ParseTuple(args, "p", &on)) return NULL;
#if HAVE_X86
    use_avx2 = on && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
    Py_RETURN_NONE;
}

static PyObject *py_info(PyObject *self, PyObject *noargs) {
    find_sgemm();
    return Py_BuildValue("{s:s,s:i,s:O}", "simd", use_avx2 ? "avx2+fma" : "scalar", "threads", pool.size,
                         "cblas_sgemm", cblas_sgemm_ptr ? Py_True : Py_False);
}

static PyMethodDef methods[] = {
    {"qmv", py_qmv, METH_VARARGS, "x @ W^T for a few rows of x, W quantized (MLX affine)"},
    {"qgemm", py_qgemm, METH_VARARGS, "x @ W^T for many rows: tile-wise dequantize + cblas_sgemm"},
    {"dequantize", py_dequantize, METH_VARARGS, "W (MLX affine) -> float32"},
    {"attend", py_attend, METH_VARARGS, "decode attention: softmax(q K^T * scale) V for one query a head"},
    {"attend_causal", py_attend_causal, METH_VARARGS, "prompt attention: softmax(q K^T * scale [+ causal mask]) V"},
    {"swiglu", py_swiglu, METH_VARARGS, "gate * sigmoid(gate) * x"},
    {"quick_gelu", py_quick_gelu, METH_VARARGS, "x * sigmoid(1.702 x)"},
    {"stream_sum", py_stream_sum, METH_VARARGS, "sum of a float32 buffer, read on all threads"},
    {"set_num_threads", py_set_num_threads, METH_VARARGS, "threads to use (< 1: all CPUs)"},
    {"set_simd", py_set_simd, METH_VARARGS, "use AVX2 when available (True) or the scalar path"},
    {"info", py_info, METH_NOARGS, "{'simd', 'threads', 'cblas_sgemm'}"},
    {NULL, NULL, 0, NULL},
};

extern PyMethodDef kv_methods[]; /* native/kv.c */
extern PyMethodDef qint8_methods[]; /* native/qint8.c */

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastpath", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fastpath(void) {
#if HAVE_X86
    __builtin_cpu_init();
    use_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
    pool.size = default_threads();
    pthread_atfork(NULL, NULL, after_fork_child);
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    if (PyModule_AddFunctions(m, kv_methods) < 0) { /* kv.c: the KV cache's decode step */
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddFunctions(m, qint8_methods) < 0) { /* qint8.c: int8-activation products */
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
