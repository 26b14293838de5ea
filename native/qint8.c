/*
 * int8-activation kernels for MLX affine-quantized matrices (mlx_llava_next/fastpath.py).
 *
 * Weights stay as stored (uint32 words, low bits first, w = scale * q + bias per group of
 * 32/64/128, q unsigned 4- or 8-bit). Activations are quantized per group, symmetric:
 * d = max|x| / 127, xq = round(x / d) (to nearest, ties to even). Per group then
 *     y += scale * d * sum(q * xq) + bias * xsum,   xsum = d * sum(xq),
 * i.e. the rounded x against the weights scale * q + bias, as llama.cpp's Q8_1 does. With xsum the
 * sum of the original x the bias term would be exact but the rounding would meet scale * q alone,
 * whose zero point (bias is about -8 scale) no longer cancels: 7x the KL on the trained demo model
 * (quality report). sum(q * xq) is an integer dot of u8 by s8: AVX-512 VNNI's vpdpbusd
 * (ymm, with AVX512VL), or AVX2's vpmaddubsw + vpmaddwd (4-bit: 2 * 15 * 127 fits int16; 8-bit
 * weights are split into nibbles first, as 2 * 255 * 127 does not), or scalar C.
 *
 *   q8_quantize: the activation quantization alone (for tests).
 *   q8_qmv:      few rows (decode): weight rows streamed once for all rows of x.
 *   q8_qgemm:    many rows (prefill): 16 weight rows unpacked to a u8 panel [k/4][16][4] per
 *                1,024 values of K, four panels against MR-row slices of x, int32 accumulators
 *                per group, float32 sums in a [M][64] buffer per 64 output columns.
 *   q8_set_isa / q8_info: force a path ('avx512vnni', 'avx2', 'scalar'; None: the best this CPU
 *                runs) and report the one in use and those available.
 *
 * The instruction set is chosen at run time (__builtin_cpu_supports) and the SIMD code is compiled
 * with function-level target attributes, so the module runs on any x86-64 (and elsewhere: scalar).
 * Work is split over output rows on the shared pool (pool.h); the GIL is released while it runs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "pool.h"
#include "common.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define Q8_X86 1
#include <immintrin.h>
#else
#define Q8_X86 0
#endif

enum { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_VNNI = 2 };
static const char *const isa_names[] = {"scalar", "avx2", "avx512vnni"};
static int isa = -1; /* the path in use; -1 until first needed */

#define KC 1024 /* values of K per packed panel */

typedef struct {
    const int8_t *xq;    /* [M, K] quantized x (qmv, 4-bit: permuted per 64 values) */
    const float *d;      /* [M, groups] x's scale per group */
    const float *xsum;   /* [M, groups] sum of the original x per group */
    const uint32_t *w;   /* [N, K * bits / 32] */
    const void *scales, *biases;
    float *out;          /* [M, N] */
    Py_ssize_t M, N, K;
    int bits, group, dtype;
} Q8Problem;

/* ---- scalar helpers -------------------------------------------------------------------------- */



static void scalar_row_params(const Q8Problem *p, Py_ssize_t row, float *s, float *b) {
    const Py_ssize_t groups = p->K / p->group;
    for (Py_ssize_t g = 0; g < groups; g++) {
        s[g] = load_param(p->scales, p->dtype, row * groups + g);
        b[g] = load_param(p->biases, p->dtype, row * groups + g);
    }
}

