/* Attention over the paged KV cache, reading each key and value where it lies.

   The work is a list of items, each a run of query rows of one sequence: a decode (one
   row), a speculative check (the last token and its guesses), or a piece of a prefill
   chunk. Query row r of an item sits at position first_pos + r of its sequence; query
   head h attends to the keys at positions max(0, pos - window) .. pos of kv head
   h / (n_head / n_kv_head) (causal, sliding window). Position p lives in block
   block_table[p / block_size], row p % block_size; the item's keys are already written.

   Layouts (contiguous; float32, or bfloat16 with float32 arithmetic):
     q, out           [num_tokens, n_head, head_dim]  (the step's flat batch)
     k_pool, v_pool   [num_blocks, block_size, n_kv_head, head_dim]
     block_tables     [num_seqs, table_width]  (int64)
     items            [num_items, 4]  (int64: block table row, first query row, rows, first_pos)

   The gathering SDPA path copies every visible key and value once and reads them twice;
   decode attention is bound by memory traffic, so reading them once, in place, is the
   whole gain, and a short chunk's rows share each read. Keys are visited in tiles of up
   to TILE positions of one block; in a tile, each kv head's rows (bfloat16 ones widened
   to float32 once) serve all query heads of its group and all the item's rows while they
   are in L1. Every row's and head's scores are kept in a scratch row, turned into
   softmax weights, and values are then visited the same way.

   Each tile's successor is prefetched into L2 while the tile is worked on. On AVX-512,
   bfloat16 rows are read in place with intrinsics (below), and with AVX-512 BF16 the query
   meets the keys in bfloat16 pair products; elsewhere the loops are plain C that the
   compiler vectorises for whatever CPU it builds for. The body is one static inline
   function taking the element type, head_dim and the item's row count as arguments;
   the entry point calls it with constants for the common cases (a decode's one row among
   them), so each call is compiled into its own copy with the dtype branch folded away
   and the loops unrolled. */

#include <math.h>
#include <stdlib.h>

#include "bf16.h"

/* e^x for x <= 0, to about 2 ulp, in operations the compiler vectorises (expf is a call).
   x = n ln2 + r with |r| <= ln2 / 2; e^r by its Taylor series to r^7 (error < 1e-8); 2^n
   built in the exponent bits. Below -87 the result is clamped near 1e-38: a softmax weight
   that small is lost against the largest weight, 1, anyway. */
static ALWAYS_INLINE float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float round = 12582912.0f;  /* 1.5 * 2^23: adding it rounds to an integer */
    const float n = (x * 1.44269504f + round) - round;
    const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;  /* ln2 in two parts */
    float p = 1.0f / 5040;
    p = p * r + 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return p * two_n;
}

enum { LANES = 8, TILE = 16 };

/* The n <= TILE rows rows + t * stride (bytes) of head_dim elements as float32 rows, *step
   floats apart: float32 rows where they lie, bfloat16 ones widened into buf. Widening a
   tile once serves all query heads of a group, and leaves the loops below one dtype. */
static ALWAYS_INLINE const float *as_float(const char *rows, size_t stride, int64_t n, int64_t head_dim,
                                           int bf16, float *buf, int64_t *step) {
    if (!bf16) {
        *step = (int64_t)(stride / sizeof(float));
        return (const float *)rows;
    }
    for (int64_t t = 0; t < n; t++) {
        const uint16_t *row = (const uint16_t *)(rows + (size_t)t * stride);
#pragma omp simd
        for (int64_t i = 0; i < head_dim; i++) buf[t * head_dim + i] = bf16_to_float(row[i]);
    }
    *step = head_dim;
    return buf;
}

/* out[t] = q . k_t for the n <= TILE rows k_t = k + t * step. Each dot product is summed
   in LANES partial sums, which are then added up for all rows at once: a row at a time,
   adding a vector's lanes together would cost as much as the products. */
