/* bfloat16 <-> float32 for microvllm's C kernels, which store bfloat16 and compute in float32. */

#ifndef MICROVLLM_BF16_H
#define MICROVLLM_BF16_H

#include <stdint.h>
#include <string.h>

static inline float bf16_to_float(uint16_t x) {
    uint32_t bits = (uint32_t)x << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t float_to_bf16(float f) {  /* round to nearest even, as torch does */
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    return (uint16_t)((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

/* element i of a float32 (bf16 == 0) or bfloat16 array, as float32 */
static inline float load(const void *p, int64_t i, int bf16) {
    return bf16 ? bf16_to_float(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void store(void *p, int64_t i, float value, int bf16) {
    if (bf16) ((uint16_t *)p)[i] = float_to_bf16(value);
    else ((float *)p)[i] = value;
}

#endif