/* Row m of x quantized per group: q (natural order), d and the float sum per group. */
static void quantize_row(const float *x, int8_t *q, float *d, float *sum, Py_ssize_t K, int group) {
    for (Py_ssize_t g = 0; g < K / group; g++) {
        const float *xg = x + g * group;
        float amax = 0.0f;
        for (int k = 0; k < group; k++) {
            float a = fabsf(xg[k]);
            amax = a > amax ? a : amax;
        }
        float dg = amax / 127.0f;
        int32_t qsum = 0;
        for (int k = 0; k < group; k++) {
            float r = dg > 0.0f ? nearbyintf(xg[k] / dg) : 0.0f;
            r = r > 127.0f ? 127.0f : r < -127.0f ? -127.0f : r;
            q[g * group + k] = (int8_t)r;
            qsum += (int32_t)r;
        }
        d[g] = dg;
        sum[g] = dg * (float)qsum; /* the rounded x's sum (see the top of this file) */
    }
}

/* Within each 64 values: the even positions of both halves, then the odd ones, matching the low
 * and high nibbles of 32 bytes of 4-bit weights. */
static void permute64(int8_t *q, Py_ssize_t K) {
    int8_t t[64];
    for (Py_ssize_t c = 0; c < K; c += 64) {
        for (int j = 0; j < 16; j++) {
            t[j] = q[c + 2 * j];
            t[16 + j] = q[c + 32 + 2 * j];
            t[32 + j] = q[c + 2 * j + 1];
            t[48 + j] = q[c + 33 + 2 * j];
        }
        memcpy(q + c, t, 64);
    }
}

static inline int weight_q(const Q8Problem *p, Py_ssize_t n, Py_ssize_t k) {
    const Py_ssize_t words = p->K * p->bits / 32;
    int per = 32 / p->bits;
    return (int)((p->w[n * words + k / per] >> (p->bits * (k % per))) & ((1u << p->bits) - 1));
}

/* y[m, n] on the scalar path; xq in natural order */
static float scalar_dot(const Q8Problem *p, Py_ssize_t m, Py_ssize_t n) {
    const Py_ssize_t groups = p->K / p->group;
    float total = 0.0f;
    for (Py_ssize_t g = 0; g < groups; g++) {
        int32_t dot = 0;
        for (Py_ssize_t k = g * p->group; k < (g + 1) * p->group; k++)
            dot += weight_q(p, n, k) * (int32_t)p->xq[m * p->K + k];
        total += load_param(p->scales, p->dtype, n * groups + g) * p->d[m * groups + g] * (float)dot +
                 load_param(p->biases, p->dtype, n * groups + g) * p->xsum[m * groups + g];
    }
    return total;
}

/* ---- SIMD kernels, compiled per instruction set (qint8_body.h) --------------------------------- */
#if Q8_X86

#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)

/* AVX2: u8 x s8 pair sums in int16 (no saturation for u8 <= 15), then pairs of int16 to int32 */
#define SFX(name) CAT(name, avx2)
#define TARGET __attribute__((target("avx2,fma,f16c")))
#define DOT(acc, u, s) \
    _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)))
#define DOT8(acc, u, s)                                                                                       \
    _mm256_add_epi32(                                                                                         \
        acc, _mm256_add_epi32(                                                                                \
                 _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_and_si256(u, _mm256_set1_epi8(15)), s),        \
                                   _mm256_set1_epi16(1)),                                                     \
                 _mm256_madd_epi16(                                                                           \
                     _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(u, 4), _mm256_set1_epi8(15)), s), \
                     _mm256_set1_epi16(16))))
#define MR 4
#include "qint8_body.h"
#undef SFX
#undef TARGET
#undef DOT
#undef DOT8
#undef MR

/* AVX-512 VNNI on ymm registers (AVX512VL): one vpdpbusd a 32-byte operand, 32 registers */
#define SFX(name) CAT(name, vnni)
#define TARGET __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))
/* inline asm: with the intrinsic, gcc 12 copied every accumulator twice around each vpdpbusd */
#define DOT(acc, u, s)                                                   \
    ({                                                                   \
        __m256i acc_ = (acc);                                            \
        __asm__("vpdpbusd %2, %1, %0" : "+v"(acc_) : "v"(u), "v"(s));    \
        acc_;                                                            \
    })
