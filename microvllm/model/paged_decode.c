/* Decode attention over the paged KV cache, reading each key and value where it lies.

   One query token per sequence. For a sequence with context length C (its new token
   included, already written to the cache), query head h attends to the keys at positions
   max(0, C - 1 - window) .. C - 1 of kv head h / (n_head / n_kv_head). Position p lives
   in block block_table[p / block_size], row p % block_size.

   Layouts (float32, contiguous):
     q, out           [num_seqs, n_head, head_dim]
     k_pool, v_pool   [num_blocks, block_size, n_kv_head, head_dim]
     block_tables     [num_seqs, table_width]
     context_lens     [num_seqs]

   The gathering SDPA path copies every visible key and value once and reads them twice;
   decode attention is bound by memory traffic, so reading them once, in place, is the
   whole gain. Keys are visited token by token (a token's kv heads are adjacent), with
   all query heads' scores kept in a scratch row per head. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float dot(const float *a, const float *b, int64_t n) {
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < n; i++) acc += a[i] * b[i];
    return acc;
}

static inline void add_scaled(float *acc, const float *x, float w, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) acc[i] += w * x[i];
}

/* Sequences [first_seq, end_seq): callers split a batch across threads this way.
   Returns 0, or -1 if the scratch memory could not be had. */
int paged_decode_attention_f32(const float *q, const float *k_pool, const float *v_pool,
                               const int64_t *block_tables, const int64_t *context_lens,
                               float *out, int64_t first_seq, int64_t end_seq,
                               int64_t table_width, int64_t n_head, int64_t n_kv_head,
                               int64_t head_dim, int64_t block_size, int64_t window,
                               float scale) {
    int64_t max_keys = 0;
    for (int64_t s = first_seq; s < end_seq; s++)
        if (context_lens[s] > max_keys) max_keys = context_lens[s];
    float *scores = malloc(sizeof(float) * (size_t)(n_head * (max_keys > 0 ? max_keys : 1)));
    if (!scores) return -1;
    const int64_t group = n_head / n_kv_head, token_stride = n_kv_head * head_dim;

    for (int64_t s = first_seq; s < end_seq; s++) {
        const int64_t last = context_lens[s] - 1;
        const int64_t first = window < 0 || last - window < 0 ? 0 : last - window;
        const int64_t n_keys = last - first + 1;
        const int64_t *table = block_tables + s * table_width;
        const float *qs = q + s * n_head * head_dim;
        float *os = out + s * n_head * head_dim;

        for (int64_t p = first; p <= last; p++) {
            const float *k = k_pool + (table[p / block_size] * block_size + p % block_size) * token_stride;
            for (int64_t h = 0; h < n_head; h++)
                scores[h * n_keys + p - first] = scale * dot(qs + h * head_dim, k + (h / group) * head_dim, head_dim);
        }
        for (int64_t h = 0; h < n_head; h++) {
            float *row = scores + h * n_keys, max = row[0], sum = 0.0f;
            for (int64_t i = 1; i < n_keys; i++) max = row[i] > max ? row[i] : max;
            for (int64_t i = 0; i < n_keys; i++) {
                row[i] = expf(row[i] - max);
                sum += row[i];
            }
            for (int64_t i = 0; i < n_keys; i++) row[i] /= sum;
        }
        memset(os, 0, sizeof(float) * (size_t)(n_head * head_dim));
        for (int64_t p = first; p <= last; p++) {
            const float *v = v_pool + (table[p / block_size] * block_size + p % block_size) * token_stride;
            for (int64_t h = 0; h < n_head; h++)
                add_scaled(os + h * head_dim, v + (h / group) * head_dim, scores[h * n_keys + p - first], head_dim);
        }
    }
    free(scores);
    return 0;
}
