/* Few-row matrix products for decoding on AVX2 and AVX-512 CPUs: y (M, N) = x (M, K) @ W (N, K)^T
 * [* scale] [+ b].
 *
 * Decoding reads every weight once per step for a handful of activation rows, so the only cost that
 * matters is how fast W streams from memory. Each task reads NR weight rows side by side (several
 * streams in flight keep the memory system busy) and multiplies them with up to 8 activation rows held
 * in registers; weights of any format are widened to float32 in registers and summed in float32.
 * Each task prefetches the next one's rows into L2, not L1: on Zen 4, prefetching to L1 left int8 and
 * bfloat16 weights streaming at ~12-16 GB/s of 30-38, and to L2 they stream about twice as fast.
 * Built with AVX-512 (native.py adds -mavx512f etc. where the CPU has it) the vectors hold 16 floats and
 * the blocks use the 32 registers; a K that is not a multiple of 16 ends with one 8-wide step.
 * The OpenMP loop runs on the OpenMP runtime torch has already loaded, so it shares torch's threads.
 *
 * Built by gpt2serve/engine/native.py, with the other files here, by: cc -O3 -mavx2 -mfma -mf16c
 * [-mavx512f -mavx512bw -mavx512vl -mavx512dq] -fopenmp -shared -fPIC
 */
#include "kernels.h"

#define MAX_ROWS 8

/* 8 consecutive weights of row p from column k, as float32. */
#define LOAD8_F32(p, k) _mm256_loadu_ps((const float *)(p) + (k))
#define LOAD8_BF16(p, k) _mm256_castsi256_ps(_mm256_slli_epi32( \
    _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)(p) + (k)))), 16))
#define LOAD8_F16(p, k) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)(p) + (k))))
#define LOAD8_I8(p, k) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32( \
    _mm_loadl_epi64((const __m128i *)((const int8_t *)(p) + (k)))))

#ifdef __AVX512F__
/* 16 weights at a time; an 8-wide load, zero-extended, ends a K that 16 does not divide. */
#define VW 16
typedef __m512 vec_t;
#define VZERO() _mm512_setzero_ps()
#define VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define VSUM(v) _mm512_reduce_add_ps(v)
#define WIDEN8(v) _mm512_maskz_mov_ps(0x00FF, _mm512_castps256_ps512(v))
#define LOAD_F32(p, k) _mm512_loadu_ps((const float *)(p) + (k))
#define LOAD_BF16(p, k) _mm512_castsi512_ps(_mm512_slli_epi32( \
    _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)(p) + (k)))), 16))
#define LOAD_F16(p, k) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)(p) + (k))))
#define LOAD_I8(p, k) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32( \
    _mm_loadu_si128((const __m128i *)((const int8_t *)(p) + (k)))))
#else
#define VW 8
typedef __m256 vec_t;
#define VZERO() _mm256_setzero_ps()
#define VFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define VSUM(v) hsum(v)
#define WIDEN8(v) (v)
#define LOAD_F32 LOAD8_F32
#define LOAD_BF16 LOAD8_BF16
#define LOAD_F16 LOAD8_F16
#define LOAD_I8 LOAD8_I8
#endif

/* VSUM of four accumulators at once, [VSUM(a), VSUM(b), VSUM(c), VSUM(d)], by the same additions of the
 * same lanes (so the same bits): _mm512_reduce_add_ps adds lanes i and i + 8, then i and i + 4, then
 * i and i + 2, then 0 and 1; here each step serves the four (or two) vectors in one addition, ~4
 * instructions a sum against ~8. */
#ifdef __AVX512F__
static inline __m128 sum4(__m512 a, __m512 b, __m512 c, __m512 d) {
    __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
    __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
    __m512 s = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
    s = _mm512_add_ps(s, _mm512_permute_ps(s, 0x4E)); /* lanes (2, 3, 0, 1) of each 4 */
    s = _mm512_add_ps(s, _mm512_permute_ps(s, 0xB1)); /* lanes (1, 0, 3, 2) of each 4 */
    const __m512i firsts = _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
    return _mm512_castps512_ps128(_mm512_permutexvar_ps(firsts, s));
}
#else
static inline __m128 sum4(__m256 a, __m256 b, __m256 c, __m256 d) {
    return _mm_setr_ps(hsum(a), hsum(b), hsum(c), hsum(d));
}
#endif

typedef void (*block_fn)(const float *x, int K, const void *W, const float *scale, const float *b,
                         float *y, int N, int n0, int accumulate, size_t ahead, int phase, int stride,
                         int k0, int k1, vec_t *carry);

