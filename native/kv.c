/*
 * The KV cache's native side (see mlx_llava_next/kv_cache.py): one decode step's rope, cache write
 * and attention with no MLX evaluation, and the prompt path's conversions into and out of the cache.
 *
 *   kv_decode:  rope (transformers' rotate-half, from one position's cos/sin row) on q and k, k and
 *               v written into row `pos` of the cache (float16 or float32), then softmax(q K^T *
 *               scale) V over rows [0, pos], each cached row read once for all query heads of its
 *               group (GQA); kv heads split over the thread pool.
 *   kv_store:   float32 rows [1, Hkv, n, D] into cache rows [start, start + n) (float16: RNE).
 *   kv_load:    cache rows [0, n) as float32 [1, Hkv, n, D] (the prompt chunk's attention).
 *
 * With a float32 cache the arithmetic is that of fastpath.c's `attend` after MLX's ReferenceRoPE
 * (same products and sums in the same order, -ffp-contract=off), so results equal the MLX-rope path
 * bit for bit on the AVX2 path. The decode attention has an AVX-512F path too (other summation
 * order: rounding apart); the best path the CPU runs is chosen at run time, scalar C without AVX2.
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
#define KV_X86 1
#include <immintrin.h>
#define KV_AVX2 __attribute__((target("avx2,fma,f16c")))
#else
#define KV_X86 0
#endif

enum { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };
static const char *ISA_NAMES[] = {"scalar", "avx2+fma+f16c", "avx512f"};
static int kv_isa = -1; /* -1: not detected yet */

/* the best path this CPU runs */
static int best_isa(void) {
#if KV_X86
    __builtin_cpu_init();
    if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")))
        return ISA_SCALAR;
    return __builtin_cpu_supports("avx512f") ? ISA_AVX512 : ISA_AVX2;
#else
    return ISA_SCALAR;
#endif
}

static int isa(void) {
    if (kv_isa < 0) kv_isa = best_isa();
    return kv_isa;
}

static int use_avx2(void) { return isa() >= ISA_AVX2; }

/* ---- scalar float16 <-> float32 (round to nearest even, as numpy and F16C) ---------------- */


static uint16_t kv_float_to_half(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000, ax = x & 0x7fffffff;
    if (ax >= 0x7f800000) return (uint16_t)(sign | 0x7c00 | (ax > 0x7f800000 ? 0x200 | ((ax >> 13) & 0x3ff) : 0));
    if (ax >= 0x477ff000) return (uint16_t)(sign | 0x7c00); /* rounds past 65504: infinity */
    if (ax < 0x38800000) { /* below the smallest normal half: a subnormal (or zero) */
        if (ax < 0x33000000) return (uint16_t)sign; /* under half the smallest subnormal */
        uint32_t e = ax >> 23, m = (ax & 0x7fffff) | 0x800000;
        int shift = 126 - (int)e; /* 14..24 */
        uint32_t q = m >> shift, rest = m & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rest > half || (rest == half && (q & 1))) q++;
        return (uint16_t)(sign | q);
    }
    uint32_t q = (ax >> 13) - ((127 - 15) << 10), rest = ax & 0x1fff;
    if (rest > 0x1000 || (rest == 0x1000 && (q & 1))) q++;
    return (uint16_t)(sign | q);
}

/* ---- the decode step ------------------------------------------------------------------------ */

typedef struct {
    const float *q;       /* [H, D], rope applied */
    char *k, *v;          /* cache [Hkv, cap, D] of float16 or float32 */
    int half;             /* 1: float16 cache */
    Py_ssize_t cap, H, Hkv, L, D;
    float scale;
    float *scores;        /* [H, L] scratch */
    float *out;           /* [H, D] */
} Decode;

static inline float row_value(const char *row, int half, Py_ssize_t i) {
    return half ? half_to_float(((const uint16_t *)row)[i]) : ((const float *)row)[i];
}

