/* One step through every transformer layer of GPT-2 for a few tokens (decode steps, short prompts), in
 * one call.
 *
 * Decoding runs ~15 small operations per layer besides the matrix products (layer norms, the cache
 * write, attention, GELU, residual additions); as torch calls from Python they cost ~0.5 ms per layer,
 * as much as streaming a layer's int8 weights. Here they run inside one OpenMP parallel region per step,
 * on torch's threads, with gemv.c's matrix products. Every sequence's arithmetic is its own (attention
 * reads its own keys only, the matrix products sum each row alone): a row's result never depends on
 * which other rows share the step.
 */
#include <math.h>
#include <omp.h>
#include <stdlib.h>

#include "kernels.h"

typedef struct {
    int fmt, n, k;           /* n outputs, k inputs */
    const void *w;           /* (n, k) row-major in fmt */
    const float *scale, *b;  /* (n,) or NULL */
} matrix_t;

typedef struct {
    const float *ln1_w, *ln1_b, *ln2_w, *ln2_b;
    matrix_t attn, proj, fc, out;  /* c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj */
} layer_t;

/* e^x for 8 floats, within 2 ulp (Cephes' polynomial); 0 below -87.3, -inf included. */
static inline __m256 exp256(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.3365447f), hi = _mm256_set1_ps(88.3762626f);
    __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

/* GELU, tanh form: 0.5 x (1 + tanh(u)) = x / (1 + e^(-2u)), u = sqrt(2/pi) (x + 0.044715 x^3). */
static inline __m256 gelu256(__m256 x) {
    __m256 x3 = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
    __m256 u = _mm256_mul_ps(_mm256_set1_ps(0.7978845608f), _mm256_fmadd_ps(_mm256_set1_ps(0.044715f), x3, x));
    __m256 e = exp256(_mm256_mul_ps(_mm256_set1_ps(-2.0f), u));
    return _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
}

static void layer_norm(const float *x, const float *w, const float *b, float *y, int C, float eps) {
    __m256 s = _mm256_setzero_ps();
    for (int k = 0; k < C; k += 8) s = _mm256_add_ps(s, _mm256_loadu_ps(x + k));
    __m256 mean = _mm256_set1_ps(hsum(s) / C), v = _mm256_setzero_ps();
    for (int k = 0; k < C; k += 8) {
        __m256 d = _mm256_sub_ps(_mm256_loadu_ps(x + k), mean);
        v = _mm256_fmadd_ps(d, d, v);
    }
    __m256 rstd = _mm256_set1_ps(1.0f / sqrtf(hsum(v) / C + eps));
    for (int k = 0; k < C; k += 8) {
        __m256 d = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + k), mean), rstd);
        _mm256_storeu_ps(y + k, _mm256_fmadd_ps(d, _mm256_loadu_ps(w + k), _mm256_loadu_ps(b + k)));
    }
}

/* The scores s[0 .. L) become e^(s[j] - max), padded with zeros to a multiple of 8 (s holds L + 8
 * floats); returns 1 / their sum. */
static float softmax_scores(float *s, int L) {
    float best = -INFINITY;
    for (int j = 0; j < L; ++j) best = s[j] > best ? s[j] : best;
    int L8 = (L + 7) & ~7;
    for (int j = L; j < L8; ++j) s[j] = -INFINITY;
    __m256 top = _mm256_set1_ps(best), total = _mm256_setzero_ps();
    for (int j = 0; j < L8; j += 8) {
        __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + j), top));
        _mm256_storeu_ps(s + j, e);
        total = _mm256_add_ps(total, e);
    }
    return 1.0f / hsum(total);
}

