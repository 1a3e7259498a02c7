/* Helpers for choosing tokens over a vocabulary-wide row: an exact top-k, torch's CPU generator advanced
 * without drawing every number, and torch.multinomial's one-sample draw.
 *
 * Both serve a fast path that must agree with torch's own functions bit for bit, and says when it cannot
 * (sampling.py then takes torch's path): gpt2serve_topk reports ties, gpt2serve_uniform and
 * gpt2serve_multinomial report the one draw (u == 0) whose outcome torch.multinomial treats specially.
 */
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

enum { SCRATCH_SLOTS = 5 };

typedef struct {
    float value;
    int64_t index;
} entry_t;

static void sift_down(entry_t *h, int k, int i) { /* min-heap on value */
    for (;;) {
        int c = 2 * i + 1;
        if (c >= k) return;
        if (c + 1 < k && h[c + 1].value < h[c].value) ++c;
        if (h[i].value <= h[c].value) return;
        entry_t t = h[i];
        h[i] = h[c];
        h[c] = t;
        i = c;
    }
}

static int by_value_descending(const void *a, const void *b) {
    float x = ((const entry_t *)a)->value, y = ((const entry_t *)b)->value;
    return (x < y) - (x > y);
}

/* Each row's largest value and the first index holding it (torch's amax and argmax, in one call), rows of
 * n floats; a row holding a NaN gets NaN (its index unspecified). The rows spread over the threads. */
void gpt2serve_row_max(const float *x, int rows, int64_t n, float *values, int64_t *indices, int threads) {
#pragma omp parallel for num_threads(threads) if (rows > 1) schedule(static)
    for (int r = 0; r < rows; ++r) {
        const float *row = x + (size_t)r * n;
        __m256 top8 = _mm256_set1_ps(-INFINITY), nan8 = _mm256_setzero_ps();
        int64_t i = 0;
        for (; i + 8 <= n; i += 8) {
            __m256 v = _mm256_loadu_ps(row + i);
            nan8 = _mm256_or_ps(nan8, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
            top8 = _mm256_max_ps(top8, v);
        }
        float lanes[8], top = -INFINITY;
        int nan = _mm256_movemask_ps(nan8) != 0;
        _mm256_storeu_ps(lanes, top8);
        for (int l = 0; l < 8; ++l) top = lanes[l] > top ? lanes[l] : top;
        for (; i < n; ++i) {
            nan |= row[i] != row[i];
            top = row[i] > top ? row[i] : top;
        }
        int64_t at = 0;
        while (at < n && row[at] != top) ++at;
        values[r] = nan ? NAN : top, indices[r] = nan ? -1 : at;
    }
}

/* The k largest of x (rows x cols floats, row-major), each plus its row's bias[r] where bias is not NULL
 * (the float32 sums torch's x + bias[:, None] makes), descending, with their flat indices. Returns 0
 * when the answer leaves no room for tie-breaking (k distinct values, each above every value left out:
 * any exact top-k, torch.topk included, returns these in this order), 1 when ties make it a matter of
 * tie-breaking, -1 for a NaN among the values or arguments it does not take. */
int gpt2serve_topk(const float *x, int64_t rows, int64_t cols, const float *bias, int k, float *values,
                   int64_t *indices) {
    int64_t n = rows * cols;
    if (k < 1 || rows < 1 || cols < 1 || n < k) return -1;
    entry_t *h = malloc((size_t)k * sizeof *h);
    if (!h) return -1;
    int nan = 0, filled = 0;
    __m256 unordered = _mm256_setzero_ps();
    for (int64_t r = 0; r < rows; ++r) {
        const float *row = x + r * cols, b = bias ? bias[r] : 0.0f;
        const __m256 bv = _mm256_set1_ps(b);
        int64_t c = 0;
        for (; filled < k && c < cols; ++c) { /* the first k values fill the heap */
            float v = row[c] + b;
            h[filled++] = (entry_t){v, r * cols + c};
            nan |= v != v;
            if (filled == k)
                for (int i = k / 2 - 1; i >= 0; --i) sift_down(h, k, i);
        }
        for (; filled == k && c + 8 <= cols; c += 8) {
            __m256 v = _mm256_add_ps(_mm256_loadu_ps(row + c), bv);
            unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
            int above = _mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_set1_ps(h[0].value), _CMP_GT_OQ));
            while (above) {
                int lane = __builtin_ctz(above);
                above &= above - 1;
                float w = row[c + lane] + b;
                if (w > h[0].value) {
                    h[0] = (entry_t){w, r * cols + c + lane};
                    sift_down(h, k, 0);
                }
            }
        }
        for (; c < cols; ++c) {
            float v = row[c] + b;
            nan |= v != v;
            if (v > h[0].value) {
                h[0] = (entry_t){v, r * cols + c};
                sift_down(h, k, 0);
            }
        }
    }
    nan |= _mm256_movemask_ps(unordered) != 0;
    float kth = h[0].value;
    int64_t at_kth = 0;
    for (int64_t r = 0; r < rows; ++r) {
        const float *row = x + r * cols, b = bias ? bias[r] : 0.0f;
        for (int64_t c = 0; c < cols; ++c) at_kth += row[c] + b == kth;
    }
    qsort(h, (size_t)k, sizeof *h, by_value_descending);
    int ties = at_kth > 1;
    for (int j = 0; j < k; ++j) {
        values[j] = h[j].value;
        indices[j] = h[j].index;
        ties |= j > 0 && h[j].value == h[j - 1].value;
    }
    free(h);
    return nan ? -1 : ties;
}