static void softmax_scalar(float *row, Py_ssize_t n) {
    float top = row[0], total = 0.0f;
    for (Py_ssize_t j = 1; j < n; j++) top = row[j] > top ? row[j] : top;
    for (Py_ssize_t j = 0; j < n; j++) {
        row[j] = expf(row[j] - top);
        total += row[j];
    }
    for (Py_ssize_t j = 0; j < n; j++) row[j] *= 1.0f / total;
}

static void decode_heads_scalar(const Decode *a, Py_ssize_t h0, Py_ssize_t h1) {
    Py_ssize_t G = a->H / a->Hkv, L = a->L, D = a->D, esize = a->half ? 2 : 4;
    for (Py_ssize_t h = h0; h < h1; h++) {
        const char *k = a->k + h * a->cap * D * esize, *v = a->v + h * a->cap * D * esize;
        float *p = a->scores + h * G * L, *out = a->out + h * G * D;
        const float *q = a->q + h * G * D;
        for (Py_ssize_t j = 0; j < L; j++) {
            const char *row = k + j * D * esize;
            for (Py_ssize_t g = 0; g < G; g++) {
                float total = 0.0f;
                for (Py_ssize_t i = 0; i < D; i++) total += q[g * D + i] * row_value(row, a->half, i);
                p[g * L + j] = total * a->scale;
            }
        }
        for (Py_ssize_t g = 0; g < G; g++) softmax_scalar(p + g * L, L);
        memset(out, 0, sizeof(float) * G * D);
        for (Py_ssize_t j = 0; j < L; j++) {
            const char *row = v + j * D * esize;
            for (Py_ssize_t i = 0; i < D; i++) {
                float x = row_value(row, a->half, i);
                for (Py_ssize_t g = 0; g < G; g++) out[g * D + i] += p[g * L + j] * x;
            }
        }
    }
}

#if KV_X86




KV_AVX2 static inline __m256 load8(const char *row, int half, Py_ssize_t i) {
    if (half) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)row + i)));
    return _mm256_loadu_ps((const float *)row + i);
}

/* The group's G query heads against one cached key row: G dot products, the row read once.
   Per head the sums are those of fastpath.c's dot_avx2 (two accumulators, 16 values a step). */
KV_AVX2 static void scores_avx2(const Decode *a, const char *krow, const float *q, Py_ssize_t G, float *p,
                                Py_ssize_t j) {
    Py_ssize_t D = a->D, L = a->L;
    for (Py_ssize_t g0 = 0; g0 < G; g0 += 4) {
        Py_ssize_t gn = G - g0 < 4 ? G - g0 : 4;
        __m256 s[4][2];
        for (Py_ssize_t g = 0; g < 4; g++) s[g][0] = s[g][1] = _mm256_setzero_ps();
        Py_ssize_t i = 0;
        for (; i + 16 <= D; i += 16) {
            __m256 r0 = load8(krow, a->half, i), r1 = load8(krow, a->half, i + 8);
            for (Py_ssize_t g = 0; g < gn; g++) {
                const float *qg = q + (g0 + g) * D;
                s[g][0] = _mm256_fmadd_ps(_mm256_loadu_ps(qg + i), r0, s[g][0]);
                s[g][1] = _mm256_fmadd_ps(_mm256_loadu_ps(qg + i + 8), r1, s[g][1]);
            }
        }
        for (Py_ssize_t g = 0; g < gn; g++) {
            const float *qg = q + (g0 + g) * D;
            float total = hsum256(_mm256_add_ps(s[g][0], s[g][1]));
            for (Py_ssize_t t = i; t < D; t++) total += qg[t] * row_value(krow, a->half, t);
            p[(g0 + g) * L + j] = total * a->scale;
        }
    }
}

#define VBLOCK 32     /* value rows widened to float32 at a time (32 x 128 floats: 16 KB, in L1) */
#define VMAX_DIM 256

/* out[g] += sum_j p[g, j] v_j for the group's heads: VBLOCK rows widened once, then per head and
   32 columns four accumulators in registers over the block. Each output value takes the same fmadds
   in the same order (j ascending) as the row-at-a-time loop, so the result is the same bit for bit. */
