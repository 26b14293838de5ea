/*
 * The SIMD kernels of qint8.c, compiled once per instruction set: qint8.c defines
 *   SFX(name)   the function name with the ISA's suffix,
 *   TARGET      the function-level target attribute,
 *   DOT(acc, u, s)    acc (8 x int32) += sums of 4 products u8 * s8 (vpdpbusd, or its AVX2 sum),
 *   DOT8(acc, u, s)   the same for u8 values up to 255 (AVX2: no int16 overflow),
 *   MR          the rows of x a GEMM micro-kernel keeps in registers,
 *   DOTZ(acc, w, p) (optional) acc (16 x int32, zmm) += u8 w by the 4 s8 bytes at p broadcast: the
 *               GEMM then runs on 512-bit registers,
 * and includes this file. Nothing here is used without those definitions.
 */

/* ---- decode: a few rows of x against streamed weight rows ----------------------------------- */

/* One row's scales and biases as float32 (F16C / shifts for half precision). */
TARGET static void SFX(row_params)(const Q8Problem *p, Py_ssize_t row, float *s, float *b) {
    const Py_ssize_t groups = p->K / p->group;
    if (p->dtype == DT_F32 || groups % 8 != 0) {
        scalar_row_params(p, row, s, b);
        return;
    }
    const uint16_t *sh = (const uint16_t *)p->scales + row * groups, *bh = (const uint16_t *)p->biases + row * groups;
    for (Py_ssize_t g = 0; g < groups; g += 8) {
        __m128i sv = _mm_loadu_si128((const __m128i *)(sh + g)), bv = _mm_loadu_si128((const __m128i *)(bh + g));
        if (p->dtype == DT_F16) {
            _mm256_storeu_ps(s + g, _mm256_cvtph_ps(sv));
            _mm256_storeu_ps(b + g, _mm256_cvtph_ps(bv));
        } else {
            _mm256_storeu_ps(s + g, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(sv), 16)));
            _mm256_storeu_ps(b + g, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bv), 16)));
        }
    }
}

/* sum_g b[g] * xsum[g] */
TARGET static inline float SFX(bias_dot)(const float *b, const float *xs, Py_ssize_t groups) {
    __m256 acc = _mm256_setzero_ps();
    Py_ssize_t g = 0;
    for (; g + 8 <= groups; g += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(b + g), _mm256_loadu_ps(xs + g), acc);
    float total = hsum256(acc);
    for (; g < groups; g++) total += b[g] * xs[g];
    return total;
}

/*
 * MB rows of x (from m0) against weight row w. Per 64 values ("chunk"): two 32-byte operands
 * wa, wb of u8 weights. 4-bit: 32 bytes hold the chunk; wa = low nibbles, wb = high nibbles, and x
 * was permuted to match (see permute64 in qint8.c). 8-bit: the chunk's two halves, x natural.
 * The int32 lanes of a chunk's dot product are converted and scaled once per group.
 */