/* One row of the head sketch's candidates (head_sketch.py): token t can be among the row's k largest
 * exact logits when s[t] + b[t] reaches the k-th largest of s[u] - b[u] (`*kth`), where each exact logit
 * lies within b[t] = r * slack[t] (+ e * wn[t] where wn is given) of the sketch s. Fills b (n floats;
 * h: k entries of work space) and *kth; returns 1 for a NaN in the row, else 0. */
static int row_bounds(const float *s, int64_t n, const float *slack, float r, float e, const float *wn, int k,
                      float *b, entry_t *h, float *kth) {
    for (int64_t t = 0; t < n; ++t) b[t] = wn ? r * slack[t] + e * wn[t] : r * slack[t];
    for (int i = 0; i < k; ++i) h[i] = (entry_t){s[i] - b[i], i};
    for (int i = k / 2 - 1; i >= 0; --i) sift_down(h, k, i);
    int64_t t = k;
    int nan = 0;
    __m256 unordered = _mm256_setzero_ps();
    for (; t + 8 <= n; t += 8) {
        __m256 sv = _mm256_loadu_ps(s + t);
        unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(sv, sv, _CMP_UNORD_Q));
        __m256 lo = _mm256_sub_ps(sv, _mm256_loadu_ps(b + t));
        int above = _mm256_movemask_ps(_mm256_cmp_ps(lo, _mm256_set1_ps(h[0].value), _CMP_GT_OQ));
        while (above) {
            int lane = __builtin_ctz(above);
            above &= above - 1;
            float v = s[t + lane] - b[t + lane];
            if (v > h[0].value) {
                h[0] = (entry_t){v, t + lane};
                sift_down(h, k, 0);
            }
        }
    }
    for (; t < n; ++t) {
        float v = s[t] - b[t];
        nan |= s[t] != s[t];
        if (v > h[0].value) {
            h[0] = (entry_t){v, t};
            sift_down(h, k, 0);
        }
    }
    for (int i = 0; i < k; ++i) nan |= s[i] != s[i];
    *kth = h[0].value;
    return nan | (_mm256_movemask_ps(unordered) != 0);
}

/* The candidates of each of `rows` rows of the (rows, n) sketch (row_bounds, with r[row] and, where e is
 * given, e[row] and wn), the rows spread over `threads`. `by_row` 0: their union into `mark` (n bytes,
 * 1 = candidate); returns how many. `by_row` 1 (rows <= 64): each row's own as bit `row` of the n
 * 64-bit words at `mark`; returns how many (row, token) pairs. -1 for a NaN in the sketch, out of memory
 * or arguments it does not take. */
