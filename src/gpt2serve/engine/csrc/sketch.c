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
 * W comes packed (native.pack_sketch): blocks of 16 rows, each as K/4 groups of 16 x 4 bytes (row c's
 * inputs 4g .. 4g+3 at [g][c]), so one vpdpbusd of 4 broadcast activation bytes against a group adds
 * into 16 outputs side by side and no sum is ever reduced across lanes (GPT-2's K = 768 is 12 steps of
 * 64 bytes: reducing each of a row-major kernel's sums cost as much as its multiply-adds). A task is
 * NB blocks (48 rows, 36 KB at K = 768: in L1) taken through every chunk of MR activation rows, each
 * chunk prefetching its share of the next task's lines into L2. Zen 5, 2 threads, gpt2's head, 48 rows:
 * 3.8 ms row-major (4 x 6 sums reduced at the end), 2.2 ms packed. Built into the AVX-512 library only,
 * and run only where the CPU reports VNNI.
 */
#include <omp.h>
#include <string.h>

#include "kernels.h"

#ifdef __AVX512F__
#define MR 8         /* activation rows per chunk */
#define NB 3         /* 16-row weight blocks per task: 24 accumulators, 3 weight vectors, 1 broadcast */
#define GROUP 64     /* bytes of one block's input group: 16 rows x 4 inputs */

/* acc += the 4-byte dot products of x (unsigned) and w (signed) in each 32-bit lane. In assembly: GCC 12
 * copies the accumulator around _mm512_dpbusd_epi32 and, with 24 of them, spills them every step. */
#define DPBUSD(acc, x, w) __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(x), "v"(w))

/* Activation row m's 3 accumulators (named: as an array GCC keeps them in memory). */
#define ACC(m) __m512i a##m##0 = _mm512_setzero_si512(), a##m##1 = a##m##0, a##m##2 = a##m##0
/* Row m's 4 inputs of group g, broadcast, against the 3 blocks' groups. */
#define ROW_STEP(m)                                                                              \
    do {                                                                                         \
        int32_t four;                                                                            \
        memcpy(&four, xr##m + 4 * g, sizeof four);                                               \
        const __m512i xb = _mm512_set1_epi32(four);                                              \
        DPBUSD(a##m##0, xb, w0);                                                                 \
        DPBUSD(a##m##1, xb, w1);                                                                 \
        DPBUSD(a##m##2, xb, w2);                                                                 \
    } while (0)
/* Row m's sums of block b, scaled, into y (the rows within mr, the outputs within N). */
#define STORE(m, b)                                                                              \
    do {                                                                                         \
        const int n = (nb0 + b) * 16;                                                            \
        if (m < mr && n < N) {                                                                   \
            const __mmask16 live = N - n >= 16 ? 0xFFFF : (__mmask16)((1u << (N - n)) - 1);      \
            __m512i shift = _mm512_slli_epi32(_mm512_maskz_loadu_epi32(live, wsum + n), 7);      \
            __m512 scale = _mm512_mul_ps(_mm512_set1_ps(xs[m0 + m]), _mm512_maskz_loadu_ps(live, ws + n)); \
            __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(a##m##b, shift)), scale); \
            _mm512_mask_storeu_ps(y + (size_t)(m0 + m) * N + n, live, v);                        \
        }                                                                                        \
    } while (0)
#define STORE_ROW(m) STORE(m, 0); STORE(m, 1); STORE(m, 2)

/* Outputs of blocks nb0 .. nb0+NB-1 for activation rows m0 .. m0+mr-1 (past M the last row is read again,
 * not stored). Groups phase, phase + stride, ... of the next task's blocks are prefetched. */
__attribute__((target("avx512vnni"))) static void sketch_block(const uint8_t *x, const float *xs, int m0, int mr,
                                                                int K, const int8_t *Wp, const float *ws,
                                                                const int32_t *wsum, float *y, int nb0, int N,
                                                                int phase, int stride) {
    const int groups = K / 4;
    const size_t block = (size_t)groups * GROUP;
    const int8_t *b0 = Wp + (size_t)nb0 * block, *b1 = b0 + block, *b2 = b1 + block, *next = b0 + NB * block;
#define ROW(m) (x + (size_t)(m0 + (m < mr ? m : mr - 1)) * K)
    const uint8_t *xr0 = ROW(0), *xr1 = ROW(1), *xr2 = ROW(2), *xr3 = ROW(3);
    const uint8_t *xr4 = ROW(4), *xr5 = ROW(5), *xr6 = ROW(6), *xr7 = ROW(7);
#undef ROW
    ACC(0); ACC(1); ACC(2); ACC(3); ACC(4); ACC(5); ACC(6); ACC(7);
    for (int g = 0, wait = phase; g < groups; ++g) {
        if (wait-- == 0) {
            wait = stride - 1;
            for (int b = 0; b < NB; ++b) _mm_prefetch((const char *)(next + b * block + (size_t)g * GROUP), _MM_HINT_T1);
        }
        const __m512i w0 = _mm512_loadu_si512(b0 + (size_t)g * GROUP), w1 = _mm512_loadu_si512(b1 + (size_t)g * GROUP);
        const __m512i w2 = _mm512_loadu_si512(b2 + (size_t)g * GROUP);
        ROW_STEP(0); ROW_STEP(1); ROW_STEP(2); ROW_STEP(3);
        ROW_STEP(4); ROW_STEP(5); ROW_STEP(6); ROW_STEP(7);
    }
    STORE_ROW(0); STORE_ROW(1); STORE_ROW(2); STORE_ROW(3);
    STORE_ROW(4); STORE_ROW(5); STORE_ROW(6); STORE_ROW(7);
}

static int has_vnni(void) { return __builtin_cpu_supports("avx512vnni"); }
#else
static int has_vnni(void) { return 0; }
#endif

/* Whether gpt2serve_sketch_i8 runs here: the AVX-512 build on a CPU with VNNI. */
int gpt2serve_sketch_i8_available(void) { return has_vnni() != 0; }

/* x (M, K) uint8, xs (M,); Wp the N rows of W packed (see above) in `blocks` blocks, a multiple of 3,
 * zero past N; ws (N,), wsum (N,) int32; y (M, N) float32. Returns 0, or -1 where it does not run (see
 * gpt2serve_sketch_i8_available) or for arguments it does not take (K a multiple of 4). */
int gpt2serve_sketch_i8(const uint8_t *x, const float *xs, int M, int K, const int8_t *Wp, int blocks,
                        const float *ws, const int32_t *wsum, float *y, int N, int threads) {
    if (!has_vnni() || M < 1 || K < 4 || K % 4 || N < 1 || threads < 1) return -1;
#ifdef __AVX512F__
    if (blocks % NB || blocks * 16 < N) return -1;
    const int tasks = blocks / NB, chunks = (M + MR - 1) / MR;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int t = 0; t < tasks; ++t)
        for (int m0 = 0; m0 < M; m0 += MR)
            sketch_block(x, xs, m0, M - m0 < MR ? M - m0 : MR, K, Wp, ws, wsum, y, t * NB, N, m0 / MR, chunks);
#else
    (void)x, (void)xs, (void)Wp, (void)blocks, (void)ws, (void)wsum, (void)y;
#endif
    return 0;
}
