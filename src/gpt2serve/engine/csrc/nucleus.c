/* Top-p (nucleus) sampling's cut, exactly as Hugging Face's TopPLogitsWarper makes it, in two calls around
 * one torch.softmax (sampling_fast.top_p_exact):
 *
 *   gpt2serve_sort_values: the row's values in ascending order, without their indices (a radix sort of
 *     the values alone: torch.sort's values). HF's softmax of the sorted row
 *     normalizes by a float32 sum taken in sorted order, so its probabilities, and the cut, depend on
 *     that order; the caller takes torch's own softmax of these values, which is therefore bit for bit
 *     HF's.
 *   gpt2serve_top_p_apply: HF's cumulative sum over those probabilities (torch's CPU cumsum adds in
 *     double and rounds each prefix to float), the positions with cumsum <= 1 - top_p removed (the
 *     largest never), and the row masked: every score below the smallest kept value becomes -inf.
 *
 * The indices HF's sort carries are not needed: a value is kept or removed whatever its index, except
 * where equal values straddle the cut, and there HF's unstable sort decides (reported, not guessed).
 * The `_rows` forms run either call for several rows at once, the rows spread over the threads
 * (sampling_fast.draw_top_p); each row's result is the one-row call's.
 */
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

void *gpt2serve_scratch(int slot, size_t bytes); /* sampling.c: a per-thread buffer kept between calls */

enum { SORT_SCRATCH = 2 }; /* sampling.c's multinomial holds slots 0, 1, 3 and 4 */
enum { DIGIT_BITS = 11, DIGITS = 1 << DIGIT_BITS, PASSES = 3 };  /* 3 passes of 11 bits: 20% faster than 4 of 8 */
/* A row's top digit (the sign, the exponent and two bits) takes few values, so neighbouring keys often
 * share a counter: one chain of dependent memory updates. Each pass walks LANES parts of the row in
 * lockstep, each part with its own counters, which makes LANES independent chains. */
enum { LANES = 4 };

static inline uint32_t key_of(float v) { /* unsigned order of keys == float order (-0.0 before 0.0) */
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    return u & 0x80000000u ? ~u : u | 0x80000000u;
}

static inline float value_of(uint32_t key) {
    uint32_t u = key & 0x80000000u ? key & 0x7fffffffu : ~key;
    float v;
    memcpy(&v, &u, sizeof v);
    return v;
}

/* One stable pass of the LSD radix sort: the n keys of a into b by their digit at `shift`, part s of the
 * row (keys s*q.. of q = n / LANES, the last part to the end) counted and placed with count[s]. Returns
 * 0, b untouched, where every key has the same digit (the pass would not change their order). */
static int radix_pass(const uint32_t *a, uint32_t *b, int64_t n, int shift, uint32_t (*count)[DIGITS]) {
    const int64_t q = n / LANES;
#define DIGIT(k) (((k) >> shift) & (DIGITS - 1))
    memset(count, 0, LANES * sizeof *count);
    for (int64_t i = 0; i < q; ++i)
        for (int s = 0; s < LANES; ++s) ++count[s][DIGIT(a[s * q + i])];
    for (int64_t j = LANES * q; j < n; ++j) ++count[LANES - 1][DIGIT(a[j])];
    uint32_t total = 0;  /* n < 2^32: the caller checks */
    for (int v = 0; v < DIGITS; ++v) {
        uint32_t before = total;
        for (int s = 0; s < LANES; ++s) {
            uint32_t c = count[s][v];
            count[s][v] = total;
            total += c;
        }
        if (total - before == n) return 0;
    }
    for (int64_t i = 0; i < q; ++i)
        for (int s = 0; s < LANES; ++s) {
            uint32_t k = a[s * q + i];
            b[count[s][DIGIT(k)]++] = k;
        }
    for (int64_t j = LANES * q; j < n; ++j) b[count[LANES - 1][DIGIT(a[j])]++] = a[j];
#undef DIGIT
    return 1;
}

/* x (n floats) sorted ascending into `sorted`: an LSD radix sort of the keys, PASSES passes of DIGIT_BITS
 * bits (radix_pass). Returns 0; 1 where the row's largest value is not finite (a NaN, +inf, or every value
 * -inf: softmax would not give probabilities); -1 out of memory. */
int gpt2serve_sort_values(const float *x, int64_t n, float *sorted) {
    const size_t keys = (size_t)n * 2 * sizeof(uint32_t), counts = LANES * DIGITS * sizeof(uint32_t);
    uint32_t *buf = n < 1 ? NULL : gpt2serve_scratch(SORT_SCRATCH, keys + counts);
    if (!buf || n >= (int64_t)1 << 32) return -1;
    uint32_t *a = buf, *b = buf + n, (*count)[DIGITS] = (uint32_t (*)[DIGITS])(buf + 2 * n), top = 0;
    for (int64_t i = 0; i < n; ++i) {
        uint32_t k = key_of(x[i]);
        a[i] = k;
        top = k > top ? k : top;
    }
    float largest = value_of(top);
    /* a NaN's key lies above +inf's (positive NaN) or below -inf's (negative): check every value */
    int bad = !(largest < INFINITY && largest > -INFINITY);
    for (int64_t i = 0; i < n && !bad; ++i) bad = x[i] != x[i];
    if (bad) return 1;
    for (int d = 0; d < PASSES; ++d)
        if (radix_pass(a, b, n, DIGIT_BITS * d, count)) {
            uint32_t *t = a;
            a = b, b = t;
        }
    for (int64_t i = 0; i < n; ++i) sorted[i] = value_of(a[i]);
    return 0;
}