#define DOT8(acc, u, s) DOT(acc, u, s)
/* acc += w (u8) by the 4 s8 bytes at p, broadcast to all 16 lanes from memory ({1to16}) */
#define DOTZ(acc, w, p) __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*(const int32_t *)(p)))
#define MR 8
#include "qint8_body.h"
#undef SFX
#undef TARGET
#undef DOT
#undef DOT8
#undef DOTZ
#undef MR

/* quantize_row on 8 lanes, bit for bit: the same max, d = max / 127, x / d rounded to nearest
 * even (vdivps, vroundps), the integer sum; about 10x the scalar loop, which cost a 7B decode step
 * some 7 ms (seven quantizations a layer, one thread). */
COMMON_AVX2 static void quantize_row_avx2(const float *x, int8_t *q, float *d, float *sum, Py_ssize_t K, int group) {
    const __m256 sign = _mm256_set1_ps(-0.0f), top = _mm256_set1_ps(127.0f), bottom = _mm256_set1_ps(-127.0f);
    for (Py_ssize_t g = 0; g < K / group; g++) {
        const float *xg = x + g * group;
        int8_t *qg = q + g * group;
        __m256 amax = _mm256_setzero_ps();
        for (int k = 0; k < group; k += 8) amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, _mm256_loadu_ps(xg + k)));
        float dg = hmax256(amax) / 127.0f;
        d[g] = dg;
        if (!(dg > 0.0f)) { /* an all-zero group */
            memset(qg, 0, group);
            sum[g] = 0.0f;
            continue;
        }
        const __m256 dv = _mm256_set1_ps(dg);
        __m256i total = _mm256_setzero_si256();
        for (int k = 0; k < group; k += 8) {
            __m256 r = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(xg + k), dv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            __m256i i = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, bottom), top));
            total = _mm256_add_epi32(total, i);
            __m128i w16 = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
            _mm_storel_epi64((__m128i *)(qg + k), _mm_packs_epi16(w16, w16));
        }
        __m128i t4 = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
        t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0x4e));
        t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0xb1));
        sum[g] = dg * (float)_mm_cvtsi128_si32(t4);
    }
}

#endif /* Q8_X86 */

static int isa_supported(int which) {
#if Q8_X86
    __builtin_cpu_init();
    if (which == ISA_VNNI)
        return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
               __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
               __builtin_cpu_supports("f16c");
    if (which == ISA_AVX2)
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#endif
    return which == ISA_SCALAR;
}

static int current_isa(void) {
    if (isa < 0) isa = isa_supported(ISA_VNNI) ? ISA_VNNI : isa_supported(ISA_AVX2) ? ISA_AVX2 : ISA_SCALAR;
    return isa;
}

/* ---- tasks -------------------------------------------------------------------------------------- */

typedef struct {
    const float *x;
    int8_t *q;
    float *d, *sum;
    Py_ssize_t K;
    int group, permute;
} QuantTask;

static void quantize_task(void *arg, Py_ssize_t m0, Py_ssize_t m1) {
    const QuantTask *t = (const QuantTask *)arg;
    Py_ssize_t groups = t->K / t->group;
    const int vector = current_isa() != ISA_SCALAR;
    for (Py_ssize_t m = m0; m < m1; m++) {
#if Q8_X86
        if (vector)
            quantize_row_avx2(t->x + m * t->K, t->q + m * t->K, t->d + m * groups, t->sum + m * groups, t->K, t->group);
        else
#endif
            quantize_row(t->x + m * t->K, t->q + m * t->K, t->d + m * groups, t->sum + m * groups, t->K, t->group);
        if (t->permute) permute64(t->q + m * t->K, t->K);
    }
}