/* Output columns n0 .. n0+NR-1 for MR activation rows (past N, the last row is read again, not stored);
 * `accumulate` adds them to y instead of storing them. The weights `ahead` elements past these rows are
 * prefetched into L2 as they stream: every cache line of each or, with SPREAD, the lines `phase`,
 * `phase + stride`, ... Inputs k0 .. k1-1 only: past k0 > 0 the sums so far come from `carry` (NR x MR
 * vectors), and before k1 < K they go back there unreduced, so the lanes add in the same order, and
 * give the same bits, however K is cut. */
#define DEFINE_BLOCK(NAME, T, LOAD, LOAD8, MR, NR, SPREAD)                                              \
    static void NAME##_##MR##x##NR##_##SPREAD(const float *x, int K, const void *W, const float *scale, \
                                   const float *b, float *y, int N, int n0, int accumulate,             \
                                   size_t ahead, int phase, int stride, int k0, int k1, vec_t *carry) { \
        vec_t acc[NR][MR];                                                                              \
        const T *w[NR];                                                                                 \
        for (int j = 0; j < NR; ++j) {                                                                  \
            int n = n0 + j < N ? n0 + j : N - 1;                                                        \
            w[j] = (const T *)W + (size_t)n * K;                                                        \
            for (int m = 0; m < MR; ++m) acc[j][m] = k0 ? carry[j * MR + m] : VZERO();                  \
        }                                                                                               \
        int k = k0, wait = phase; /* SPREAD: cache lines until the next one prefetched */               \
        for (; k + VW <= k1; k += VW) {                                                                 \
            int fetch = k % (64 / sizeof(T)) == 0 && (!SPREAD || wait-- == 0);                          \
            if (SPREAD && fetch) wait = stride - 1;                                                     \
            vec_t xv[MR];                                                                               \
            for (int m = 0; m < MR; ++m) xv[m] = LOAD_F32(x + (size_t)m * K, k);                        \
            for (int j = 0; j < NR; ++j) {                                                              \
                if (fetch) _mm_prefetch((const char *)(w[j] + ahead + k), _MM_HINT_T2);                 \
                vec_t wv = LOAD(w[j], k);                                                               \
                for (int m = 0; m < MR; ++m) acc[j][m] = VFMA(wv, xv[m], acc[j][m]);                    \
            }                                                                                           \
        }                                                                                               \
        if (k < k1) { /* K % VW == 8 */                                                                 \
            vec_t xv[MR];                                                                               \
            for (int m = 0; m < MR; ++m) xv[m] = WIDEN8(LOAD8_F32(x + (size_t)m * K, k));               \
            for (int j = 0; j < NR; ++j) {                                                              \
                vec_t wv = WIDEN8(LOAD8(w[j], k));                                                      \
                for (int m = 0; m < MR; ++m) acc[j][m] = VFMA(wv, xv[m], acc[j][m]);                    \
            }                                                                                           \
        }                                                                                               \
        if (k1 < K) {                                                                                   \
            for (int j = 0; j < NR; ++j)                                                                \
                for (int m = 0; m < MR; ++m) carry[j * MR + m] = acc[j][m];                             \
            return;                                                                                     \
        }                                                                                               \
        for (int j = 0; j < NR && n0 + j < N; ++j) {                                                    \
            float s = scale ? scale[n0 + j] : 1.0f, add = b ? b[n0 + j] : 0.0f, sums[MR + 3];           \
            for (int m = 0; MR >= 4 && m < MR; m += 4) /* past MR: row m summed again, unused */        \
                _mm_storeu_ps(sums + m, sum4(acc[j][m], acc[j][m + 1 < MR ? m + 1 : m],                 \
                                             acc[j][m + 2 < MR ? m + 2 : m], acc[j][m + 3 < MR ? m + 3 : m])); \
            for (int m = 0; MR < 4 && m < MR; ++m) sums[m] = VSUM(acc[j][m]);                           \
            for (int m = 0; m < MR; ++m) {                                                              \
                float v = sums[m] * s + add, *out = y + (size_t)m * N + n0 + j;                         \
                *out = accumulate ? *out + v : v;                                                       \
            }                                                                                           \
        }                                                                                               \
    }

/* Weight rows per task for MR activation rows, 8-12 accumulators of AVX2's 16 registers (3 rows x 4
 * beat 3 x 2 by up to 10 % for float32, same for int8; 4 x 3 lost to 4 x 2 for int8), up to 24 of
 * AVX-512's 32. */