/* HF's top-p over a row: `sorted` its values ascending (gpt2serve_sort_values), `probs` torch's softmax
 * of `sorted`; positions are removed while fl32(sum of probs[0..i] in double) <= threshold (float32
 * 1 - top_p), the last never. Writes x with every value below the smallest kept one as -inf into `out`
 * (NULL: not written) and `*cut` (that value). Returns how many tokens are kept, or -1 where the removed
 * and kept positions hold equal values (HF's unstable sort would decide which of them go). */
int64_t gpt2serve_top_p_apply(const float *x, const float *sorted, const float *probs, int64_t n,
                              float threshold, float *out, float *cut) {
    double acc = 0.0;
    int64_t removed = 0;
    while (removed < n - 1) {
        acc += probs[removed];
        if (!((float)acc <= threshold)) break;
        ++removed;
    }
    if (removed && sorted[removed - 1] == sorted[removed]) return -1;
    const float c = sorted[removed];
    *cut = c;
    int64_t kept = 0;
    for (int64_t i = 0; i < n; ++i) {
        int keep = x[i] >= c;
        kept += keep;
        if (out) out[i] = keep ? x[i] : -INFINITY;
    }
    return kept;
}

/* gpt2serve_sort_values of `rows` rows of n floats (x and sorted row-major), each row's result in rc. */
void gpt2serve_sort_values_rows(const float *x, int rows, int64_t n, float *sorted, int *rc, int threads) {
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int r = 0; r < rows; ++r) rc[r] = gpt2serve_sort_values(x + (size_t)r * n, n, sorted + (size_t)r * n);
}

/* gpt2serve_top_p_apply of `rows` rows of n floats, row r with threshold[r]; its count (or -1) in kept[r]. */
void gpt2serve_top_p_apply_rows(const float *x, const float *sorted, const float *probs, int rows, int64_t n,
                                const float *threshold, float *out, int64_t *kept, int threads) {
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int r = 0; r < rows; ++r) {
        size_t at = (size_t)r * n;
        float cut;
        kept[r] = gpt2serve_top_p_apply(x + at, sorted + at, probs + at, n, threshold[r], out + at, &cut);
    }
}

/* The sum (in double) and the largest of n float32 probabilities, for top-p's partial selection
 * (sampling_fast.top_p_cut) without two of torch's reductions, which split a vocabulary-sized row over
 * the OpenMP threads and wait for each other where other work holds a core. */
void gpt2serve_mass(const float *p, int64_t n, double *total, float *peak) {
    enum { LANES = 8 };  /* independent sums and maxima: no chain of dependent additions */
    double sum[LANES] = {0};
    float top[LANES];
    int nan = 0;
    for (int l = 0; l < LANES; ++l) top[l] = -INFINITY;
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int l = 0; l < LANES; ++l) {
            float v = p[i + l];
            sum[l] += v;
            top[l] = v > top[l] ? v : top[l];
            nan |= v != v;
        }
    for (; i < n; ++i) {
        sum[0] += p[i];
        top[0] = p[i] > top[0] ? p[i] : top[0];
        nan |= p[i] != p[i];
    }
    double s = 0.0;
    float t = -INFINITY;
    for (int l = 0; l < LANES; ++l) s += sum[l], t = top[l] > t ? top[l] : t;
    *total = nan ? NAN : s, *peak = nan ? NAN : t;
}

/* The row's largest value and, for each of the nd gaps, how many values lie within that gap of it
 * (x >= max - gap): each such value holds at least exp(-gap) of the largest one's probability, so the
 * counts bound the softmax's sum from below without an exponential (sampling_fast.top_p_cut: whether a
 * partial selection can hold the nucleus at all). */
void gpt2serve_near_max(const float *x, int64_t n, const float *gaps, int nd, int64_t *counts, float *max) {
    __m256 top8 = _mm256_set1_ps(-INFINITY);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) top8 = _mm256_max_ps(top8, _mm256_loadu_ps(x + i));
    float lanes[8], top = -INFINITY;
    _mm256_storeu_ps(lanes, top8);
    for (int l = 0; l < 8; ++l) top = lanes[l] > top ? lanes[l] : top;
    for (; i < n; ++i) top = x[i] > top ? x[i] : top;
    *max = top;  /* a NaN is not seen here: the caller's softmax path meets it */
    for (int d = 0; d < nd; ++d) {
        const float floor = top - gaps[d];
        __m256i c8 = _mm256_setzero_si256();
        const __m256 f8 = _mm256_set1_ps(floor);
        for (i = 0; i + 8 <= n; i += 8) /* a true comparison is -1 in every bit */
            c8 = _mm256_sub_epi32(c8, _mm256_castps_si256(_mm256_cmp_ps(_mm256_loadu_ps(x + i), f8, _CMP_GE_OQ)));
        int32_t part[8];
        _mm256_storeu_si256((__m256i *)part, c8);
        int64_t c = 0;
        for (int l = 0; l < 8; ++l) c += part[l];
        for (; i < n; ++i) c += x[i] >= floor;
        counts[d] = c;
    }
}
