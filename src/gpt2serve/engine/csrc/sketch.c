/* The head sketch's logits in integers, for CPUs with AVX-512 VNNI (head_sketch.py):
 * y (M, N) = xs[m] * ws[n] * (x[m] . W[n] - 128 * wsum[n]).
 *
 * x holds each activation row quantized to 8 bits and shifted to unsigned (q + 128, q in -127..127), W
 * the sketch's int8 rows, wsum[n] the sum of row n. vpdpbusd multiplies 64 unsigned by 64 signed bytes
 * per instruction, 4 times the multiply-adds of a float32 FMA as wide, so with many rows the sketch costs
 * a fraction of the float32 head it stands in for (the float32 sketch in gemv.c does as many FMAs as the
 * head itself). The integer sums are exact; the only roundings are the last conversion and multiplies
 * (within 3 * 2^-24 of the value).
 *
 * Each task is NR weight rows (in L1 while they last) taken through every chunk of MR activation rows;
 * the next task's rows are prefetched into L2 during the first chunk. Built into the AVX-512 library
 * only, and run only where the CPU reports VNNI.
 */
#include <omp.h>

#include "kernels.h"

#ifdef __AVX512F__
#define MR 4
#define NR 6

/* acc += the 4-byte dot products of x (unsigned) and w (signed) in each 32-bit lane. In assembly: GCC 12
 * copies the accumulator around _mm512_dpbusd_epi32 and, with 24 of them, spills them every step. */
#define DPBUSD(acc, x, w) __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(x), "v"(w))

/* [sum of a, of b, of c, of d] in 32-bit lanes: each step adds for all four at once (integers: any order). */
static inline __m128i sum4_epi32(__m512i a, __m512i b, __m512i c, __m512i d) {
    __m512i ab = _mm512_add_epi32(_mm512_shuffle_i32x4(a, b, 0x44), _mm512_shuffle_i32x4(a, b, 0xEE));
    __m512i cd = _mm512_add_epi32(_mm512_shuffle_i32x4(c, d, 0x44), _mm512_shuffle_i32x4(c, d, 0xEE));
    __m512i s = _mm512_add_epi32(_mm512_shuffle_i32x4(ab, cd, 0x88), _mm512_shuffle_i32x4(ab, cd, 0xDD));
    s = _mm512_add_epi32(s, _mm512_shuffle_epi32(s, (_MM_PERM_ENUM)0x4E));
    s = _mm512_add_epi32(s, _mm512_shuffle_epi32(s, (_MM_PERM_ENUM)0xB1));
    const __m512i firsts = _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
    return _mm512_castsi512_si128(_mm512_permutexvar_epi32(firsts, s));
}

