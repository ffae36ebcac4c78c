/* The sampler's noise in one pass: for each row's (seed, output position) and each of its
   token ids, the 32-bit hash that engine/sampler.py's uniform_noise builds from a dozen
   torch ops over [rows, tokens] int64 tensors, here in uint32 arithmetic (the same bits,
   so the same uniforms), written as float64 (bits + 0.5) / 2^32.

   token_ids holds `width` ids per row, `ids_row_stride` apart (0: one row shared by all). */

#include <stdint.h>

static inline uint32_t hash32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x846CA68Bu;
    return x ^ (x >> 16);
}

int uniform_noise(const int64_t *seeds, const int64_t *positions, const int64_t *token_ids,
                  int64_t ids_row_stride, int64_t rows, int64_t width, double *out) {
    for (int64_t r = 0; r < rows; r++) {
        uint64_t seed = (uint64_t)seeds[r];
        uint32_t key = hash32(hash32((uint32_t)seed ^ hash32((uint32_t)(seed >> 32))) ^ (uint32_t)positions[r]);
        const int64_t *ids = token_ids + r * ids_row_stride;
        double *row = out + r * width;
#pragma omp simd
        for (int64_t j = 0; j < width; j++)
            row[j] = ((double)hash32(key + (uint32_t)ids[j] * 0x9E3779B9u) + 0.5) * (1.0 / 4294967296.0);
    }
    return 0;
}