static void qmv_task(void *arg, Py_ssize_t n0, Py_ssize_t n1) {
    const Q8Problem *p = (const Q8Problem *)arg;
#if Q8_X86
    if (isa == ISA_VNNI) {
        gemv_rows_vnni(p, n0, n1);
        return;
    }
    if (isa == ISA_AVX2) {
        gemv_rows_avx2(p, n0, n1);
        return;
    }
#endif
    for (Py_ssize_t n = n0; n < n1; n++)
        for (Py_ssize_t m = 0; m < p->M; m++) p->out[m * p->N + n] = scalar_dot(p, m, n);
}

/* Scales and biases of 16 rows from n0 over groups [g0, g0 + ng), as [ng][16] (rows past N: 0). */
static void pack_params(const Q8Problem *p, Py_ssize_t n0, Py_ssize_t g0, Py_ssize_t ng, float *sp, float *bp) {
    const Py_ssize_t groups = p->K / p->group;
    for (int r = 0; r < 16; r++)
        for (Py_ssize_t g = 0; g < ng; g++) {
            int valid = n0 + r < p->N;
            sp[g * 16 + r] = valid ? load_param(p->scales, p->dtype, (n0 + r) * groups + g0 + g) : 0.0f;
            bp[g * 16 + r] = valid ? load_param(p->biases, p->dtype, (n0 + r) * groups + g0 + g) : 0.0f;
        }
}

/* Blocks of 64 output columns (weight rows). */
static void qgemm_task(void *arg, Py_ssize_t u0, Py_ssize_t u1) {
    const Q8Problem *p = (const Q8Problem *)arg;
#if Q8_X86
    if (isa == ISA_AVX2 || isa == ISA_VNNI) {
        uint8_t *wp = (uint8_t *)malloc(4 * 16 * KC + KC);
        float *params = (float *)malloc(sizeof(float) * 2 * 4 * 16 * (KC / 32));
        float *cbuf = (float *)malloc(sizeof(float) * 64 * p->M);
        if (!wp || !params || !cbuf) abort(); /* a few MB at most */
        uint8_t *row = wp + 4 * 16 * KC;
        for (Py_ssize_t u = u0; u < u1; u++) {
            Py_ssize_t n0 = 64 * u;
            int panels = (int)((p->N - n0 + 15) / 16);
            if (panels > 4) panels = 4;
            memset(cbuf, 0, sizeof(float) * 64 * p->M);
            for (Py_ssize_t k0 = 0; k0 < p->K; k0 += KC) {
                Py_ssize_t kc = p->K - k0 < KC ? p->K - k0 : KC, ng = kc / p->group;
                float *sp = params, *bp = params + 4 * 16 * ng;
                for (int j = 0; j < panels; j++) {
                    if (isa == ISA_VNNI) pack_panel_vnni(p, n0 + 16 * j, k0, kc, wp + j * 16 * kc, row);
                    else pack_panel_avx2(p, n0 + 16 * j, k0, kc, wp + j * 16 * kc, row);
                    pack_params(p, n0 + 16 * j, k0 / p->group, ng, sp + j * 16 * ng, bp + j * 16 * ng);
                }
                if (isa == ISA_VNNI) gemm_block_vnni(p, wp, sp, bp, panels, k0, kc, cbuf);
                else gemm_block_avx2(p, wp, sp, bp, panels, k0, kc, cbuf);
            }
            Py_ssize_t cols = p->N - n0 < 64 ? p->N - n0 : 64;
            for (Py_ssize_t m = 0; m < p->M; m++) memcpy(p->out + m * p->N + n0, cbuf + m * 64, sizeof(float) * cols);
        }
        free(wp);
        free(params);
        free(cbuf);
        return;
    }
#endif
    for (Py_ssize_t n = 64 * u0; n < 64 * u1 && n < p->N; n++)
        for (Py_ssize_t m = 0; m < p->M; m++) p->out[m * p->N + n] = scalar_dot(p, m, n);
}

/* ---- argument handling -------------------------------------------------------------------------- */