__attribute__((always_inline)) TARGET static inline void SFX(gemv_block)(
    const Q8Problem *p, const uint8_t *w, const float *s, const float *b, Py_ssize_t n, Py_ssize_t m0,
    const int MB, const int BITS, const int GROUP) {
    const Py_ssize_t K = p->K, groups = K / GROUP, chunks = K / 64;
    const __m256i nib = _mm256_set1_epi8(0x0f);
    __m256 acc0[4], acc1[4];
    for (int m = 0; m < MB; m++) acc0[m] = acc1[m] = _mm256_setzero_ps();
    const int8_t *xq = p->xq + m0 * K;
    const float *d = p->d + m0 * groups;
    for (Py_ssize_t c = 0; c < chunks; c++) {
        __m256i wa, wb;
        if (BITS == 4) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(w + 32 * c));
            wa = _mm256_and_si256(v, nib);
            wb = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);
        } else {
            wa = _mm256_loadu_si256((const __m256i *)(w + 64 * c));
            wb = _mm256_loadu_si256((const __m256i *)(w + 64 * c + 32));
        }
        for (int m = 0; m < MB; m++) {
            const int8_t *x = xq + m * K + 64 * c;
            const float *dm = d + m * groups;
            __m256i xa = _mm256_loadu_si256((const __m256i *)x), xb = _mm256_loadu_si256((const __m256i *)(x + 32));
            __m256i zero = _mm256_setzero_si256();
            if (GROUP == 32) {
                float sd0 = s[2 * c] * dm[2 * c], sd1 = s[2 * c + 1] * dm[2 * c + 1];
                if (BITS == 4) { /* lanes 0-3: group 2c, lanes 4-7: group 2c + 1 (both operands) */
                    __m256i i = DOT(DOT(zero, wa, xa), wb, xb);
                    __m256 sd = _mm256_set_m128(_mm_set1_ps(sd1), _mm_set1_ps(sd0));
                    if (c & 1) acc1[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), sd, acc1[m]);
                    else acc0[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), sd, acc0[m]);
                } else {
                    acc0[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(DOT8(zero, wa, xa)), _mm256_set1_ps(sd0), acc0[m]);
                    acc1[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(DOT8(zero, wb, xb)), _mm256_set1_ps(sd1), acc1[m]);
                }
            } else {
                __m256i i = BITS == 4 ? DOT(DOT(zero, wa, xa), wb, xb) : DOT8(DOT8(zero, wa, xa), wb, xb);
                if (GROUP == 64) {
                    __m256 sd = _mm256_set1_ps(s[c] * dm[c]);
                    if (c & 1) acc1[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), sd, acc1[m]);
                    else acc0[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), sd, acc0[m]);
                } else { /* 128: two chunks a group, scaled separately (same scale) */
                    __m256 sd = _mm256_set1_ps(s[c >> 1] * dm[c >> 1]);
                    if (c & 1) acc1[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), sd, acc1[m]);
                    else acc0[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), sd, acc0[m]);
                }
            }
        }
    }
    for (int m = 0; m < MB; m++)
        p->out[(m0 + m) * p->N + n] =
            hsum256(_mm256_add_ps(acc0[m], acc1[m])) + SFX(bias_dot)(b, p->xsum + (m0 + m) * groups, groups);
}

#define GEMV_CASE(MB, BITS, GROUP) SFX(gemv_block)(p, w, s, b, n, m0, MB, BITS, GROUP)
#define GEMV_GROUPS(MB, BITS)                                       \
    do {                                                            \
        if (p->group == 32) GEMV_CASE(MB, BITS, 32);                \
        else if (p->group == 64) GEMV_CASE(MB, BITS, 64);           \
        else GEMV_CASE(MB, BITS, 128);                              \
    } while (0)

TARGET static void SFX(gemv_rows)(const Q8Problem *p, Py_ssize_t n0, Py_ssize_t n1) {
    const Py_ssize_t words = p->K * p->bits / 32;
    float s[4096], b[4096];
    for (Py_ssize_t n = n0; n < n1; n++) {
        const uint8_t *w = (const uint8_t *)(p->w + n * words);
        SFX(row_params)(p, n, s, b);
        for (Py_ssize_t m0 = 0; m0 < p->M; m0 += 4) {
            Py_ssize_t mb = p->M - m0 < 4 ? p->M - m0 : 4;
            if (p->bits == 4) {
                if (mb == 4) GEMV_GROUPS(4, 4);
                else if (mb == 3) GEMV_GROUPS(3, 4);
                else if (mb == 2) GEMV_GROUPS(2, 4);
                else GEMV_GROUPS(1, 4);
            } else {
                if (mb == 4) GEMV_GROUPS(4, 8);
                else if (mb == 3) GEMV_GROUPS(3, 8);
                else if (mb == 2) GEMV_GROUPS(2, 8);
                else GEMV_GROUPS(1, 8);
            }
        }
    }
}
#undef GEMV_CASE
#undef GEMV_GROUPS