#ifdef __AVX512F__
#define NR_OF_MR 8, 8, 4, 4, 4, 3, 3, 2
#else
#define NR_OF_MR 8, 4, 4, 2, 2, 2, 1, 1
#endif
static const int NR_OF[MAX_ROWS] = {NR_OF_MR};
static int rows_per_task(int mr) { return NR_OF[mr - 1]; }

/* More than 6 rows: each task is BIG_TASK weight rows. BIG_NR of them at a time, one K block (at most
 * L1_SHARE bytes of them) at a time, go through every chunk of up to BIG_MR activation rows (BIG_MR x
 * BIG_NR blocks) of a group of GROUP_ROWS while they sit in L1, so the weights stream from memory once per
 * step and from L2 once per group; the blocks' sums wait unreduced between K blocks (`carry`). Every
 * chunk prefetches its share of the next task's lines (chunk c of C: lines c, c + C, ...), so the
 * prefetches are spread over the task rather than bunched in its first chunk.
 * On a Zen 5 (1 thread, gpt2's 48 layer matrices cold, float32) 4 x 6 blocks in 12-row tasks took 16 rows
 * in 18.1 ms and 32 in 30.2 against 21.8 and 35.2 for 4 x 2 blocks in 8-row tasks, their prefetches in
 * the first chunk (oneDNN: 20.9 and 31.6); 6- and 24-row tasks, prefetching 2-4 tasks ahead, or to L1,
 * were 3-10 % slower, and no prefetch 15 % slower. Taking the task's 12 rows through each chunk in turn
 * (36 KB of weights and 12 KB of activations against a 48 KB L1) left them streaming from L2: 6 rows
 * through every chunk, in K blocks, were 7-20 % faster on gpt2's matrices and gpt2-xl's (2 threads, 48
 * rows, cold: K = 768 190 -> 203 GMAC/s, 3072 152 -> 168-185, 1600 152 -> 186). */
#ifdef __AVX512F__
#define BIG_NR 6 /* 24 accumulators, 4 activation vectors, 1 weight vector: 29 of 32 registers */
#else
#define BIG_NR 2
#endif
#define BIG_MR 4
#define BIG_TASK 12
#define L1_SHARE (24 << 10) /* bytes of BIG_NR weight rows' K block: half of Zen 5's L1 */
#define GROUP_ROWS 64        /* activation rows per pass of a K block */
static const int FORMAT_BYTES[] = {4, 2, 2, 1};

#define DEFINE_FORMAT_(NAME, T, LOAD, LOAD8, N1, N2, N3, N4, N5, N6, N7, N8)                            \
    DEFINE_BLOCK(NAME, T, LOAD, LOAD8, 1, N1, 0)                                                          \
    DEFINE_BLOCK(NAME, T, LOAD, LOAD8, 2, N2, 0)                                                          \
    DEFINE_BLOCK(NAME, T, LOAD, LOAD8, 3, N3, 0)                                                          \
    DEFINE_BLOCK(NAME, T, LOAD, LOAD8, 4, N4, 0)                                                          \
    DEFINE_BLOCK(NAME, T, LOAD, LOAD8, 5, N5, 0)                                                          \
    DEFINE_BLOCK(NAME, T, LOAD, LOAD8, 6, N6, 0)                                                          \
    DEFINE_BLOCK(NAME, T, LOAD, LOAD8, 7, N7, 0)                                                          \
    DEFINE_BLOCK(NAME, T, LOAD, LOAD8, 8, N8, 0)                                                          \
    static const block_fn NAME##_blocks[MAX_ROWS] = {NAME##_1x##N1##_0, NAME##_2x##N2##_0, NAME##_3x##N3##_0,     \
                                                     NAME##_4x##N4##_0, NAME##_5x##N5##_0, NAME##_6x##N6##_0,     \
                                                     NAME##_7x##N7##_0, NAME##_8x##N8##_0};
#define DEFINE_FORMAT(...) DEFINE_FORMAT_(__VA_ARGS__)

#define DEFINE_BIG_(NAME, T, LOAD, LOAD8, NR)                                                            \
    DEFINE_BLOCK(NAME, T, LOAD, LOAD8, 1, NR, 1)                                                       \
    DEFINE_BLOCK(NAME, T, LOAD, LOAD8, 2, NR, 1)                                                       \
    DEFINE_BLOCK(NAME, T, LOAD, LOAD8, 3, NR, 1)                                                       \
    DEFINE_BLOCK(NAME, T, LOAD, LOAD8, 4, NR, 1)                                                       \
    static const block_fn NAME##_big[BIG_MR] = {NAME##_1x##NR##_1, NAME##_2x##NR##_1, NAME##_3x##NR##_1,          \
                                                NAME##_4x##NR##_1};