/* out (hs) = softmax(q . keys[j] * scale, j < L) @ values; hs a multiple of 8, s holds L + 8 floats. */
static void attend(const float *q, const float *keys, const float *values, int L, int hs, float scale,
                   float *s, float *out) {
    for (int j = 0; j < L; ++j) {
        const float *key = keys + (size_t)j * hs;
        __m256 d = _mm256_setzero_ps();
        for (int k = 0; k < hs; k += 8) d = _mm256_fmadd_ps(_mm256_loadu_ps(q + k), _mm256_loadu_ps(key + k), d);
        s[j] = hsum(d) * scale;
    }
    float inv = softmax_scores(s, L);
    for (int k = 0; k < hs; k += 8) _mm256_storeu_ps(out + k, _mm256_setzero_ps());
    for (int j = 0; j < L; ++j) {
        __m256 p = _mm256_set1_ps(s[j] * inv);
        const float *value = values + (size_t)j * hs;
        for (int k = 0; k < hs; k += 8)
            _mm256_storeu_ps(out + k, _mm256_fmadd_ps(p, _mm256_loadu_ps(value + k), _mm256_loadu_ps(out + k)));
    }
}

/* attend() for hs == 64 (every GPT-2 size) with the same sums in the same order, so the same bits: the
 * query and the output held in registers, and 4 keys' dot products at once (each a chain of 8 FMAs). */
static void attend64(const float *q, const float *keys, const float *values, int L, float scale, float *s,
                     float *out) {
    __m256 qv[8], o[8];
    for (int i = 0; i < 8; ++i) qv[i] = _mm256_loadu_ps(q + 8 * i);
    int j = 0;
    for (; j + 4 <= L; j += 4) {
        const float *key = keys + (size_t)j * 64;
        __m256 d0 = _mm256_setzero_ps(), d1 = d0, d2 = d0, d3 = d0;
        for (int i = 0; i < 8; ++i) {
            d0 = _mm256_fmadd_ps(qv[i], _mm256_loadu_ps(key + 8 * i), d0);
            d1 = _mm256_fmadd_ps(qv[i], _mm256_loadu_ps(key + 64 + 8 * i), d1);
            d2 = _mm256_fmadd_ps(qv[i], _mm256_loadu_ps(key + 128 + 8 * i), d2);
            d3 = _mm256_fmadd_ps(qv[i], _mm256_loadu_ps(key + 192 + 8 * i), d3);
        }
        s[j] = hsum(d0) * scale;
        s[j + 1] = hsum(d1) * scale;
        s[j + 2] = hsum(d2) * scale;
        s[j + 3] = hsum(d3) * scale;
    }
    for (; j < L; ++j) {
        const float *key = keys + (size_t)j * 64;
        __m256 d = _mm256_setzero_ps();
        for (int i = 0; i < 8; ++i) d = _mm256_fmadd_ps(qv[i], _mm256_loadu_ps(key + 8 * i), d);
        s[j] = hsum(d) * scale;
    }
    float inv = softmax_scores(s, L);
    for (int i = 0; i < 8; ++i) o[i] = _mm256_setzero_ps();
    for (j = 0; j < L; ++j) {
        __m256 p = _mm256_set1_ps(s[j] * inv);
        const float *value = values + (size_t)j * 64;
        for (int i = 0; i < 8; ++i) o[i] = _mm256_fmadd_ps(p, _mm256_loadu_ps(value + 8 * i), o[i]);
    }
    for (int i = 0; i < 8; ++i) _mm256_storeu_ps(out + 8 * i, o[i]);
}

static void matmul(const matrix_t *m, const float *x, int M, float *y, int accumulate) {
    gpt2serve_matmul_for(m->fmt, x, M, m->k, m->w, m->scale, m->b, y, m->n, accumulate);
}

/* x (M, C): the residual stream of M tokens, updated in place through all layers. Row i is the token
 * of slot slots[i] at position positions[i]: its key and value are written there (every row's before
 * any row attends), and it attends to positions 0 .. positions[i]. So rows are decode steps of
 * different sequences, or a prompt's tokens (one slot, consecutive positions), or both. Caches: (n_layer, n_slots, n_head, max_len, C / n_head)
 * float32. C and C / n_head must be multiples of 8. Returns 0, -1 for arguments it does not take, -2
 * when out of memory. */