static int check_args(Py_ssize_t M, Py_ssize_t N, Py_ssize_t K, int bits, int group, int dtype) {
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
    if (M < 0 || N <= 0 || K <= 0 || K % 64 != 0 || K % group != 0 || K / group > 4096) {
        PyErr_SetString(PyExc_ValueError, "bad shape: K must be a positive multiple of 64 and of group_size");
        return -1;
    }
    return 0;
}

typedef struct {
    int8_t *q;
    float *d, *sum;
} QuantBuffers;

/* x [M, K] -> the problem's quantized activations (freed by free_quant); threads for many rows. */
static int quantize_into(Q8Problem *p, const float *x, int permute, QuantBuffers *qb) {
    Py_ssize_t groups = p->K / p->group;
    qb->q = (int8_t *)malloc(p->M * p->K + 64);
    qb->d = (float *)malloc(sizeof(float) * (p->M * groups + 1));
    qb->sum = (float *)malloc(sizeof(float) * (p->M * groups + 1));
    if (!qb->q || !qb->d || !qb->sum) return -1;
    QuantTask t = {x, qb->q, qb->d, qb->sum, p->K, p->group, permute};
    if (p->M >= 64) parallel_for(quantize_task, &t, p->M, 1);
    else quantize_task(&t, 0, p->M);
    p->xq = qb->q;
    p->d = qb->d;
    p->xsum = qb->sum;
    return 0;
}

static void free_quant(QuantBuffers *qb) {
    free(qb->q);
    free(qb->d);
    free(qb->sum);
}