int64_t gpt2serve_candidates(const float *sketch, int rows, int64_t n, const float *slack, const float *r,
                             const float *e, const float *wn, int k, void *mark, int by_row, int threads) {
    if (k < 1 || n < k || rows < 1 || threads < 1 || (by_row && rows > 64)) return -1;
    const int team = by_row ? threads : 1;
    uint64_t *words = by_row ? calloc((size_t)(n * team), sizeof *words) : NULL; /* each thread's bits */
    if (by_row && !words) return -1;
    if (!by_row) memset(mark, 0, (size_t)n);
    int nan = 0, oom = 0;
#pragma omp parallel num_threads(team) reduction(| : nan, oom)
    {
        entry_t *h = malloc((size_t)k * sizeof *h);
        float *b = malloc((size_t)n * sizeof *b);
        uint64_t *mine = by_row ? words + (size_t)omp_get_thread_num() * n : NULL;
        uint8_t *any = mark;
        oom = !h || !b;
#pragma omp for schedule(dynamic, 1)
        for (int row = 0; row < rows; ++row) {
            const float *s = sketch + (int64_t)row * n;
            float kth;
            if (oom || (nan |= row_bounds(s, n, slack, r[row], e ? e[row] : 0.0f, e ? wn : NULL, k, b, h, &kth)))
                continue;
            if (by_row)
                for (int64_t t = 0; t < n; ++t) mine[t] |= s[t] + b[t] >= kth ? 1ull << row : 0;
            else
                for (int64_t t = 0; t < n; ++t) any[t] |= s[t] + b[t] >= kth;
        }
        free(h);
        free(b);
    }
    int64_t count = 0;
    for (int64_t t = 0; !nan && !oom && t < n; ++t) {
        uint64_t bits = 0;
        for (int i = 0; by_row && i < team; ++i) bits |= words[(size_t)i * n + t];
        if (by_row)
            ((uint64_t *)mark)[t] = bits, count += __builtin_popcountll(bits);
        else
            count += ((uint8_t *)mark)[t];
    }
    free(words);
    return nan || oom ? -1 : count;
}

enum { RESCORE_LANES = 8, RESCORE_AHEAD = 16 }; /* dot products at once; tokens prefetched ahead */

#ifdef __AVX512F__
/* out[row[i] * N + tok[i]] = x[row[i]] . W[tok[i]] for i < n (n <= RESCORE_LANES; the lanes past n
 * repeat lane 0's work, unstored), each summed as gemv.c sums a float32 output. */
static void rescore_lanes(const float *x, int K, const float *W, int64_t N, int64_t *tok, int *row, int n,
                          float *out) {
    const float *w[RESCORE_LANES], *xr[RESCORE_LANES];
    __m512 acc[RESCORE_LANES];
    for (int i = 0; i < RESCORE_LANES; ++i) {
        int j = i < n ? i : 0;
        w[i] = W + tok[j] * K, xr[i] = x + (size_t)row[j] * K, acc[i] = _mm512_setzero_ps();
    }
    int k = 0;
    for (; k + 16 <= K; k += 16)
        for (int i = 0; i < RESCORE_LANES; ++i)
            acc[i] = _mm512_fmadd_ps(_mm512_loadu_ps(w[i] + k), _mm512_loadu_ps(xr[i] + k), acc[i]);
    if (k < K) /* K % 16 == 8: gemv.c's 8-wide last step, upper lanes zero */
        for (int i = 0; i < RESCORE_LANES; ++i) {
            __m512 w8 = _mm512_maskz_mov_ps(0x00FF, _mm512_castps256_ps512(_mm256_loadu_ps(w[i] + k)));
            __m512 x8 = _mm512_maskz_mov_ps(0x00FF, _mm512_castps256_ps512(_mm256_loadu_ps(xr[i] + k)));
            acc[i] = _mm512_fmadd_ps(w8, x8, acc[i]);
        }
    for (int i = 0; i < n; ++i) out[(size_t)row[i] * N + tok[i]] = _mm512_reduce_add_ps(acc[i]) * 1.0f + 0.0f;
}
#endif