static ALWAYS_INLINE void dots(const float *q, const float *k, int64_t step, int64_t n, int64_t head_dim,
                               float *out) {
    float part[TILE][LANES];
    const int64_t whole = head_dim - head_dim % LANES;
    for (int64_t t = 0; t < n; t++) {
        for (int l = 0; l < LANES; l++) part[t][l] = 0.0f;
        for (int64_t c = 0; c < whole; c += LANES)
            for (int l = 0; l < LANES; l++) part[t][l] += q[c + l] * k[t * step + c + l];
    }
#pragma omp simd
    for (int64_t t = 0; t < n; t++) {
        float acc = 0.0f;
        for (int l = 0; l < LANES; l++) acc += part[t][l];
        for (int64_t i = whole; i < head_dim; i++) acc += q[i] * k[t * step + i];
        out[t] = acc;
    }
}

/* o += sum_t w[t] v_t for the n rows v_t = v + t * step */
static ALWAYS_INLINE void add_weighted(float *restrict o, const float *v, int64_t step, const float *w, int64_t n,
                                       int64_t head_dim) {
    for (int64_t t = 0; t < n; t++)
#pragma omp simd
        for (int64_t i = 0; i < head_dim; i++) o[i] += w[t] * v[t * step + i];
}

#if defined(__AVX512F__)
/* bfloat16 rows read in place, 32 elements to a 512-bit load (where head_dim is a multiple
   of 32). Seen as 16 32-bit lanes, each lane holds an even element in its low half and the
   next odd one in its high half, and a bfloat16 is the high half of its float32: `lane << 16`
   is the even element as float32, `lane & 0xFFFF0000` the odd one. Two instructions widen
   32 elements, with no copy through memory. They arrive split by parity, which dot products
   do not mind once the query is split the same way; value sums are put back in order once
   per sequence. */
#include <immintrin.h>
#define BF16_VECTORS 1
enum { CHUNK = 32 };  /* bfloat16 per 512-bit load */

static ALWAYS_INLINE __m512 even_half(__m512i x) { return _mm512_castsi512_ps(_mm512_slli_epi32(x, 16)); }
static ALWAYS_INLINE __m512 odd_half(__m512i x) {
    return _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32((int)0xFFFF0000u)));
}

/* The result's lane t is the sum of a[t]'s 16 lanes: a tree of shuffles and adds that halves
   the vectors at each level, 45 instructions where 16 separate reductions take over 100. */