KV_AVX2 static void values_blocked_avx2(const Decode *a, const char *v, const float *p, float *out, Py_ssize_t G) {
    Py_ssize_t L = a->L, D = a->D, esize = a->half ? 2 : 4;
    float block[VBLOCK * VMAX_DIM];
    for (Py_ssize_t j0 = 0; j0 < L; j0 += VBLOCK) {
        Py_ssize_t n = L - j0 < VBLOCK ? L - j0 : VBLOCK;
        const float *rows;
        if (a->half) {
            for (Py_ssize_t j = 0; j < n; j++) {
                const char *row = v + (j0 + j) * D * esize;
                for (Py_ssize_t i = 0; i < D; i += 8) _mm256_storeu_ps(block + j * D + i, load8(row, 1, i));
            }
            rows = block;
        } else {
            rows = (const float *)(v + j0 * D * esize);
        }
        for (Py_ssize_t g = 0; g < G; g++) {
            const float *w = p + g * L + j0;
            float *o = out + g * D;
            for (Py_ssize_t i = 0; i < D; i += 32) {
                __m256 s0 = _mm256_loadu_ps(o + i), s1 = _mm256_loadu_ps(o + i + 8);
                __m256 s2 = _mm256_loadu_ps(o + i + 16), s3 = _mm256_loadu_ps(o + i + 24);
                for (Py_ssize_t j = 0; j < n; j++) {
                    const float *r = rows + j * D + i;
                    __m256 wj = _mm256_set1_ps(w[j]);
                    s0 = _mm256_fmadd_ps(wj, _mm256_loadu_ps(r), s0);
                    s1 = _mm256_fmadd_ps(wj, _mm256_loadu_ps(r + 8), s1);
                    s2 = _mm256_fmadd_ps(wj, _mm256_loadu_ps(r + 16), s2);
                    s3 = _mm256_fmadd_ps(wj, _mm256_loadu_ps(r + 24), s3);
                }
                _mm256_storeu_ps(o + i, s0);
                _mm256_storeu_ps(o + i + 8, s1);
                _mm256_storeu_ps(o + i + 16, s2);
                _mm256_storeu_ps(o + i + 24, s3);
            }
        }
    }
}

KV_AVX2 static void decode_heads_avx2(const Decode *a, Py_ssize_t h0, Py_ssize_t h1) {
    Py_ssize_t G = a->H / a->Hkv, L = a->L, D = a->D, esize = a->half ? 2 : 4;
    for (Py_ssize_t h = h0; h < h1; h++) {
        const char *k = a->k + h * a->cap * D * esize, *v = a->v + h * a->cap * D * esize;
        float *p = a->scores + h * G * L, *out = a->out + h * G * D;
        const float *q = a->q + h * G * D;
        for (Py_ssize_t j = 0; j < L; j++) scores_avx2(a, k + j * D * esize, q, G, p, j);
        for (Py_ssize_t g = 0; g < G; g++) softmax_row_avx2(p + g * L, L, L);
        memset(out, 0, sizeof(float) * G * D);
        if (a->half && D % 32 == 0 && D <= VMAX_DIM) { /* float32 rows: streaming them measured faster */
            values_blocked_avx2(a, v, p, out, G);
            continue;
        }
        for (Py_ssize_t j = 0; j < L; j++) {
            const char *row = v + j * D * esize;
            Py_ssize_t i = 0;
            for (; i + 8 <= D; i += 8) {
                __m256 x = load8(row, a->half, i);
                for (Py_ssize_t g = 0; g < G; g++) {
                    float *o = out + g * D + i;
                    _mm256_storeu_ps(o, _mm256_fmadd_ps(_mm256_set1_ps(p[g * L + j]), x, _mm256_loadu_ps(o)));
                }
            }
            for (; i < D; i++) {
                float x = row_value(row, a->half, i);
                for (Py_ssize_t g = 0; g < G; g++) out[g * D + i] += p[g * L + j] * x;
            }
        }
    }
}
#endif

#if KV_X86
#define KV_AVX512 __attribute__((target("avx512f,avx2,fma,f16c")))