int gpt2serve_decode(const layer_t *layers, int n_layer, int n_head, float eps, float *x, int M, int C,
                     const int64_t *slots, const int64_t *positions, float *k_cache, float *v_cache,
                     int n_slots, int max_len, int threads) {
    if (n_layer < 1 || n_head < 1 || M < 1 || C % n_head || C % 8 || (C / n_head) % 8 || threads < 1) return -1;
    for (int i = 0; i < M; ++i)
        if (slots[i] < 0 || slots[i] >= n_slots || positions[i] < 0 || positions[i] >= max_len) return -1;
    for (int l = 0; l < n_layer; ++l) {
        const layer_t *L = &layers[l];
        if (L->attn.k != C || L->attn.n != 3 * C || L->proj.k != C || L->proj.n != C || L->fc.k != C ||
            L->out.n != C || L->out.k != L->fc.n || L->fc.n % 8)
            return -1;
    }
    const int hs = C / n_head, F = layers[0].fc.n, s_len = max_len + 8;
    const size_t slot_stride = (size_t)n_head * max_len * hs, layer_stride = slot_stride * n_slots;
    const float scale = 1.0f / sqrtf((float)hs);
    size_t work = (size_t)M * (C + 3 * C + C) + (size_t)M * F;  /* h, qkv, att; fc (sized by layer 0) */
    for (int l = 1; l < n_layer; ++l)
        if (layers[l].fc.n > F) return -1;
    float *buf = malloc((work + (size_t)threads * s_len) * sizeof(float));
    if (!buf) return -2;
    float *h = buf, *qkv = h + (size_t)M * C, *att = qkv + (size_t)M * 3 * C, *fc = att + (size_t)M * C;
    float *scores = fc + (size_t)M * F;
#pragma omp parallel num_threads(threads)
    {
        float *s = scores + (size_t)omp_get_thread_num() * s_len;
        for (int l = 0; l < n_layer; ++l) {
            const layer_t *L = &layers[l];
            float *kc = k_cache + l * layer_stride, *vc = v_cache + l * layer_stride;
#pragma omp for schedule(static)
            for (int i = 0; i < M; ++i) layer_norm(x + (size_t)i * C, L->ln1_w, L->ln1_b, h + (size_t)i * C, C, eps);
            matmul(&L->attn, h, M, qkv, 0);
#pragma omp for schedule(static)
            for (int t = 0; t < M * n_head; ++t) { /* every row's key and value first: rows of one prompt */
                int i = t / n_head, head = t % n_head; /* attend to each other's */
                const float *q = qkv + (size_t)i * 3 * C + head * hs;
                size_t at = (size_t)slots[i] * slot_stride + ((size_t)head * max_len + positions[i]) * hs;
                for (int k = 0; k < hs; ++k) {
                    kc[at + k] = q[C + k];
                    vc[at + k] = q[2 * C + k];
                }
            }
#pragma omp for schedule(static, 1) /* round robin: a prompt's later rows attend to more keys */
            for (int t = 0; t < M * n_head; ++t) {
                int i = t / n_head, head = t % n_head;
                size_t at = (size_t)slots[i] * slot_stride + (size_t)head * max_len * hs;
                const float *q = qkv + (size_t)i * 3 * C + head * hs;
                float *out = att + (size_t)i * C + head * hs;
                if (hs == 64)
                    attend64(q, kc + at, vc + at, (int)positions[i] + 1, scale, s, out);
                else
                    attend(q, kc + at, vc + at, (int)positions[i] + 1, hs, scale, s, out);
            }
            matmul(&L->proj, att, M, x, 1);
#pragma omp for schedule(static)
            for (int i = 0; i < M; ++i) layer_norm(x + (size_t)i * C, L->ln2_w, L->ln2_b, h + (size_t)i * C, C, eps);
            matmul(&L->fc, h, M, fc, 0);
#pragma omp for schedule(static)
            for (size_t k = 0; k < (size_t)M * L->fc.n; k += 8) _mm256_storeu_ps(fc + k, gelu256(_mm256_loadu_ps(fc + k)));
            matmul(&L->out, fc, M, x, 1);
        }
    }
    free(buf);
    return 0;
}