/* q8_qmv / q8_qgemm (x, w, scales, biases, out, M, N, K, bits, group_size, dtype) */
static PyObject *run_product(PyObject *args, int gemm) {
    PyObject *x, *w, *s, *b, *out;
    Q8Problem p;
    memset(&p, 0, sizeof(p));
    if (!PyArg_ParseTuple(args, "OOOOOnnniii", &x, &w, &s, &b, &out, &p.M, &p.N, &p.K, &p.bits, &p.group, &p.dtype))
        return NULL;
    if (check_args(p.M, p.N, p.K, p.bits, p.group, p.dtype) < 0) return NULL;
    Buf bufs[5];
    memset(bufs, 0, sizeof(bufs));
    Py_ssize_t psize = p.dtype == DT_F32 ? 4 : 2, groups = p.K / p.group;
    if (get_buf(w, &bufs[0], 0, p.N * p.K * p.bits / 8, "weight") < 0 ||
        get_buf(s, &bufs[1], 0, p.N * groups * psize, "scales") < 0 ||
        get_buf(b, &bufs[2], 0, p.N * groups * psize, "biases") < 0 ||
        get_buf(x, &bufs[3], 0, p.M * p.K * 4, "x") < 0 || get_buf(out, &bufs[4], 1, p.M * p.N * 4, "out") < 0) {
        release(bufs, 5);
        return NULL;
    }
    p.w = (const uint32_t *)bufs[0].view.buf;
    p.scales = bufs[1].view.buf;
    p.biases = bufs[2].view.buf;
    p.out = (float *)bufs[4].view.buf;
    int which = current_isa(), failed = 0;
    QuantBuffers qb = {NULL, NULL, NULL};
    Py_BEGIN_ALLOW_THREADS
    if (quantize_into(&p, (const float *)bufs[3].view.buf, !gemm && p.bits == 4 && which != ISA_SCALAR, &qb) < 0) {
        failed = 1;
    } else if (p.M > 0 && gemm) {
        parallel_for_grain(qgemm_task, &p, (p.N + 63) / 64, 1, 1);
    } else if (p.M > 0) {
        Py_ssize_t grain = (p.N / (8 * pool.size) + 7) / 8 * 8; /* about 8 claims a thread */
        parallel_for_grain(qmv_task, &p, p.N, 8, grain < 8 ? 8 : grain);
    }
    Py_END_ALLOW_THREADS
    free_quant(&qb);
    release(bufs, 5);
    if (failed) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_q8_qmv(PyObject *self, PyObject *args) { return run_product(args, 0); }
static PyObject *py_q8_qgemm(PyObject *self, PyObject *args) { return run_product(args, 1); }

/* q8_quantize(x, q_out, d_out, sum_out, M, K, group_size): natural order */
static PyObject *py_q8_quantize(PyObject *self, PyObject *args) {
    PyObject *x, *q, *d, *sum;
    Py_ssize_t M, K;
    int group;
    if (!PyArg_ParseTuple(args, "OOOOnni", &x, &q, &d, &sum, &M, &K, &group)) return NULL;
    if (check_args(M, 1, K, 4, group, DT_F32) < 0) return NULL;
    Buf bufs[4];
    memset(bufs, 0, sizeof(bufs));
    Py_ssize_t groups = K / group;
    if (get_buf(x, &bufs[0], 0, M * K * 4, "x") < 0 || get_buf(q, &bufs[1], 1, M * K, "q") < 0 ||
        get_buf(d, &bufs[2], 1, M * groups * 4, "d") < 0 || get_buf(sum, &bufs[3], 1, M * groups * 4, "sum") < 0) {
        release(bufs, 4);
        return NULL;
    }
    QuantTask t = {(const float *)bufs[0].view.buf, (int8_t *)bufs[1].view.buf, (float *)bufs[2].view.buf,
                   (float *)bufs[3].view.buf, K, group, 0};
    Py_BEGIN_ALLOW_THREADS
    quantize_task(&t, 0, M);
    Py_END_ALLOW_THREADS
    release(bufs, 4);
    Py_RETURN_NONE;
}

/* q8_set_isa(name or None): None picks the best path this CPU runs */
static PyObject *py_q8_set_isa(PyObject *self, PyObject *args) {
    const char *name = NULL;
    if (!PyArg_ParseTuple(args, "z", &name)) return NULL;
    if (name == NULL) {
        isa = -1;
        current_isa();
        Py_RETURN_NONE;
    }
    for (int i = 0; i < 3; i++)
        if (strcmp(name, isa_names[i]) == 0) {
            if (!isa_supported(i)) {
                PyErr_Format(PyExc_ValueError, "this CPU cannot run the %s path", name);
                return NULL;
            }
            isa = i;
            Py_RETURN_NONE;
        }
    PyErr_Format(PyExc_ValueError, "unknown int8 path %s (avx512vnni, avx2 or scalar)", name);
    return NULL;
}

static PyObject *py_q8_info(PyObject *self, PyObject *noargs) {
    PyObject *avail = PyList_New(0);
    if (!avail) return NULL;
    for (int i = 2; i >= 0; i--)
        if (isa_supported(i)) {
            PyObject *name = PyUnicode_FromString(isa_names[i]);
            if (!name || PyList_Append(avail, name) < 0) {
                Py_XDECREF(name);
                Py_DECREF(avail);
                return NULL;
            }
            Py_DECREF(name);
        }
    return Py_BuildValue("{s:s,s:N}", "isa", isa_names[current_isa()], "available", avail);
}

PyMethodDef qint8_methods[] = {
    {"q8_qmv", py_q8_qmv, METH_VARARGS, "x @ W^T for a few rows, x quantized to int8 per group"},
    {"q8_qgemm", py_q8_qgemm, METH_VARARGS, "x @ W^T for many rows, x quantized to int8 per group"},
    {"q8_quantize", py_q8_quantize, METH_VARARGS, "x -> (int8 x, scale per group, sum per group)"},
    {"q8_set_isa", py_q8_set_isa, METH_VARARGS, "force the int8 path ('avx512vnni', 'avx2', 'scalar'; None: best)"},
    {"q8_info", py_q8_info, METH_NOARGS, "{'isa': path in use, 'available': paths this CPU runs}"},
    {NULL, NULL, 0, NULL},
};