/* e^x for 16 floats: exp256's polynomial (common.h) */
KV_AVX512 static inline __m512 kv_exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.3f));
    __m512 fx = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                     _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
    x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), x);
    __m512 y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
    __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(fx), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(y, _mm512_castsi512_ps(e));
}

KV_AVX512 static void softmax16(float *row, Py_ssize_t n) {
    Py_ssize_t j = 0;
    __m512 top16 = _mm512_set1_ps(-INFINITY);
    for (; j + 16 <= n; j += 16) top16 = _mm512_max_ps(top16, _mm512_loadu_ps(row + j));
    float top = _mm512_reduce_max_ps(top16);
    for (; j < n; j++) top = row[j] > top ? row[j] : top;
    __m512 shift = _mm512_set1_ps(top), sum16 = _mm512_setzero_ps();
    for (j = 0; j + 16 <= n; j += 16) {
        __m512 e = kv_exp16(_mm512_sub_ps(_mm512_loadu_ps(row + j), shift));
        _mm512_storeu_ps(row + j, e);
        sum16 = _mm512_add_ps(sum16, e);
    }
    float total = _mm512_reduce_add_ps(sum16);
    for (; j < n; j++) {
        row[j] = expf(row[j] - top);
        total += row[j];
    }
    __m512 inv = _mm512_set1_ps(1.0f / total);
    for (j = 0; j + 16 <= n; j += 16) _mm512_storeu_ps(row + j, _mm512_mul_ps(_mm512_loadu_ps(row + j), inv));
    for (; j < n; j++) row[j] *= 1.0f / total;
}

KV_AVX512 static inline __m512 load16(const char *row, int half, Py_ssize_t i) {
    if (half) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)row + i)));
    return _mm512_loadu_ps((const float *)row + i);
}

/* AVX-512 decode heads (D a multiple of 64): per kv head, the G query heads' scores a cached key row
   at a time (the row widened once), softmax, then the values VBLOCK rows at a time (float16 rows
   widened once) with register accumulators per 64 columns. */
KV_AVX512 static void decode_heads_avx512(const Decode *a, Py_ssize_t h0, Py_ssize_t h1) {
    Py_ssize_t G = a->H / a->Hkv, L = a->L, D = a->D, esize = a->half ? 2 : 4;
    float block[VBLOCK * VMAX_DIM];
    for (Py_ssize_t h = h0; h < h1; h++) {
        const char *k = a->k + h * a->cap * D * esize, *v = a->v + h * a->cap * D * esize;
        float *p = a->scores + h * G * L, *out = a->out + h * G * D;
        const float *q = a->q + h * G * D;
        for (Py_ssize_t j = 0; j < L; j++) {
            const char *row = k + j * D * esize;
            for (Py_ssize_t g0 = 0; g0 < G; g0 += 4) {
                Py_ssize_t gn = G - g0 < 4 ? G - g0 : 4;
                __m512 s[4];
                for (Py_ssize_t g = 0; g < 4; g++) s[g] = _mm512_setzero_ps();
                for (Py_ssize_t i = 0; i < D; i += 16) {
                    __m512 r = load16(row, a->half, i);
                    for (Py_ssize_t g = 0; g < gn; g++)
                        s[g] = _mm512_fmadd_ps(_mm512_loadu_ps(q + (g0 + g) * D + i), r, s[g]);
                }
                for (Py_ssize_t g = 0; g < gn; g++) p[(g0 + g) * L + j] = _mm512_reduce_add_ps(s[g]) * a->scale;
            }
        }
        for (Py_ssize_t g = 0; g < G; g++) softmax16(p + g * L, L);
        memset(out, 0, sizeof(float) * G * D);
        for (Py_ssize_t j0 = 0; j0 < L; j0 += VBLOCK) {
            Py_ssize_t n = L - j0 < VBLOCK ? L - j0 : VBLOCK;
            const float *rows;
            if (a->half) {
                for (Py_ssize_t j = 0; j < n; j++)
                    for (Py_ssize_t i = 0; i < D; i += 16)
                        _mm512_storeu_ps(block + j * D + i, load16(v + (j0 + j) * D * esize, 1, i));
                rows = block;
            } else {
                rows = (const float *)(v + j0 * D * esize);
            }
            for (Py_ssize_t g = 0; g < G; g++) {
                const float *w = p + g * L + j0;
                float *o = out + g * D;
                for (Py_ssize_t i = 0; i < D; i += 64) {
                    __m512 s0 = _mm512_loadu_ps(o + i), s1 = _mm512_loadu_ps(o + i + 16);
                    __m512 s2 = _mm512_loadu_ps(o + i + 32), s3 = _mm512_loadu_ps(o + i + 48);
                    for (Py_ssize_t j = 0; j < n; j++) {
                        const float *r = rows + j * D + i;
                        __m512 wj = _mm512_set1_ps(w[j]);
                        s0 = _mm512_fmadd_ps(wj, _mm512_loadu_ps(r), s0);
                        s1 = _mm512_fmadd_ps(wj, _mm512_loadu_ps(r + 16), s1);
                        s2 = _mm512_fmadd_ps(wj, _mm512_loadu_ps(r + 32), s2);
                        s3 = _mm512_fmadd_ps(wj, _mm512_loadu_ps(r + 48), s3);
                    }
                    _mm512_storeu_ps(o + i, s0);
                    _mm512_storeu_ps(o + i + 16, s1);
                    _mm512_storeu_ps(o + i + 32, s2);
                    _mm512_storeu_ps(o + i + 48, s3);
                }
            }
        }
    }
}
#endif