/* The exact logits of each row's candidates: out[m * N + t] = x[m] . W[t] for each token t and row m set in
 * mark[t] (gpt2serve_candidates' by_row bits, M <= 64), summed as gemv.c's float32 blocks sum (16 lanes
 * along K, then _mm512_reduce_add_ps, an 8-wide last step where 16 does not divide K; + 0.0f as its
 * missing bias adds), so bit for bit the full head's; other entries of out are left as they are. Each
 * head row is read once, for all the rows that need it, prefetched RESCORE_AHEAD tokens ahead, and
 * RESCORE_LANES dot products run side by side (each a chain of dependent FMAs); the tokens are split
 * over `threads`. AVX-512 builds (-1 elsewhere, or for arguments it does not take), else 0. */
int gpt2serve_rescore(const float *x, int M, int K, const float *W, int64_t N, const uint64_t *mark, float *out,
                      int threads) {
#ifdef __AVX512F__
    if (M < 1 || M > 64 || K < 8 || K % 8 || threads < 1) return -1;
#pragma omp parallel num_threads(threads)
    {
        const int nt = omp_get_num_threads(), id = omp_get_thread_num();
        const int64_t t0 = N * id / nt, t1 = N * (id + 1) / nt;
        int64_t tok[RESCORE_LANES];
        int row[RESCORE_LANES], pending = 0;
        for (int64_t t = t0; t < t1; ++t) {
            if (t + RESCORE_AHEAD < t1 && mark[t + RESCORE_AHEAD])
                for (int k = 0; k < K; k += 16) _mm_prefetch((const char *)(W + (t + RESCORE_AHEAD) * K + k), _MM_HINT_T0);
            for (uint64_t bits = mark[t]; bits; bits &= bits - 1) {
                tok[pending] = t, row[pending] = __builtin_ctzll(bits);
                if (++pending == RESCORE_LANES) rescore_lanes(x, K, W, N, tok, row, pending, out), pending = 0;
            }
        }
        if (pending) rescore_lanes(x, K, W, N, tok, row, pending, out);
    }
    return 0;
#else
    (void)x, (void)M, (void)K, (void)W, (void)N, (void)mark, (void)out, (void)threads;
    return -1;
#endif
}

/* -- torch's CPU generator (mt19937), as torch.Generator.get_state() lays it out ---------------------- */

enum { MT_N = 624, MT_M = 397 };

typedef struct {  /* the head of CPUGeneratorImplState's legacy part */
    uint64_t the_initial_seed;
    int32_t left, seeded;
    uint64_t next;
    uint64_t state[MT_N];
} mt_state_t;

static inline uint32_t twist(uint32_t u, uint32_t v) {
    return (((u & 0x80000000u) | (v & 0x7fffffffu)) >> 1) ^ ((v & 1u) ? 0x9908b0dfu : 0u);
}

static void next_state(uint32_t *restrict p) {
    for (int i = 0; i < MT_N - MT_M; ++i) p[i] = p[i + MT_M] ^ twist(p[i], p[i + 1]);
    for (int i = MT_N - MT_M; i < MT_N - 1; ++i) p[i] = p[i + MT_M - MT_N] ^ twist(p[i], p[i + 1]);
    p[MT_N - 1] = p[MT_M - 1] ^ twist(p[MT_N - 1], p[0]);
}

static inline uint32_t temper(uint32_t y) {
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    return y ^ (y >> 18);
}

static inline double to_uniform(uint32_t hi, uint32_t lo) { /* torch's uniform_real for double, from */
    uint64_t r = ((uint64_t)hi << 32) | lo;                     /* two tempered words */
    return (double)(r & ((1ull << 53) - 1)) * (1.0 / (double)(1ull << 53));
}