/* ---- prefill: packed weight panels x register-blocked rows of x ------------------------------ */

/*
 * rows (<= MR) rows of x against one packed 16-row panel: wp is [k/4][16 rows][4 bytes] over the
 * panel's kc values, sp/bp [groups][16] its scales and biases. c is [rows][ldc] float32, updated
 * with scale * d * dot + bias * xsum once per group.
 */
#define Q8_ROW_STEP(m)                                                             \
    if (ROWS > m) {                                                                \
        int32_t quad_;                                                             \
        memcpy(&quad_, xg + m * ldx + 4 * k4, 4);                                  \
        __m256i xb_ = _mm256_set1_epi32(quad_);                                    \
        if (BITS == 4) {                                                           \
            a##m##0 = DOT(a##m##0, w0, xb_);                                       \
            a##m##1 = DOT(a##m##1, w1, xb_);                                       \
        } else {                                                                   \
            a##m##0 = DOT8(a##m##0, w0, xb_);                                      \
            a##m##1 = DOT8(a##m##1, w1, xb_);                                      \
        }                                                                          \
    }
#define Q8_ROW_STORE(m)                                                                                   \
    if (ROWS > m) {                                                                                       \
        __m256 dm = _mm256_set1_ps(d[m * ldg + g]), xm = _mm256_set1_ps(xs[m * ldg + g]);                 \
        float *cm = c + m * ldc;                                                                          \
        __m256 c0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a##m##0), _mm256_mul_ps(s0, dm), _mm256_loadu_ps(cm)); \
        __m256 c1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a##m##1), _mm256_mul_ps(s1, dm), _mm256_loadu_ps(cm + 8)); \
        _mm256_storeu_ps(cm, _mm256_fmadd_ps(b0, xm, c0));                                                \
        _mm256_storeu_ps(cm + 8, _mm256_fmadd_ps(b1, xm, c1));                                            \
    }

/*
 * ROWS (<= MR <= 8) rows of x against one packed 16-row panel: wp is [k/4][16 rows][4 bytes] over
 * the panel's kc values, sp/bp [groups][16] its scales and biases. c is [ROWS][ldc] float32,
 * updated with scale * d * dot + bias * xsum once per group. The accumulators are named variables
 * (an array of them made gcc copy registers around every vpdpbusd).
 */
__attribute__((always_inline)) TARGET static inline void SFX(gemm_micro)(
    const uint8_t *wp, const float *sp, const float *bp, const int8_t *x, Py_ssize_t ldx, const float *d,
    const float *xs, Py_ssize_t ldg, float *c, Py_ssize_t ldc, Py_ssize_t ngroups, const int ROWS, const int GROUP,
    const int BITS) {
    for (Py_ssize_t g = 0; g < ngroups; g++) {
        const __m256i z = _mm256_setzero_si256();
        __m256i a00 = z, a01 = z, a10 = z, a11 = z, a20 = z, a21 = z, a30 = z, a31 = z;
        __m256i a40 = z, a41 = z, a50 = z, a51 = z, a60 = z, a61 = z, a70 = z, a71 = z;
        const int8_t *xg = x + g * GROUP;
        for (int k4 = 0; k4 < GROUP / 4; k4++, wp += 64) {
            __m256i w0 = _mm256_loadu_si256((const __m256i *)wp), w1 = _mm256_loadu_si256((const __m256i *)(wp + 32));
            Q8_ROW_STEP(0) Q8_ROW_STEP(1) Q8_ROW_STEP(2) Q8_ROW_STEP(3)
            Q8_ROW_STEP(4) Q8_ROW_STEP(5) Q8_ROW_STEP(6) Q8_ROW_STEP(7)
        }
        __m256 s0 = _mm256_loadu_ps(sp + 16 * g), s1 = _mm256_loadu_ps(sp + 16 * g + 8);
        __m256 b0 = _mm256_loadu_ps(bp + 16 * g), b1 = _mm256_loadu_ps(bp + 16 * g + 8);
        Q8_ROW_STORE(0) Q8_ROW_STORE(1) Q8_ROW_STORE(2) Q8_ROW_STORE(3)
        Q8_ROW_STORE(4) Q8_ROW_STORE(5) Q8_ROW_STORE(6) Q8_ROW_STORE(7)
    }
}
#undef Q8_ROW_STEP
#undef Q8_ROW_STORE