static void decode_task(void *arg, Py_ssize_t h0, Py_ssize_t h1) {
    const Decode *a = (const Decode *)arg;
#if KV_X86
    if (isa() == ISA_AVX512 && a->D % 64 == 0 && a->D <= VMAX_DIM) {
        decode_heads_avx512(a, h0, h1);
        return;
    }
    if (use_avx2()) {
        decode_heads_avx2(a, h0, h1);
        return;
    }
#endif
    decode_heads_scalar(a, h0, h1);
}

/* transformers' rotate-half on `heads` rows of D values: the first `dims` values rotate, in the
   products and sums of rope.ReferenceRoPE (x1 * cos - x2 * sin, x2 * cos + x1 * sin) */
static void rope_rows(float *x, Py_ssize_t heads, Py_ssize_t D, Py_ssize_t dims, const float *cos, const float *sin) {
    Py_ssize_t half = dims / 2;
    for (Py_ssize_t h = 0; h < heads; h++) {
        float *r = x + h * D;
        for (Py_ssize_t i = 0; i < half; i++) {
            float x1 = r[i], x2 = r[i + half];
            float a = x1 * cos[i], b = x2 * sin[i], c = x2 * cos[i], d = x1 * sin[i];
            r[i] = a - b;
            r[i + half] = c + d;
        }
    }
}

/* one row of D float32 values into a cache row */
static void store_row(const float *src, char *dst, int half, Py_ssize_t D);

/* ---- argument handling ---------------------------------------------------------------------- */

typedef struct {
    Py_buffer view;
    int held;
} KvBuf;

static void kv_release(KvBuf *b, int n) {
    for (int i = 0; i < n; i++)
        if (b[i].held) PyBuffer_Release(&b[i].view);
}

/* a C-contiguous float32 buffer of exactly `count` values */
static int f32_buf(PyObject *o, KvBuf *b, int writable, Py_ssize_t count, const char *name) {
    if (PyObject_GetBuffer(o, &b->view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0)) < 0)
        return -1;
    b->held = 1;
    if (b->view.itemsize != 4 || !b->view.format || strcmp(b->view.format, "f") != 0 || b->view.len != count * 4) {
        PyErr_Format(PyExc_ValueError, "%s: expected %zd float32 values (C order)", name, count);
        return -1;
    }
    return 0;
}