/* gpt2serve_uniform without its argument checks (`at` ascending and within n). Each segment of the
 * generator's words is tempered whole (vectorized) before the draws at `at` are read from it. */
static int advance_uniform(mt_state_t *s, int64_t n, const int64_t *at, int64_t n_at, double *out) {
    uint32_t mt[MT_N], tw[MT_N];
    for (int i = 0; i < MT_N; ++i) mt[i] = (uint32_t)s->state[i];
    int64_t left = s->left, next = (int64_t)s->next, g = 0, words = 2 * n;  /* g: words consumed */
    uint32_t carry = 0;  /* the last tempered word of the previous segment */
    int64_t j = 0;
    int zero = 0;
    while (g < words) {
        const uint32_t *seg;
        int64_t avail;
        int twisted = left == 1;  /* the next word comes after a twist */
        if (twisted) {
            next_state(mt);
            seg = mt, avail = MT_N;
        } else {
            seg = mt + next, avail = left - 1;
        }
        int64_t c = avail < words - g ? avail : words - g;
        uint32_t any_zero = 0;
        for (int64_t i = 0; i < c; ++i) {
            tw[i] = temper(seg[i]);
            any_zero |= seg[i] == 0;
        }
        if (any_zero) /* a lo word (odd g) of 0 makes u == 0 when its hi word has no low 21 bits set */
            for (int64_t i = 0; i < c; ++i)
                if (((g + i) & 1) && seg[i] == 0 && !((i ? tw[i - 1] : carry) & 0x1fffffu)) zero = 1;
        if (!at) /* every draw whose lo word is in this segment */
            for (int64_t w = g | 1; w < g + c; w += 2) out[w / 2] = to_uniform(w > g ? tw[w - g - 1] : carry, tw[w - g]);
        for (; at && j < n_at && 2 * at[j] + 1 < g + c; ++j) {
            int64_t lo = 2 * at[j] + 1 - g;
            out[j] = to_uniform(lo ? tw[lo - 1] : carry, tw[lo]);
        }
        carry = tw[c - 1];
        if (twisted) {
            next = c, left = MT_N + 1 - c;
        } else {
            next += c, left -= c;
        }
        g += c;
    }
    for (int i = 0; i < MT_N; ++i) s->state[i] = mt[i];
    s->left = (int32_t)left;
    s->next = (uint64_t)next;
    return zero;
}

/* Advance the generator in `state` (bytes of torch.Generator.get_state(), updated in place) exactly as
 * `torch.empty(n, dtype=torch.float64).uniform_()` would, writing only the draws at the ascending
 * indices `at` (n_at of them; every draw where `at` is NULL) to `out`. Returns 1 if any of the n draws is
 * exactly 0 (then the caller must let torch draw), else 0; -1 for arguments it does not take. */
int gpt2serve_uniform(void *state, int64_t n, const int64_t *at, int64_t n_at, double *out) {
    mt_state_t *s = state;
    if (n < 0 || s->left < 1 || s->left > MT_N + 1 || s->next > MT_N) return -1;
    for (int j = 0; at && j < n_at; ++j)
        if (at[j] < 0 || at[j] >= n || (j && at[j] <= at[j - 1])) return -1;
    return advance_uniform(s, n, at, n_at, out);
}

/* A work buffer of at least `bytes`, one per (calling thread, slot), kept between calls and grown as
 * needed: a fresh vocabulary-sized malloc each call would be mapped, faulted in and zeroed by the kernel
 * every time, which costs more than the work done in it. NULL out of memory. */
void *gpt2serve_scratch(int slot, size_t bytes) {
    static _Thread_local void *held[SCRATCH_SLOTS];
    static _Thread_local size_t size[SCRATCH_SLOTS];
    if (slot < 0 || slot >= SCRATCH_SLOTS) return NULL;
    if (bytes > size[slot]) {
        void *grown = realloc(held[slot], bytes);
        if (!grown) return NULL;
        held[slot] = grown, size[slot] = bytes;
    }
    return held[slot];
}