/* Unpack 16 weight rows [k0, k0 + kc) into the panel layout (rows past N: zeros). */
TARGET static void SFX(pack_panel)(const Q8Problem *p, Py_ssize_t n0, Py_ssize_t k0, Py_ssize_t kc, uint8_t *wp,
                                   uint8_t *row) {
    const Py_ssize_t bytes_per_row = p->K * p->bits / 8;
    const __m128i nib = _mm_set1_epi8(0x0f);
    for (int r = 0; r < 16; r++) {
        if (n0 + r >= p->N) {
            memset(row, 0, kc);
        } else if (p->bits == 8) {
            memcpy(row, (const uint8_t *)p->w + (n0 + r) * bytes_per_row + k0, kc);
        } else {
            const uint8_t *src = (const uint8_t *)p->w + (n0 + r) * bytes_per_row + k0 / 2;
            for (Py_ssize_t k = 0; k < kc; k += 32) {
                __m128i v = _mm_loadu_si128((const __m128i *)(src + k / 2));
                __m128i lo = _mm_and_si128(v, nib), hi = _mm_and_si128(_mm_srli_epi16(v, 4), nib);
                _mm_storeu_si128((__m128i *)(row + k), _mm_unpacklo_epi8(lo, hi));
                _mm_storeu_si128((__m128i *)(row + k + 16), _mm_unpackhi_epi8(lo, hi));
            }
        }
        for (Py_ssize_t k4 = 0; k4 < kc / 4; k4++) memcpy(wp + 64 * k4 + 4 * r, row + 4 * k4, 4);
    }
}

#ifdef DOTZ
/*
 * The same product on 512-bit registers (AVX-512 VNNI): one vpdpbusd covers the panel's 16 rows for
 * one row of x, its 4 bytes of x broadcast from memory inside the instruction (DOTZ). Zen 5 and
 * Intel's cores run a zmm vpdpbusd at the rate of a ymm one, so this is up to twice the ymm
 * kernel's speed there; Zen 4 splits it in two halves, the same speed as the ymm kernel.
 */
