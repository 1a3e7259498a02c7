/* What gemv.c and decode.c share. */
#ifndef GPT2SERVE_KERNELS_H
#define GPT2SERVE_KERNELS_H

#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>

enum { FMT_F32 = 0, FMT_BF16 = 1, FMT_F16 = 2, FMT_I8 = 3 };

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* y (M, N) = x (M, K) @ W (N, K)^T [* scale] [+ b], added to y if `accumulate`. The work is shared by an
 * orphaned `omp for`: call it from inside a parallel region (outside one it runs on the calling thread). */
void gpt2serve_matmul_for(int fmt, const float *x, int M, int K, const void *W, const float *scale,
                          const float *b, float *y, int N, int accumulate);

#endif
