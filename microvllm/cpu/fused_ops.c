/* The forward's RMSNorms, its rotary embedding and the MLP's relu^2, one pass over each row.

   As torch ops, RMSNorm is five kernels (square, mean, add eps, rsqrt, multiply) and
   rotary-then-norm of q or k about a dozen, each reading and writing the whole tensor;
   a decode step's rows are short, so their cost is mostly the calls. Here each row is
   read once, worked on in float32, and written once (bfloat16 rounded once, at the end,
   where torch rounds after every op: within bfloat16 tolerance of it, not bit-equal).

   Arrays hold float32 (bf16 == 0) or bfloat16 (bf16 != 0), rows contiguous. Each
   function returns 0, or -1 if it could not have its float32 scratch row. */

#include <math.h>
#include <stdlib.h>

#include "bf16.h"

static void to_float(const void *x, float *f, int64_t n, int bf16) {
    if (bf16) {
        const uint16_t *xb = x;
#pragma omp simd
        for (int64_t i = 0; i < n; i++) f[i] = bf16_to_float(xb[i]);
    } else {
        memcpy(f, x, sizeof(float) * (size_t)n);
    }
}

/* out = f * scale, rounded to the output dtype */
static void scaled_store(const float *f, float scale, void *out, int64_t n, int bf16) {
    if (bf16) {
        uint16_t *ob = out;
#pragma omp simd
        for (int64_t i = 0; i < n; i++) ob[i] = float_to_bf16(f[i] * scale);
    } else {
        float *of = out;
#pragma omp simd
        for (int64_t i = 0; i < n; i++) of[i] = f[i] * scale;
    }
}

static float inverse_rms(const float *f, int64_t n, float eps) {
    float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
    for (int64_t i = 0; i < n; i++) squares += f[i] * f[i];
    return 1.0f / sqrtf(squares / (float)n + eps);
}

/* out[r] = x[r] / sqrt(mean(x[r]^2) + eps) for rows r of dim elements; x's rows are
   x_stride elements apart, out's are contiguous. */
int rms_norm(const void *x, void *out, int64_t rows, int64_t dim, int64_t x_stride, float eps, int bf16) {
    const size_t element_size = bf16 ? 2 : 4;
    float *row = malloc(sizeof(float) * (size_t)dim);
    if (!row) return -1;
    for (int64_t r = 0; r < rows; r++) {
        to_float((const char *)x + element_size * (size_t)(r * x_stride), row, dim, bf16);
        scaled_store(row, inverse_rms(row, dim, eps), (char *)out + element_size * (size_t)(r * dim), dim, bf16);
    }
    free(row);
    return 0;
}

/* For each token t and head h of x (token rows x_stride elements apart, heads of
   head_dim adjacent): rotate by the angles of position positions[t] (nanochat's
   convention, y1 = x1 cos + x2 sin, y2 = x2 cos - x1 sin, over the two halves of the
   head), RMS-normalise the head, multiply by scale, and write out[t, h]
   (contiguous). cos and sin are [positions, head_dim / 2] tables in x's dtype. */
int rotary_rms_norm(const void *x, int64_t x_stride, const void *cos, const void *sin,
                    const int64_t *positions, void *out, int64_t tokens, int64_t heads,
                    int64_t head_dim, float eps, float scale, int bf16) {
    const int64_t half = head_dim / 2;
    const size_t element_size = bf16 ? 2 : 4;
    /* one token's cos and sin rows, then one head before and after rotation */
    float *c = malloc(sizeof(float) * (size_t)(2 * half + 2 * head_dim));
    if (!c) return -1;
    float *s = c + half, *head = s + half, *rotated = head + head_dim;
    for (int64_t t = 0; t < tokens; t++) {
        to_float((const char *)cos + element_size * (size_t)(positions[t] * half), c, half, bf16);
        to_float((const char *)sin + element_size * (size_t)(positions[t] * half), s, half, bf16);
        for (int64_t h = 0; h < heads; h++) {
            to_float((const char *)x + element_size * (size_t)(t * x_stride + h * head_dim), head, head_dim, bf16);
#pragma omp simd
            for (int64_t i = 0; i < half; i++) {
                rotated[i] = head[i] * c[i] + head[i + half] * s[i];
                rotated[i + half] = head[i + half] * c[i] - head[i] * s[i];
            }
            scaled_store(rotated, scale * inverse_rms(rotated, head_dim, eps),
                         (char *)out + element_size * (size_t)((t * heads + h) * head_dim), head_dim, bf16);
        }
    }
    free(c);
    return 0;
}

/* pool row slots[r] = src row r, for rows of row_bytes; src's rows are src_stride bytes
   apart. The step's new keys and values into the paged cache: torch's index_copy_
   copies element by element, this a row at a time. */
int scatter_rows(const void *src, int64_t src_stride, void *pool, const int64_t *slots,
                 int64_t rows, int64_t row_bytes) {
    for (int64_t r = 0; r < rows; r++)
        memcpy((char *)pool + slots[r] * row_bytes, (const char *)src + r * src_stride, (size_t)row_bytes);
    return 0;
}

/* x = relu(x)^2 in place, for n contiguous elements: one pass where relu_ then square_
   make two over the forward's largest tensor. Rounded once, as square_ rounds: equal to
   torch's result bit for bit. */
int relu_squared(void *x, int64_t n, int bf16) {
    if (bf16) {
        uint16_t *xb = x;
#pragma omp simd
        for (int64_t i = 0; i < n; i++) {
            const float f = bf16_to_float(xb[i]);
            xb[i] = f > 0.0f ? float_to_bf16(f * f) : 0;
        }
    } else {
        float *xf = x;
#pragma omp simd
        for (int64_t i = 0; i < n; i++) xf[i] = xf[i] > 0.0f ? xf[i] * xf[i] : 0.0f;
    }
    return 0;
}