#define DEFINE_BIG(...) DEFINE_BIG_(__VA_ARGS__)

DEFINE_FORMAT(f32, float, LOAD_F32, LOAD8_F32, NR_OF_MR)
DEFINE_FORMAT(bf16, uint16_t, LOAD_BF16, LOAD8_BF16, NR_OF_MR)
DEFINE_FORMAT(f16, uint16_t, LOAD_F16, LOAD8_F16, NR_OF_MR)
DEFINE_FORMAT(i8, int8_t, LOAD_I8, LOAD8_I8, NR_OF_MR)
DEFINE_BIG(f32, float, LOAD_F32, LOAD8_F32, BIG_NR)
DEFINE_BIG(bf16, uint16_t, LOAD_BF16, LOAD8_BF16, BIG_NR)
DEFINE_BIG(f16, uint16_t, LOAD_F16, LOAD8_F16, BIG_NR)
DEFINE_BIG(i8, int8_t, LOAD_I8, LOAD8_I8, BIG_NR)

static const block_fn *const BLOCKS[] = {f32_blocks, bf16_blocks, f16_blocks, i8_blocks};
static const block_fn *const BIG_BLOCKS[] = {f32_big, bf16_big, f16_big, i8_big};

void gpt2serve_matmul_for(int fmt, const float *x, int M, int K, const void *W, const float *scale,
                          const float *b, float *y, int N, int accumulate) {
    if (M > 6) { /* see BIG_TASK */
        int tasks = (N + BIG_TASK - 1) / BIG_TASK;
        const size_t ahead = (size_t)BIG_TASK * K;
        const int chunks = (M + BIG_MR - 1) / BIG_MR;
        int kb = L1_SHARE / (BIG_NR * FORMAT_BYTES[fmt]) / VW * VW, nk = (K + kb - 1) / kb;
        kb = (K + nk - 1) / nk, kb = nk > 1 ? (kb + VW - 1) / VW * VW : K; /* even K blocks */
        vec_t carry[GROUP_ROWS / BIG_MR * BIG_NR * BIG_MR];                 /* each thread's own */
#pragma omp for schedule(static)
        for (int t = 0; t < tasks; ++t)
            for (int n0 = BIG_TASK * t; n0 < BIG_TASK * (t + 1) && n0 < N; n0 += BIG_NR)
                for (int g0 = 0; g0 < M; g0 += GROUP_ROWS)
                    for (int k0 = 0; k0 < K; k0 += kb)
                        for (int m0 = g0; m0 < M && m0 < g0 + GROUP_ROWS; m0 += BIG_MR) {
                            int mr = M - m0 < BIG_MR ? M - m0 : BIG_MR, k1 = K - k0 < kb ? K : k0 + kb;
                            BIG_BLOCKS[fmt][mr - 1](x + (size_t)m0 * K, K, W, scale, b, y + (size_t)m0 * N, N,
                                                    n0, accumulate, ahead, m0 / BIG_MR, chunks, k0, k1,
                                                    carry + (m0 - g0) / BIG_MR * BIG_NR * BIG_MR);
                        }
        return;
    }
    for (int m0 = 0; m0 < M; m0 += MAX_ROWS) {
        int mr = M - m0 < MAX_ROWS ? M - m0 : MAX_ROWS, nr = rows_per_task(mr);
        block_fn block = BLOCKS[fmt][mr - 1];
        const float *xm = x + (size_t)m0 * K;
        float *ym = y + (size_t)m0 * N;
        int tasks = (N + nr - 1) / nr;
#pragma omp for schedule(static)
        for (int t = 0; t < tasks; ++t)
            block(xm, K, W, scale, b, ym, N, t * nr, accumulate, (size_t)nr * K, 0, 1, 0, K, NULL);
    }
}

/* x (M, K) and y (M, N) contiguous float32; W (N, K) contiguous in `fmt`; K a multiple of 8;
 * scale (N,) multiplies each output column (int8) or is NULL; b (N,) or NULL. Returns 0, or -1 for
 * arguments it does not take. */
int gpt2serve_gemv(int fmt, const float *x, int M, int K, const void *W, const float *scale,
                   const float *b, float *y, int N, int threads) {
    if (fmt < FMT_F32 || fmt > FMT_I8 || M < 0 || K <= 0 || K % 8 || N <= 0 || threads < 1) return -1;
#pragma omp parallel num_threads(threads)
    gpt2serve_matmul_for(fmt, x, M, K, W, scale, b, y, N, 0);
    return 0;
}
