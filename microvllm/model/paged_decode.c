/* Decode attention over the paged KV cache, reading each key and value where it lies.

   One query token per sequence. For a sequence with context length C (its new token
   included, already written to the cache), query head h attends to the keys at positions
   max(0, C - 1 - window) .. C - 1 of kv head h / (n_head / n_kv_head). Position p lives
   in block block_table[p / block_size], row p % block_size.

   Layouts (contiguous; float32, or bfloat16 with float32 arithmetic):
     q, out           [num_seqs, n_head, head_dim]
     k_pool, v_pool   [num_blocks, block_size, n_kv_head, head_dim]
     block_tables     [num_seqs, table_width]  (int64)
     context_lens     [num_seqs]  (int64)

   The gathering SDPA path copies every visible key and value once and reads them twice;
   decode attention is bound by memory traffic, so reading them once, in place, is the
   whole gain. Keys are visited token by token (a token's kv heads are adjacent), with
   all query heads' scores kept in a scratch row per head. */

#include <math.h>
#include <stdlib.h>

#include "bf16.h"

static inline float dot(const float *q, const void *k, int64_t n, int bf16) {
    float acc = 0.0f;
    if (bf16) {
        const uint16_t *kb = k;
#pragma omp simd reduction(+ : acc)
        for (int64_t i = 0; i < n; i++) acc += q[i] * bf16_to_float(kb[i]);
    } else {
        const float *kf = k;
#pragma omp simd reduction(+ : acc)
        for (int64_t i = 0; i < n; i++) acc += q[i] * kf[i];
    }
    return acc;
}

static inline void add_scaled(float *acc, const void *v, float w, int64_t n, int bf16) {
    if (bf16) {
        const uint16_t *vb = v;
#pragma omp simd
        for (int64_t i = 0; i < n; i++) acc[i] += w * bf16_to_float(vb[i]);
    } else {
        const float *vf = v;
#pragma omp simd
        for (int64_t i = 0; i < n; i++) acc[i] += w * vf[i];
    }
}

/* Sequences [first_seq, end_seq): callers split a batch across threads this way.
   bf16 != 0: q, pools and out hold bfloat16. Returns 0, or -1 if the scratch memory
   could not be had. */
int paged_decode_attention(const void *q, const void *k_pool, const void *v_pool,
                           const int64_t *block_tables, const int64_t *context_lens, void *out,
                           int64_t first_seq, int64_t end_seq, int64_t table_width,
                           int64_t n_head, int64_t n_kv_head, int64_t head_dim,
                           int64_t block_size, int64_t window, float scale, int bf16) {
    int64_t max_keys = 1;
    for (int64_t s = first_seq; s < end_seq; s++)
        if (context_lens[s] > max_keys) max_keys = context_lens[s];
    const int64_t row = n_head * head_dim, group = n_head / n_kv_head;
    const size_t element = bf16 ? 2 : 4, token_bytes = element * (size_t)(n_kv_head * head_dim);
    /* per sequence: every head's scores, then its query and output rows in float32 */
    float *scores = malloc(sizeof(float) * (size_t)(n_head * max_keys + 2 * row));
    if (!scores) return -1;
    float *qs = scores + n_head * max_keys, *os = qs + row;
    const char *keys = k_pool, *values = v_pool;

    for (int64_t s = first_seq; s < end_seq; s++) {
        const int64_t last = context_lens[s] - 1;
        const int64_t first = window < 0 || last - window < 0 ? 0 : last - window;
        const int64_t n_keys = last - first + 1;
        const int64_t *table = block_tables + s * table_width;
        for (int64_t i = 0; i < row; i++)
            qs[i] = bf16 ? bf16_to_float(((const uint16_t *)q)[s * row + i]) : ((const float *)q)[s * row + i];

        for (int64_t p = first; p <= last; p++) {
            const char *k = keys + (size_t)(table[p / block_size] * block_size + p % block_size) * token_bytes;
            for (int64_t h = 0; h < n_head; h++)
                scores[h * n_keys + p - first] =
                    scale * dot(qs + h * head_dim, k + element * (size_t)((h / group) * head_dim), head_dim, bf16);
        }
        for (int64_t h = 0; h < n_head; h++) {
            float *w = scores + h * n_keys, max = w[0], sum = 0.0f;
            for (int64_t i = 1; i < n_keys; i++) max = w[i] > max ? w[i] : max;
            for (int64_t i = 0; i < n_keys; i++) {
                w[i] = expf(w[i] - max);
                sum += w[i];
            }
            for (int64_t i = 0; i < n_keys; i++) w[i] /= sum;
        }
        memset(os, 0, sizeof(float) * (size_t)row);
        for (int64_t p = first; p <= last; p++) {
            const char *v = values + (size_t)(table[p / block_size] * block_size + p % block_size) * token_bytes;
            for (int64_t h = 0; h < n_head; h++)
                add_scaled(os + h * head_dim, v + element * (size_t)((h / group) * head_dim),
                           scores[h * n_keys + p - first], head_dim, bf16);
        }
        for (int64_t i = 0; i < row; i++) {
            if (bf16) ((uint16_t *)out)[s * row + i] = float_to_bf16(os[i]);
            else ((float *)out)[s * row + i] = os[i];
        }
    }
    free(scores);
    return 0;
}