/* a writable C-contiguous cache buffer [1, Hkv, cap, D] of float16 ('e') or float32 ('f') */
static int cache_buf(PyObject *o, KvBuf *b, int writable, const char *name, Py_ssize_t *Hkv, Py_ssize_t *cap,
                     Py_ssize_t *D, int *half) {
    if (PyObject_GetBuffer(o, &b->view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | PyBUF_ND | (writable ? PyBUF_WRITABLE : 0)) < 0)
        return -1;
    b->held = 1;
    const char *f = b->view.format;
    int is_half = f && strcmp(f, "e") == 0 && b->view.itemsize == 2;
    int is_float = f && strcmp(f, "f") == 0 && b->view.itemsize == 4;
    if (b->view.ndim != 4 || b->view.shape[0] != 1 || !(is_half || is_float)) {
        PyErr_Format(PyExc_ValueError, "%s: expected a float16 or float32 cache [1, kv heads, capacity, head dim] in C order",
                     name);
        return -1;
    }
    *Hkv = b->view.shape[1];
    *cap = b->view.shape[2];
    *D = b->view.shape[3];
    *half = is_half;
    return 0;
}

/*
 * kv_decode(q [H*D], k [Hkv*D], v [Hkv*D] float32 (q and k are roped in place), cos, sin [dims/2]
 * float32, kcache, vcache [1, Hkv, cap, D], pos, out [H*D] float32, scale, dims)
 */
static PyObject *py_kv_decode(PyObject *self, PyObject *args) {
    PyObject *qo, *ko, *vo, *co, *so, *kco, *vco, *oo;
    Py_ssize_t pos, dims;
    float scale;
    if (!PyArg_ParseTuple(args, "OOOOOOOnOfn", &qo, &ko, &vo, &co, &so, &kco, &vco, &pos, &oo, &scale, &dims))
        return NULL;
    KvBuf b[8];
    memset(b, 0, sizeof(b));
    Py_ssize_t Hkv, cap, D, Hkv2, cap2, D2;
    int half, half2;
    PyObject *result = NULL;
    float *scores = NULL;
    if (cache_buf(kco, &b[0], 1, "kcache", &Hkv, &cap, &D, &half) < 0) goto done;
    if (cache_buf(vco, &b[1], 1, "vcache", &Hkv2, &cap2, &D2, &half2) < 0) goto done;
    if (Hkv2 != Hkv || cap2 != cap || D2 != D || half2 != half) {
        PyErr_SetString(PyExc_ValueError, "kcache and vcache differ in shape or dtype");
        goto done;
    }
    if (pos < 0 || pos >= cap) {
        PyErr_Format(PyExc_ValueError, "pos %zd outside the cache's %zd rows", pos, cap);
        goto done;
    }
    if (dims < 0 || dims > D || dims % 2) {
        PyErr_Format(PyExc_ValueError, "rope dims %zd: expected an even number <= head dim %zd", dims, D);
        goto done;
    }
    if (PyObject_GetBuffer(qo, &b[2].view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | PyBUF_WRITABLE) < 0) goto done;
    b[2].held = 1;
    Py_ssize_t H = b[2].view.len / 4 / (D ? D : 1);
    if (D == 0 || b[2].view.itemsize != 4 || strcmp(b[2].view.format, "f") != 0 || H * D * 4 != b[2].view.len ||
        H % Hkv != 0) {
        PyErr_SetString(PyExc_ValueError, "q: expected float32 [heads * head dim], heads a multiple of the kv heads");
        goto done;
    }
    if (f32_buf(ko, &b[3], 1, Hkv * D, "k") < 0 || f32_buf(vo, &b[4], 0, Hkv * D, "v") < 0 ||
        f32_buf(co, &b[5], 0, dims / 2, "cos") < 0 || f32_buf(so, &b[6], 0, dims / 2, "sin") < 0 ||
        f32_buf(oo, &b[7], 1, H * D, "out") < 0)
        goto done;
    scores = (float *)malloc(sizeof(float) * H * (pos + 1));
    if (!scores) {
        PyErr_NoMemory();
        goto done;
    }
    Decode a;
    a.q = (const float *)b[2].view.buf;
    a.k = (char *)b[0].view.buf;
    a.v = (char *)b[1].view.buf;
    a.half = half;
    a.cap = cap;
    a.H = H;
    a.Hkv = Hkv;
    a.L = pos + 1;
    a.D = D;
    a.scale = scale;
    a.scores = scores;
    a.out = (float *)b[7].view.buf;
    float *q = (float *)b[2].view.buf, *k = (float *)b[3].view.buf;
    const float *v = (const float *)b[4].view.buf, *cs = (const float *)b[5].view.buf, *sn = (const float *)b[6].view.buf;
    Py_ssize_t esize = half ? 2 : 4;
    Py_BEGIN_ALLOW_THREADS
    rope_rows(q, H, D, dims, cs, sn);
    rope_rows(k, Hkv, D, dims, cs, sn);
    for (Py_ssize_t h = 0; h < Hkv; h++) {
        store_row(k + h * D, a.k + (h * cap + pos) * D * esize, half, D);
        store_row(v + h * D, a.v + (h * cap + pos) * D * esize, half, D);
    }
    parallel_for(decode_task, &a, Hkv, 1);
    Py_END_ALLOW_THREADS
    Py_INCREF(Py_None);
    result = Py_None;
done:
    free(scores);
    kv_release(b, 8);
    return result;
}