/* torch.multinomial(probs, 1) for one row of n float32 probabilities, the generator in `state` advanced in
 * place past n uniforms as torch's draw does: the first index of the largest probs[i] / e_i, e_i =
 * -log1p(-u_i) in double (glibc's log1p, as torch) rounded to float, the division in float. Only the
 * uniforms of the positive probabilities are computed (a zero's ratio is 0 and cannot win). e_i >= u_i,
 * so probs[i] / u_i bounds each ratio from above and only the few indices whose bound reaches the best
 * ratio need the logarithm. Returns the index; -2 for a row torch refuses (a negative, inf or NaN entry,
 * or none positive); -1 where a draw is exactly 0 (torch's own special case) or out of memory. */
int64_t gpt2serve_multinomial(void *state, const float *probs, int64_t n) {
    mt_state_t *s = state;
    if (n < 1 || s->left < 1 || s->left > MT_N + 1 || s->next > MT_N) return -1;
    int64_t *at = gpt2serve_scratch(0, (size_t)n * sizeof *at), m = 0;
    double *u = gpt2serve_scratch(1, (size_t)n * sizeof *u), *bound = gpt2serve_scratch(4, (size_t)n * 8);
    float *p = gpt2serve_scratch(3, (size_t)n * sizeof *p);  /* the positive probabilities, packed */
    if (!at || !u || !p || !bound) return -1;
    int bad = 0;
    for (int64_t i = 0; i < n; ++i) {
        float v = probs[i];
        bad |= !(v >= 0.0f && v < INFINITY);
        at[m] = i, p[m] = v;
        m += v > 0.0f;
    }
    if (bad || !m) return -2;
    if (advance_uniform(s, n, at, m, u) != 0) return -1;
    enum { LANES = 8 };  /* independent maxima: no chain of dependent comparisons */
    double top = -1.0, lane[LANES];
    for (int l = 0; l < LANES; ++l) lane[l] = -1.0;
    for (int64_t j = 0; j < m; ++j) bound[j] = p[j] / u[j];  /* contiguous: vectorized */
    int64_t j0 = 0;
    for (; j0 + LANES <= m; j0 += LANES)
        for (int l = 0; l < LANES; ++l) lane[l] = bound[j0 + l] > lane[l] ? bound[j0 + l] : lane[l];
    for (; j0 < m; ++j0) top = bound[j0] > top ? bound[j0] : top;
    for (int l = 0; l < LANES; ++l) top = lane[l] > top ? lane[l] : top;
    int64_t best_j = 0;
    while (bound[best_j] != top) ++best_j;
    float best = p[best_j] / (float)(-log1p(-u[best_j]));
    double reach = (double)best * (1.0 - 1e-6);  /* a ratio can exceed its bound by ~1.2e-7 (roundings) */
    for (int64_t j = 0; j < m; ++j) {
        if (bound[j] < reach || j == best_j) continue;
        float r = p[j] / (float)(-log1p(-u[j]));
        if (r > best || (r == best && j < best_j)) best = r, best_j = j;
    }
    return at[best_j];
}

/* gpt2serve_multinomial for `rows` rows of n probabilities, row r with the generator state states[r]
 * (advanced in place), spread over the threads; each token (or the row's negative code) into tokens[r]. */
void gpt2serve_multinomial_rows(void *const *states, const float *probs, int rows, int64_t n, int64_t *tokens,
                                int threads) {
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int r = 0; r < rows; ++r) tokens[r] = gpt2serve_multinomial(states[r], probs + (size_t)r * n, n);
}

/* -- a top-k row's whole draw (sampling_fast.draw_top_k) ------------------------------------------------ */

enum { MAX_TOP_K = 256 };

typedef struct {
    int64_t id;
    double weight;
} survivor_t;

static int by_id(const void *a, const void *b) {
    int64_t x = ((const survivor_t *)a)->id, y = ((const survivor_t *)b)->id;
    return (x > y) - (x < y);
}

