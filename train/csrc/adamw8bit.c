/* bitsandbytes' 8-bit blockwise AdamW update on the CPU, in two fused passes (train/adamw8bit.py drives them).

   bitsandbytes' own CPU update (bitsandbytes/backends/cpu/ops.py) dequantizes both moments into fp32 tensors,
   updates them and the parameter with about a dozen torch ops over the whole tensor, and quantizes the moments
   back: each op is one more pass over memory. Here one pass over each 256-element block does the dequantize,
   the moment update and the requantize, and a second does the parameter update; the square root between them is
   torch's own (its CPU kernel is not the correctly rounded one, so it is not rewritten here). Every other
   operation is written to round exactly as the torch op that it replaces:

   - `m.mul_(beta1).add_(g, alpha=1 - beta1)`: torch's CPU `add` with alpha is one fused multiply-add,
     g * alpha + m, in its vector loop and in its scalar remainder alike;
   - `v.mul_(beta2).addcmul_(g, g, value=1 - beta2)`: likewise fused, (value * g) * g + v;
   - `(sqrt(v) / c2).add_(eps)`, `p.mul_(1 - lr * wd)`, `p.addcdiv_(m, den, value=-lr / c1)`: plain IEEE
     operations, p + (value * m) / den;
   - the quantizer: bitsandbytes' CPU lookup table (65536 bins of [-1, 1], each to the nearest code by the
     midpoints), indexed as its norm_to_lut_index does.

   Build flags (train/adamw8bit.py): -O3 -march=native -fopenmp -ffp-contract=off, so that the compiler fuses
   nothing that is not written as fmaf here. tests/test_adamw8bit.py holds the result to bitsandbytes' bit for
   bit: parameters, both quantized moments and both absmax vectors. */

#include <math.h>
#include <stdint.h>

#define BLOCK 256
#define LUT_SIZE 65536

/* code: the 256 sorted values of a bitsandbytes quantization map in [-1, 1]; lut: 65536 bytes. */
void muse_build_lut(const float* code, uint8_t* lut) {
    float mid[255];
    for (int i = 0; i < 255; ++i) mid[i] = 0.5f * (code[i] + code[i + 1]);
    int c = 0;
    for (int i = 0; i < LUT_SIZE; ++i) {
        float val = -1.0f + (2.0f * (float)i) / (float)(LUT_SIZE - 1);
        while (c < 255 && mid[c] < val) ++c;
        lut[i] = (uint8_t)c;
    }
}

static inline uint8_t quantize(const uint8_t* lut, float x, float inv_absmax) {
    float v = x * inv_absmax;
    v = v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v);
    return lut[(uint16_t)((v + 1.0f) * 0.5f * (float)(LUT_SIZE - 1) + 0.5f)];
}

/* Pass 1 over elements [start, start + count) of an n-element parameter (start a multiple of 256): the moments
   dequantized, updated from the gradient, requantized in place (s1, s2, absmax1, absmax2), and their fp32
   values written to m_out and v_out (count floats each) for pass 2. */
void muse_adamw8bit_moments(const float* g, uint8_t* s1, uint8_t* s2, float* absmax1, float* absmax2,
                            const float* qmap1, const float* qmap2, const uint8_t* lut1, const uint8_t* lut2,
                            int64_t n, int64_t start, int64_t count, float beta1, float one_minus_beta1,
                            float beta2, float one_minus_beta2, float gnorm_scale, int threads,
                            float* m_out, float* v_out) {
    int64_t first = start / BLOCK, blocks = (count + BLOCK - 1) / BLOCK;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = first; b < first + blocks; ++b) {
        int64_t lo = b * BLOCK, hi = lo + BLOCK < n ? lo + BLOCK : n;
        float scale1 = absmax1[b], scale2 = absmax2[b], max1 = 0.0f, max2 = 0.0f;
        float* m = m_out + (lo - start);
        float* v = v_out + (lo - start);
        for (int64_t i = lo; i < hi; ++i) {
            float gi = g[i] * gnorm_scale;
            float mi = (qmap1[s1[i]] * scale1) * beta1;
            float vi = (qmap2[s2[i]] * scale2) * beta2;
            mi = fmaf(gi, one_minus_beta1, mi);
            vi = fmaf(one_minus_beta2 * gi, gi, vi);
            m[i - lo] = mi;
            v[i - lo] = vi;
            float am = fabsf(mi), av = fabsf(vi);
            max1 = am > max1 ? am : max1;
            max2 = av > max2 ? av : max2;
        }
        absmax1[b] = max1;
        absmax2[b] = max2;
        float inv1 = 1.0f / max1, inv2 = 1.0f / max2;
        for (int64_t i = lo; i < hi; ++i) {
            s1[i] = max1 == 0.0f ? 0 : quantize(lut1, m[i - lo], inv1);
            s2[i] = max2 == 0.0f ? 0 : quantize(lut2, v[i - lo], inv2);
        }
    }
}

/* Pass 2 over `count` elements: p <- p * decay (when weight decay is on) + (step_size * m) / (sqrt_v / c2 + eps),
   sqrt_v being torch.sqrt of pass 1's v. */
void muse_adamw8bit_params(float* p, const float* m, const float* sqrt_v, int64_t count, float correction2,
                           float eps, int decays, float decay, float step_size, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < count; ++i) {
        float den = sqrt_v[i] / correction2 + eps;
        float pi = decays ? p[i] * decay : p[i];
        p[i] = pi + (step_size * m[i]) / den;
    }
}