/* ---- the prompt path's conversions ---------------------------------------------------------- */

#if KV_X86
KV_AVX2 static void store_row_avx2(const float *src, char *dst, int half, Py_ssize_t D) {
    if (!half) {
        memcpy(dst, src, sizeof(float) * D);
        return;
    }
    uint16_t *d = (uint16_t *)dst;
    Py_ssize_t i = 0;
    for (; i + 8 <= D; i += 8)
        _mm_storeu_si128((__m128i *)(d + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < D; i++) d[i] = kv_float_to_half(src[i]);
}

KV_AVX2 static void load_row_avx2(const char *src, float *dst, int half, Py_ssize_t D) {
    Py_ssize_t i = 0;
    for (; i + 8 <= D; i += 8) _mm256_storeu_ps(dst + i, load8(src, half, i));
    for (; i < D; i++) dst[i] = row_value(src, half, i);
}
#endif

static void store_row(const float *src, char *dst, int half, Py_ssize_t D) {
#if KV_X86
    if (use_avx2()) {
        store_row_avx2(src, dst, half, D);
        return;
    }
#endif
    if (!half) {
        memcpy(dst, src, sizeof(float) * D);
        return;
    }
    for (Py_ssize_t i = 0; i < D; i++) ((uint16_t *)dst)[i] = kv_float_to_half(src[i]);
}

static void load_row(const char *src, float *dst, int half, Py_ssize_t D) {
#if KV_X86
    if (use_avx2()) {
        load_row_avx2(src, dst, half, D);
        return;
    }
#endif
    for (Py_ssize_t i = 0; i < D; i++) dst[i] = row_value(src, half, i);
}

typedef struct {
    float *rows;   /* [Hkv, n, D] float32 */
    char *cache;   /* [Hkv, cap, D] */
    Py_ssize_t n, cap, D, start;
    int half, to_cache;
} Copy;

static void copy_task(void *arg, Py_ssize_t r0, Py_ssize_t r1) {
    const Copy *c = (const Copy *)arg;
    Py_ssize_t esize = c->half ? 2 : 4;
    for (Py_ssize_t r = r0; r < r1; r++) { /* r = head * n + row */
        Py_ssize_t h = r / c->n, j = r % c->n;
        float *f = c->rows + r * c->D;
        char *slot = c->cache + (h * c->cap + c->start + j) * c->D * esize;
        if (c->to_cache) store_row(f, slot, c->half, c->D);
        else load_row(slot, f, c->half, c->D);
    }
}

static PyObject *copy_rows(PyObject *rows_o, PyObject *cache_o, Py_ssize_t start, Py_ssize_t n, int to_cache) {
    KvBuf b[2];
    memset(b, 0, sizeof(b));
    Py_ssize_t Hkv, cap, D;
    int half;
    PyObject *result = NULL;
    if (cache_buf(cache_o, &b[0], to_cache, "cache", &Hkv, &cap, &D, &half) < 0) goto done;
    if (PyObject_GetBuffer(rows_o, &b[1].view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (to_cache ? 0 : PyBUF_WRITABLE)) < 0)
        goto done;
    b[1].held = 1;
    if (b[1].view.itemsize != 4 || strcmp(b[1].view.format, "f") != 0 || D == 0 || Hkv == 0 ||
        b[1].view.len % (Hkv * D * 4) != 0) {
        PyErr_SetString(PyExc_ValueError, "rows: expected float32 [1, kv heads, n, head dim] in C order");
        goto done;
    }
    if (n < 0) n = b[1].view.len / (Hkv * D * 4);
    if (n * Hkv * D * 4 != b[1].view.len || start < 0 || start + n > cap) {
        PyErr_Format(PyExc_ValueError, "rows [%zd, %zd) do not fit the cache's %zd rows or the buffer", start, start + n, cap);
        goto done;
    }
    Copy c = {(float *)b[1].view.buf, (char *)b[0].view.buf, n, cap, D, start, half, to_cache};
    Py_BEGIN_ALLOW_THREADS
    parallel_for(copy_task, &c, Hkv * n, 1);
    Py_END_ALLOW_THREADS
    Py_INCREF(Py_None);
    result = Py_None;
done:
    kv_release(b, 2);
    return result;
}

/* kv_store(rows float32 [1, Hkv, n, D], cache, start): cache rows [start, start + n) = rows */
static PyObject *py_kv_store(PyObject *self, PyObject *args) {
    PyObject *ro, *co;
    Py_ssize_t start;
    if (!PyArg_ParseTuple(args, "OOn", &ro, &co, &start)) return NULL;
    return copy_rows(ro, co, start, -1, 1);
}

/* kv_load(cache, out float32 [1, Hkv, n, D]): out = cache rows [0, n) as float32 */
static PyObject *py_kv_load(PyObject *self, PyObject *args) {
    PyObject *co, *oo;
    if (!PyArg_ParseTuple(args, "OO", &co, &oo)) return NULL;
    return copy_rows(oo, co, 0, -1, 0);
}

/* kv_set_simd(name or None): force a path ('scalar', 'avx2+fma+f16c', 'avx512f'; ValueError if this
   CPU cannot run it) or, with None, the best one; returns the path in use */
static PyObject *py_kv_set_simd(PyObject *self, PyObject *args) {
    const char *name = NULL;
    if (!PyArg_ParseTuple(args, "|z", &name)) return NULL;
    int best = best_isa();
    if (!name) {
        kv_isa = best;
    } else {
        int want = -1;
        for (int i = 0; i < 3; i++)
            if (strcmp(name, ISA_NAMES[i]) == 0) want = i;
        if (want < 0 || want > best) {
            PyErr_Format(PyExc_ValueError, "kv path %s: this CPU runs %s at best", name, ISA_NAMES[best]);
            return NULL;
        }
        kv_isa = want;
    }
    return PyUnicode_FromString(ISA_NAMES[kv_isa]);
}

/* kv_simd() -> (the path in use, [the paths this CPU runs]) */
static PyObject *py_kv_simd(PyObject *self, PyObject *noargs) {
    int best = best_isa();
    PyObject *paths = PyList_New(best + 1);
    if (!paths) return NULL;
    for (int i = 0; i <= best; i++) PyList_SET_ITEM(paths, i, PyUnicode_FromString(ISA_NAMES[i]));
    return Py_BuildValue("(sN)", ISA_NAMES[isa()], paths);
}

PyMethodDef kv_methods[] = {
    {"kv_decode", py_kv_decode, METH_VARARGS, "one decode step: rope q and k, write k and v at pos, attend over rows [0, pos]"},
    {"kv_store", py_kv_store, METH_VARARGS, "float32 rows [1, Hkv, n, D] into cache rows [start, start + n)"},
    {"kv_load", py_kv_load, METH_VARARGS, "cache rows [0, n) into float32 [1, Hkv, n, D]"},
    {"kv_set_simd", py_kv_set_simd, METH_VARARGS, "force a path of the KV kernels by name, or (None) the best"},
    {"kv_simd", py_kv_simd, METH_NOARGS, "(the KV kernels' path in use, the paths this CPU runs)"},
    {NULL, NULL, 0, NULL},
};