#define Z_ROW_STEP(m) \
    if (ROWS > m) DOTZ(a##m, w, xg + m * ldx + 4 * k4);
#define Z_ROW_STORE(m)                                                                                     \
    if (ROWS > m) {                                                                                        \
        float *cm = c + m * ldc;                                                                           \
        __m512 sd = _mm512_mul_ps(s16, _mm512_set1_ps(d[m * ldg + g]));                                    \
        __m512 cv = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a##m), sd, _mm512_loadu_ps(cm));                     \
        _mm512_storeu_ps(cm, _mm512_fmadd_ps(b16, _mm512_set1_ps(xs[m * ldg + g]), cv));                     \
    }
__attribute__((always_inline)) TARGET static inline void SFX(gemm_micro_zmm)(
    const uint8_t *wp, const float *sp, const float *bp, const int8_t *x, Py_ssize_t ldx, const float *d,
    const float *xs, Py_ssize_t ldg, float *c, Py_ssize_t ldc, Py_ssize_t ngroups, const int ROWS, const int GROUP) {
    for (Py_ssize_t g = 0; g < ngroups; g++) {
        __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
        const int8_t *xg = x + g * GROUP;
        for (int k4 = 0; k4 < GROUP / 4; k4++, wp += 64) {
            __m512i w = _mm512_loadu_si512((const void *)wp);
            Z_ROW_STEP(0) Z_ROW_STEP(1) Z_ROW_STEP(2) Z_ROW_STEP(3)
            Z_ROW_STEP(4) Z_ROW_STEP(5) Z_ROW_STEP(6) Z_ROW_STEP(7)
        }
        __m512 s16 = _mm512_loadu_ps(sp + 16 * g), b16 = _mm512_loadu_ps(bp + 16 * g);
        Z_ROW_STORE(0) Z_ROW_STORE(1) Z_ROW_STORE(2) Z_ROW_STORE(3)
        Z_ROW_STORE(4) Z_ROW_STORE(5) Z_ROW_STORE(6) Z_ROW_STORE(7)
    }
}
#undef Z_ROW_STEP
#undef Z_ROW_STORE
#define MICRO(ROWS) SFX(gemm_micro_zmm)(wp, sp, bp, x, ldx, d, xs, ldg, c, ldc, ngroups, ROWS, GROUP)
#else
#define MICRO(ROWS) SFX(gemm_micro)(wp, sp, bp, x, ldx, d, xs, ldg, c, ldc, ngroups, ROWS, GROUP, BITS)
#endif

__attribute__((always_inline)) TARGET static inline void SFX(micro_rows)(
    const uint8_t *wp, const float *sp, const float *bp, const int8_t *x, Py_ssize_t ldx, const float *d,
    const float *xs, Py_ssize_t ldg, float *c, Py_ssize_t ldc, Py_ssize_t ngroups, int rows, const int GROUP,
    const int BITS) {
    if (rows >= MR) MICRO(MR);
    else if (rows == 1) MICRO(1);
    else if (rows == 2) MICRO(2);
    else if (rows == 3) MICRO(3);
#if MR > 4
    else if (rows == 4) MICRO(4);
    else if (rows == 5) MICRO(5);
    else if (rows == 6) MICRO(6);
    else if (rows == 7) MICRO(7);
#endif
}
#undef MICRO

/*
 * One block of up to 4 packed panels (64 weight rows) over [k0, k0 + kc) against all rows of x:
 * each MR-row slice of x (MR x kc bytes, in L1) meets the block's panels in turn. cbuf is
 * [M][64] float32.
 */
TARGET static void SFX(gemm_block)(const Q8Problem *p, const uint8_t *wp, const float *sp, const float *bp,
                                   int panels, Py_ssize_t k0, Py_ssize_t kc, float *cbuf) {
    const Py_ssize_t groups = p->K / p->group, ngroups = kc / p->group, g0 = k0 / p->group;
    for (Py_ssize_t m0 = 0; m0 < p->M; m0 += MR) {
        int rows = p->M - m0 < MR ? (int)(p->M - m0) : MR;
        const int8_t *x = p->xq + m0 * p->K + k0;
        const float *d = p->d + m0 * groups + g0, *xs = p->xsum + m0 * groups + g0;
        for (int j = 0; j < panels; j++) {
            const uint8_t *w = wp + j * 16 * kc;
            const float *s = sp + j * 16 * ngroups, *b = bp + j * 16 * ngroups;
            float *c = cbuf + m0 * 64 + 16 * j;
#define ROWS_FOR(GROUP, BITS) SFX(micro_rows)(w, s, b, x, p->K, d, xs, groups, c, 64, ngroups, rows, GROUP, BITS)
            if (p->bits == 4) {
                if (p->group == 32) ROWS_FOR(32, 4);
                else if (p->group == 64) ROWS_FOR(64, 4);
                else ROWS_FOR(128, 4);
            } else {
                if (p->group == 32) ROWS_FOR(32, 8);
                else if (p->group == 64) ROWS_FOR(64, 8);
                else ROWS_FOR(128, 8);
            }
#undef ROWS_FOR
        }
    }
}