/* Weight row j's 4 accumulators, one per activation row (named: as an array GCC keeps them in memory). */
#define ACC(j) __m512i a##j##0 = _mm512_setzero_si512(), a##j##1 = a##j##0, a##j##2 = a##j##0, a##j##3 = a##j##0
#define DOT(j, live, prefetch)                                                                   \
    do {                                                                                         \
        if (prefetch) _mm_prefetch((const char *)(w##j + (size_t)NR * K + k), _MM_HINT_T1);      \
        __m512i wv = _mm512_maskz_loadu_epi8(live, w##j + k);                                    \
        DPBUSD(a##j##0, x0, wv);                                                                 \
        DPBUSD(a##j##1, x1, wv);                                                                 \
        DPBUSD(a##j##2, x2, wv);                                                                 \
        DPBUSD(a##j##3, x3, wv);                                                                 \
    } while (0)
/* 64 bytes along K (`live`: those within K) of every activation row against every weight row. */
#define STEP(live, prefetch)                                                                     \
    do {                                                                                         \
        __m512i x0 = _mm512_maskz_loadu_epi8(live, xr0 + k), x1 = _mm512_maskz_loadu_epi8(live, xr1 + k); \
        __m512i x2 = _mm512_maskz_loadu_epi8(live, xr2 + k), x3 = _mm512_maskz_loadu_epi8(live, xr3 + k); \
        DOT(0, live, prefetch);                                                                  \
        DOT(1, live, prefetch);                                                                  \
        DOT(2, live, prefetch);                                                                  \
        DOT(3, live, prefetch);                                                                  \
        DOT(4, live, prefetch);                                                                  \
        DOT(5, live, prefetch);                                                                  \
    } while (0)
/* Stores weight row j's sums (if within N) for the activation rows within mr: xs4 holds their scales. */
#define STORE(j)                                                                                 \
    do {                                                                                         \
        if (n0 + j < N) {                                                                        \
            const int n = n0 + j;                                                                \
            __m128i sum = sum4_epi32(a##j##0, a##j##1, a##j##2, a##j##3);                        \
            sum = _mm_sub_epi32(sum, _mm_set1_epi32(128 * wsum[n]));                             \
            float out[MR];                                                                       \
            _mm_storeu_ps(out, _mm_mul_ps(_mm_cvtepi32_ps(sum), _mm_mul_ps(xs4, _mm_set1_ps(ws[n])))); \
            for (int m = 0; m < mr; ++m) y[(size_t)(m0 + m) * N + n] = out[m];                   \
        }                                                                                        \
    } while (0)

/* Columns n0 .. n0+NR-1 of rows m0 .. m0+mr-1 (past N or M the last is read again, not stored). */
__attribute__((target("avx512vnni"))) static void sketch_block(const uint8_t *x, const float *xs, int m0, int mr,
                                                                int K, const int8_t *W, const float *ws,
                                                                const int32_t *wsum, float *y, int n0, int N,
                                                                int fetch) {
#define ROW(j) (W + (size_t)(n0 + j < N ? n0 + j : N - 1) * K)
    const int8_t *w0 = ROW(0), *w1 = ROW(1), *w2 = ROW(2), *w3 = ROW(3), *w4 = ROW(4), *w5 = ROW(5);
#undef ROW
#define ROW(m) (x + (size_t)(m0 + (m < mr ? m : mr - 1)) * K)
    const uint8_t *xr0 = ROW(0), *xr1 = ROW(1), *xr2 = ROW(2), *xr3 = ROW(3);
#undef ROW
    ACC(0); ACC(1); ACC(2); ACC(3); ACC(4); ACC(5);
    int k = 0;
    if (fetch)
        for (; k + 64 <= K; k += 64) STEP(~(__mmask64)0, 1);
    else
        for (; k + 64 <= K; k += 64) STEP(~(__mmask64)0, 0);
    if (k < K) STEP(((__mmask64)1 << (K - k)) - 1, 0);
    const __m128 xs4 = _mm_setr_ps(xs[m0], xs[m0 + (1 < mr)], xs[m0 + (2 < mr ? 2 : mr - 1)], xs[m0 + (3 < mr ? 3 : mr - 1)]);
    STORE(0); STORE(1); STORE(2); STORE(3); STORE(4); STORE(5);
}

static int has_vnni(void) { return __builtin_cpu_supports("avx512vnni"); }
#else
static int has_vnni(void) { return 0; }
#endif

/* Whether gpt2serve_sketch_i8 runs here: the AVX-512 build on a CPU with VNNI. */
int gpt2serve_sketch_i8_available(void) { return has_vnni() != 0; }

/* x (M, K) uint8, xs (M,); W (N, K) int8, ws (N,), wsum (N,) int32; y (M, N) float32. Returns 0, or -1
 * where it does not run (see gpt2serve_sketch_i8_available) or for arguments it does not take. */
int gpt2serve_sketch_i8(const uint8_t *x, const float *xs, int M, int K, const int8_t *W, const float *ws,
                        const int32_t *wsum, float *y, int N, int threads) {
    if (!has_vnni() || M < 1 || K < 1 || N < 1 || threads < 1) return -1;
#ifdef __AVX512F__
    const int tasks = (N + NR - 1) / NR;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int t = 0; t < tasks; ++t)
        for (int m0 = 0; m0 < M; m0 += MR)
            sketch_block(x, xs, m0, M - m0 < MR ? M - m0 : MR, K, W, ws, wsum, y, t * NR, N, m0 == 0);
#endif
    return 0;
}