static ALWAYS_INLINE __m512 lane_sums(const __m512 a[16]) {
    __m512 b[8], c[4], d[2];
    for (int i = 0; i < 8; i++)  /* per 128-bit lane: partial sums of a[2i], a[2i+1], interleaved */
        b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 4; i++)  /* per 128-bit lane: partial sums of a[4i] .. a[4i + 3] */
        c[i] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    for (int i = 0; i < 2; i++)  /* add 128-bit lanes pairwise */
        d[i] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(d[0], d[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(d[0], d[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

/* out[t] = q . k_t for the n <= TILE bfloat16 rows k_t = rows + t * stride (bytes); q is
   float32 split by parity: per chunk of 32, its 16 even elements, then its 16 odd ones. */
static ALWAYS_INLINE void dots_bf16(const float *q, const char *rows, size_t stride, int64_t n,
                                    int64_t head_dim, float *out) {
    __m512 acc[TILE];
    for (int64_t t = 0; t < TILE; t++) {
        acc[t] = _mm512_setzero_ps();
        if (t < n)
            for (int64_t c = 0; c < head_dim; c += CHUNK) {
                const __m512i x = _mm512_loadu_si512(rows + (size_t)t * stride + 2 * c);
                acc[t] = _mm512_fmadd_ps(_mm512_loadu_ps(q + c), even_half(x), acc[t]);
                acc[t] = _mm512_fmadd_ps(_mm512_loadu_ps(q + c + 16), odd_half(x), acc[t]);
            }
    }
    _mm512_mask_storeu_ps(out, (__mmask16)((1u << n) - 1), lane_sums(acc));
}

/* o[i] += sum_t w[i][t] v_t for the n bfloat16 rows v_t = rows + t * stride (bytes) and
   query rows i < count <= ROWS, o split by parity as the query is. Each value row is
   widened once for all query rows (a chunk's rows and a GQA group's heads share a tile).
   Even and odd t go to separate sums, two chains of additions rather than one, and t goes
   in pairs so that every sum keeps a register of its own; a query row's sums run in the
   same order whatever count it comes with. */
enum { ROWS = 4 };
static ALWAYS_INLINE void add_weighted_bf16_rows(float *const *o, const char *rows, size_t stride,
                                                 const float *const *w, int64_t n, int64_t head_dim, int count) {
    for (int64_t c = 0; c < head_dim; c += CHUNK) {
        __m512 even[ROWS][2], odd[ROWS][2];
        for (int i = 0; i < count; i++) {
            even[i][0] = _mm512_loadu_ps(o[i] + c), even[i][1] = _mm512_setzero_ps();
            odd[i][0] = _mm512_loadu_ps(o[i] + c + 16), odd[i][1] = _mm512_setzero_ps();
        }
        for (int64_t t = 0; t < n; t += 2) {
            for (int parity = 0; parity < 2 && t + parity < n; parity++) {
                const __m512i x = _mm512_loadu_si512(rows + (size_t)(t + parity) * stride + 2 * c);
                const __m512 x_even = even_half(x), x_odd = odd_half(x);
                for (int i = 0; i < count; i++) {
                    const __m512 weight = _mm512_set1_ps(w[i][t + parity]);
                    even[i][parity] = _mm512_fmadd_ps(weight, x_even, even[i][parity]);
                    odd[i][parity] = _mm512_fmadd_ps(weight, x_odd, odd[i][parity]);
                }
            }
        }
        for (int i = 0; i < count; i++) {
            _mm512_storeu_ps(o[i] + c, _mm512_add_ps(even[i][0], even[i][1]));
            _mm512_storeu_ps(o[i] + c + 16, _mm512_add_ps(odd[i][0], odd[i][1]));
        }
    }
}

/* one query row's add_weighted_bf16_rows */
static ALWAYS_INLINE void add_weighted_bf16(float *o, const char *rows, size_t stride, const float *w, int64_t n,
                                            int64_t head_dim) {
    add_weighted_bf16_rows(&o, rows, stride, &w, n, head_dim, 1);
}

/* rows of n elements (n a multiple of 32) from split-by-parity order back to natural order */
static ALWAYS_INLINE void unsplit(float *x, int64_t n) {
    const __m512i low = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i high = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    for (int64_t c = 0; c < n; c += CHUNK) {
        const __m512 even = _mm512_loadu_ps(x + c), odd = _mm512_loadu_ps(x + c + 16);
        _mm512_storeu_ps(x + c, _mm512_permutex2var_ps(even, low, odd));
        _mm512_storeu_ps(x + c + 16, _mm512_permutex2var_ps(even, high, odd));
    }
}
#else  /* never called: without AVX-512 every row goes through as_float */
#define BF16_VECTORS 0
enum { CHUNK = 32 };
static inline void dots_bf16(const float *q, const char *rows, size_t stride, int64_t n, int64_t head_dim,
                             float *out) {}
static inline void add_weighted_bf16(float *o, const char *rows, size_t stride, const float *w, int64_t n,
                                     int64_t head_dim) {}
enum { ROWS = 4 };
static inline void add_weighted_bf16_rows(float *const *o, const char *rows, size_t stride,
                                          const float *const *w, int64_t n, int64_t head_dim, int count) {}
static inline void unsplit(float *x, int64_t n) {}
#endif

#if defined(__AVX512BF16__)  /* which comes with AVX-512F, whose lane_sums it uses */
#define PAIR_DOTS 1
/* out[t] = scale * (q . k_t) for the n <= TILE bfloat16 rows k_t = rows + t * stride (bytes),
   with q in bfloat16 as it lies: VDPBF16PS multiplies 32 pairs of bfloat16 exactly and adds
   them into 16 float32 sums, one instruction where widening the keys takes four. */
static ALWAYS_INLINE void dots_pairs(const uint16_t *q, const char *rows, size_t stride, int64_t n,
                                     int64_t head_dim, float scale, float *out) {
    __m512 acc[TILE];
    for (int64_t t = 0; t < TILE; t++) {
        acc[t] = _mm512_setzero_ps();
        if (t < n)
            for (int64_t c = 0; c < head_dim; c += CHUNK)
                acc[t] = _mm512_dpbf16_ps(acc[t], (__m512bh)_mm512_loadu_si512(q + c),
                                          (__m512bh)_mm512_loadu_si512(rows + (size_t)t * stride + 2 * c));
    }
    _mm512_mask_storeu_ps(out, (__mmask16)((1u << n) - 1), _mm512_mul_ps(lane_sums(acc), _mm512_set1_ps(scale)));
}
#else
#define PAIR_DOTS 0
static inline void dots_pairs(const uint16_t *q, const char *rows, size_t stride, int64_t n,
                              int64_t head_dim, float scale, float *out) {}
#endif

/* The tile that starts at position p: its rows in the pool, and in *n how many (to the
   next multiple of TILE in p's block, at most to position last). Tiles lie at fixed
   places in a block, so a query row's keys fall into the same tiles, summed in the same
   order, whatever row starts its work item: a row computes the same bits as a decode, in
   a speculative check as without one. */
static ALWAYS_INLINE const char *tile_at(const char *pool, const int64_t *table, int64_t p, int64_t last,
                                         int64_t block_size, size_t token_bytes, int64_t *n) {
    const int64_t start = p % block_size;
    *n = block_size - start < TILE - start % TILE ? block_size - start : TILE - start % TILE;
    *n = *n < last + 1 - p ? *n : last + 1 - p;
    return pool + (size_t)(table[p / block_size] * block_size + start) * token_bytes;
}

/* Ask for the tile at position p while the one before it is worked on: a tile is a few KiB
   of one block, and the blocks of a sequence lie anywhere in the pool, where the hardware
   prefetcher would not look. Into L2, not L1: L1 tracks few misses at once, and a tile's
   hundreds of lines asked for at once would stall there. */
static ALWAYS_INLINE void prefetch_tile(const char *pool, const int64_t *table, int64_t p, int64_t last,
                                        int64_t block_size, size_t token_bytes) {
    int64_t n;
    const char *rows = tile_at(pool, table, p, last, block_size, token_bytes, &n);
    for (size_t i = 0; i < (size_t)n * token_bytes; i += 64) __builtin_prefetch(rows + i, 0, 2);
}

/* Query rows waiting to take a tile's values together (add_weighted_bf16_rows): rows
   that see only part of the tile take theirs alone. */
struct value_rows {
    float *o[ROWS];
    const float *w[ROWS];
    int size;
};

/* o += w . (value rows at .. at + m - 1 of the n at rows), now or with the batch (where
   enough rows share the tiles) */
static ALWAYS_INLINE void take_values(struct value_rows *batch, int share, float *o, const char *rows, size_t stride,
                                      const float *w, int64_t at, int64_t m, int64_t n, int64_t head_dim) {
    if (!share || m < n) {
        add_weighted_bf16(o, rows + at * stride, stride, w, m, head_dim);
        return;
    }
    batch->o[batch->size] = o, batch->w[batch->size] = w;
    if (++batch->size == ROWS) {
        add_weighted_bf16_rows(batch->o, rows, stride, batch->w, n, head_dim, ROWS);
        batch->size = 0;
    }
}

/* the batch's last rows, each alone */
static ALWAYS_INLINE void flush_values(struct value_rows *batch, const char *rows, size_t stride, int64_t n,
                                       int64_t head_dim) {
    for (int i = 0; i < batch->size; i++) add_weighted_bf16(batch->o[i], rows, stride, batch->w[i], n, head_dim);
    batch->size = 0;
}

/* The attention of one work item (see paged_attention): count query rows of the sequence
   whose block table is table, from row token of q and out on, at positions first_pos ..
   first_pos + count - 1. Scratch for scores, the item's query and output rows, sums and a
   widened tile. */
static ALWAYS_INLINE void attend_item(const void *q, const char *keys, const char *values,
                                      const int64_t *table, void *out, int64_t token, int64_t count,
                                      int64_t first_pos, int64_t n_head, int64_t n_kv_head, int64_t head_dim,
                                      int64_t block_size, int64_t window, float scale, int bf16,
                                      float *scores, float *qs, float *os, float *sums, float *tile) {
    const int64_t row = n_head * head_dim, group = n_head / n_kv_head;
    const size_t head_bytes = (bf16 ? 2 : 4) * (size_t)head_dim, token_bytes = head_bytes * (size_t)n_kv_head;
    const int in_place = BF16_VECTORS && bf16 && head_dim % CHUNK == 0;  /* bfloat16 rows read where they lie */
    const int pairs = PAIR_DOTS && in_place;  /* and the query meets keys in bfloat16 pairs */
    const int64_t last = first_pos + count - 1;
    const int64_t first = window < 0 || first_pos - window < 0 ? 0 : first_pos - window;
    const int64_t n_keys = last - first + 1;
    /* scaled once here rather than every score; where rows are read in place, split by
       parity as the keys arrive: per chunk, even elements first, then odd ones (pair
       products read the query as it lies and scale the scores) */
    if (!pairs)
        for (int64_t i = 0; i < count * row; i++) {
            const int64_t at = in_place ? i - i % CHUNK + (i % 2) * (CHUNK / 2) + (i % CHUNK) / 2 : i;
            qs[at] = scale * element(q, token * row + i, bf16);
        }

    /* Both passes visit positions p .. p + n - 1, up to TILE of them within one block,
       and in that run each kv head's rows serve all query heads of its group and all
       query rows. Query row r (at position first_pos + r) sees the tile's rows
       at .. at + m - 1: causal, and in its window; a row that sees none skips it. Its
       scores run n_keys apart per head, from key position first on. */
#define TILES(POOL, IN_PLACE, WIDENED, AFTER_HEAD)                                                  \
    for (int64_t p = first, n; p <= last; p += n) {                                                  \
        const char *rows = tile_at(POOL, table, p, last, block_size, token_bytes, &n);               \
        if (p + n <= last) prefetch_tile(POOL, table, p + n, last, block_size, token_bytes);         \
        for (int64_t j = 0; j < n_kv_head; j++) {                                                    \
            const char *head_rows = rows + j * head_bytes;                                           \
            int64_t step = 0;                                                                        \
            const float *x = in_place ? 0 : as_float(head_rows, token_bytes, n, head_dim, bf16, tile, &step); \
            for (int64_t r = 0; r < count; r++) {                                                    \
                const int64_t pos = first_pos + r, seen = window < 0 || pos - window < p ? p : pos - window; \
                const int64_t at = seen - p, m = (pos < p + n - 1 ? pos : p + n - 1) - seen + 1;     \
                if (m <= 0) continue;                                                                \
                for (int64_t h = j * group; h < (j + 1) * group; h++) {                              \
                    float *w = scores + (r * n_head + h) * n_keys + (seen - first);                  \
                    if (in_place) IN_PLACE;                                                          \
                    else WIDENED;                                                                    \
                }                                                                                    \
            }                                                                                        \
            AFTER_HEAD;                                                                              \
        }                                                                                            \
    }
    /* w[i] = q_rh . k_(seen + i) */
    TILES(keys, pairs ? dots_pairs((const uint16_t *)q + (token + r) * row + h * head_dim,
                                   head_rows + at * token_bytes, token_bytes, m, head_dim, scale, w)
                      : dots_bf16(qs + r * row + h * head_dim, head_rows + at * token_bytes, token_bytes, m,
                                  head_dim, w),
          dots(qs + r * row + h * head_dim, x + at * step, step, m, head_dim, w), (void)0)
    /* unnormalised softmax weights over each row's visible keys; the output is divided
       by their sum at the end */
    for (int64_t r = 0; r < count; r++) {
        const int64_t pos = first_pos + r, seen = window < 0 || pos - window < first ? first : pos - window;
        for (int64_t h = 0; h < n_head; h++) {
            float *w = scores + (r * n_head + h) * n_keys + (seen - first), max = w[0], sum = 0.0f;
            const int64_t visible = pos - seen + 1;
#pragma omp simd reduction(max : max)
            for (int64_t i = 1; i < visible; i++) max = w[i] > max ? w[i] : max;
#pragma omp simd reduction(+ : sum)
            for (int64_t i = 0; i < visible; i++) {
                w[i] = exp_nonpositive(w[i] - max);
                sum += w[i];
            }
            sums[r * n_head + h] = sum;
        }
    }
    /* os[r][h] = sum_i w[i] v_(seen + i) */
    memset(os, 0, sizeof(float) * (size_t)(count * row));
    struct value_rows batch = {.size = 0};
    const int share = count * group >= ROWS;  /* a decode of an MHA model takes its values alone */
    TILES(values, take_values(&batch, share, os + r * row + h * head_dim, head_rows, token_bytes, w, at, m, n, head_dim),
          add_weighted(os + r * row + h * head_dim, x + at * step, step, w, m, head_dim),
          flush_values(&batch, head_rows, token_bytes, n, head_dim))
#undef TILES
    if (in_place) unsplit(os, count * row);
    for (int64_t r = 0; r < count; r++)
        for (int64_t h = 0; h < n_head; h++) {
            const float inverse = 1.0f / sums[r * n_head + h];
            for (int64_t i = (r * n_head + h) * head_dim; i < (r * n_head + h + 1) * head_dim; i++) {
                if (bf16) ((uint16_t *)out)[token * row + i] = float_to_bf16(os[i] * inverse);
                else ((float *)out)[token * row + i] = os[i] * inverse;
            }
        }
}

/* The attention of work items [first_item, end_item) (see paged_attention). */
static ALWAYS_INLINE void attend(const void *q, const char *keys, const char *values,
                                 const int64_t *block_tables, const int64_t *items, void *out,
                                 int64_t first_item, int64_t end_item, int64_t table_width,
                                 int64_t n_head, int64_t n_kv_head, int64_t head_dim,
                                 int64_t block_size, int64_t window, float scale, int bf16,
                                 float *scores, int64_t max_scores, int64_t max_count) {
    float *qs = scores + max_scores, *os = qs + max_count * n_head * head_dim;
    float *sums = os + max_count * n_head * head_dim, *tile = sums + max_count * n_head;
    for (const int64_t *item = items + 4 * first_item; item < items + 4 * end_item; item += 4) {
#define ITEM(COUNT)                                                                                 \
    attend_item(q, keys, values, block_tables + item[0] * table_width, out, item[1], COUNT, item[3], \
                n_head, n_kv_head, head_dim, block_size, window, scale, bf16, scores, qs, os, sums, tile)
        /* a decode's own copy, its loops over query rows folded away */
        if (item[2] == 1) ITEM(1);
        else ITEM(item[2]);
#undef ITEM
    }
}

/* Work items [first_item, end_item) of items [num_items, 4]: (block table row, first query
   row in q and out, count, position of the first query); callers split a step across
   threads this way. bf16 != 0: q, pools and out hold bfloat16. Returns 0, or -1 if the
   scratch memory could not be had. */
int paged_attention(const void *q, const void *k_pool, const void *v_pool,
                    const int64_t *block_tables, const int64_t *items, void *out,
                    int64_t first_item, int64_t end_item, int64_t table_width,
                    int64_t n_head, int64_t n_kv_head, int64_t head_dim,
                    int64_t block_size, int64_t window, float scale, int bf16) {
    int64_t max_scores = 1, max_count = 1;
    for (const int64_t *item = items + 4 * first_item; item < items + 4 * end_item; item += 4) {
        const int64_t count = item[2], last = item[3] + count - 1;
        const int64_t first = window < 0 || item[3] - window < 0 ? 0 : item[3] - window;
        if (count * n_head * (last - first + 1) > max_scores) max_scores = count * n_head * (last - first + 1);
        if (count > max_count) max_count = count;
    }
    /* every row's and head's scores; the item's query and output rows in float32; each
       row's and head's sum of weights; a tile of rows widened to float32 */
    float *scores = malloc(sizeof(float) * (size_t)(max_scores + max_count * (2 * n_head * head_dim + n_head)
                                                     + TILE * head_dim));
    if (!scores) return -1;
#define ATTEND(BF16, HEAD_DIM)                                                                      \
    attend(q, k_pool, v_pool, block_tables, items, out, first_item, end_item, table_width,          \
           n_head, n_kv_head, HEAD_DIM, block_size, window, scale, BF16, scores, max_scores, max_count)
    if (head_dim == 64) bf16 ? ATTEND(1, 64) : ATTEND(0, 64);
    else if (head_dim == 128) bf16 ? ATTEND(1, 128) : ATTEND(0, 128);
    else bf16 ? ATTEND(1, head_dim) : ATTEND(0, head_dim);
#undef ATTEND
    free(scores);
    return 0;
}