/* What HF's warpers (temperature, top-k, then top-p) and torch.multinomial draw from one row of V scores,
 * computed from its top_k + 1 largest values alone: their softmax weights in double, top-p's cut over
 * them, and only the survivors' uniforms drawn (the generator in `state`, bytes of get_state(), advanced
 * past all V in place). The reference's float32 arithmetic and these doubles agree to ~2e-5 over at most
 * MAX_TOP_K terms, so a cut or a winning ratio within `margin` (relative) of going the other way is left
 * to the caller, as are ties (which torch's tie-breaking settles), a non-finite kept value and a uniform
 * of exactly 0. `threshold`: float32(1 - top_p), or negative for no top-p. Returns the token, or -1
 * where the caller must decide (the state then is not to be used). */
static int64_t draw_top_k_row(const float *row, int64_t V, float temperature, int top_k, float threshold,
                              double margin, mt_state_t *state) {
    float values[MAX_TOP_K + 1];
    int64_t indices[MAX_TOP_K + 1];
    survivor_t kept[MAX_TOP_K];
    int64_t at[MAX_TOP_K];
    double u[MAX_TOP_K];
    if (top_k < 1 || top_k > MAX_TOP_K || top_k >= V) return -1;
    if (state->left < 1 || state->left > MT_N + 1 || state->next > MT_N) return -1;
    if (gpt2serve_topk(row, 1, V, NULL, top_k + 1, values, indices) != 0) return -1;
    if (temperature != 1.0f) { /* the reference's float32 division; it may merge neighbours into ties */
        for (int j = 0; j <= top_k; ++j) values[j] /= temperature;
        for (int j = 1; j <= top_k; ++j)
            if (values[j] == values[j - 1]) return -1;
    }
    if (!(isfinite(values[0]) && isfinite(values[top_k - 1]))) return -1;
    double total = 0.0;
    for (int j = 0; j < top_k; ++j) {
        kept[j] = (survivor_t){indices[j], exp((double)values[j] - (double)values[0])};
        total += kept[j].weight;
    }
    int n = top_k;
    if (threshold >= 0.0f) { /* ascending cumulative probabilities <= threshold go, the largest stays */
        double cumulative = 0.0;
        while (n > 1) {
            cumulative += kept[n - 1].weight / total;
            if (fabs(cumulative - threshold) <= margin * threshold) return -1;
            if (cumulative > threshold) break;
            --n;
        }
        total = 0.0;
        for (int j = 0; j < n; ++j) total += kept[j].weight;
    }
    qsort(kept, (size_t)n, sizeof *kept, by_id); /* vocabulary order: argmax's tie rule */
    for (int j = 0; j < n; ++j) at[j] = kept[j].id;
    if (advance_uniform(state, V, at, n, u) != 0) return -1;
    int best = 0;
    double best_ratio = -1.0, runner_up = 0.0;
    for (int j = 0; j < n; ++j) {
        double e = (float)(-log1p(-u[j])); /* as torch rounds it: float32 */
        double ratio = kept[j].weight / total / e;
        if (ratio > best_ratio) {
            runner_up = best_ratio > runner_up ? best_ratio : runner_up;
            best_ratio = ratio, best = j;
        } else if (ratio > runner_up) {
            runner_up = ratio;
        }
    }
    if (!(best_ratio > runner_up * (1.0 + margin))) return -1;
    return kept[best].id;
}

/* draw_top_k_row for rows `pick[0..n)` of x (rows of V floats), row i with temperature[i], top_k[i],
 * threshold[i] and the generator state states[i] (each advanced in place), spread over `threads`; each
 * token (or -1) into tokens[i]. */
void gpt2serve_draw_top_k(const float *x, int64_t V, const int64_t *pick, int n, const float *temperature,
                          const int *top_k, const float *threshold, double margin, void *const *states,
                          int64_t *tokens, int threads) {
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int i = 0; i < n; ++i)
        tokens[i] = draw_top_k_row(x + pick[i] * V, V, temperature[i], top_k[i], threshold[i], margin,
                                   states[i]);
}
