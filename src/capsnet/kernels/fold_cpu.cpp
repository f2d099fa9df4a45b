// The input gradient's last step for a convolution computed as a GEMM (capsnet/fastconv.py):
// "fold" (col2im) the patch gradient back onto the image, channels last, bf16 in and out.
//
// Plain C++ with OpenMP, no PyTorch headers, built and called as routing_cpu.cpp is.
//
// patches [B, OH, OW, K, K, C] -> dx [B, H, W, C]:
//   dx[b, y, x, c] = sum of patches[b, i, j, kh, kw, c] over y = i * S + kh, x = j * S + kw.
// Each image's sums (H * W * C floats: 400 KB for the PrimaryCaps input, 20 x 20 x 256) build up
// in float32 in the thread's own buffer, in a fixed order, and are rounded to bf16 once: the
// result does not depend on the number of threads.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

inline float bf16_to_float(uint16_t h) {  // the high half of a float's bits
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_bf16(float x) {  // round to nearest even
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  if ((bits & 0x7F800000u) == 0x7F800000u && (bits & 0x007FFFFFu))  // NaN stays a (quiet) NaN
    return static_cast<uint16_t>((bits >> 16) | 0x0040u);
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

}  // namespace

extern "C" {

void fold_nhwc_bf16(const uint16_t* patches, uint16_t* dx, int64_t B, int64_t OH, int64_t OW, int64_t K,
                    int64_t S, int64_t C, int64_t H, int64_t W, int threads) {
  const int64_t image = H * W * C, patch_image = OH * OW * K * K * C;
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> acc(image);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      const uint16_t* src = patches + b * patch_image;
      for (int64_t i = 0; i < OH; ++i)
        for (int64_t j = 0; j < OW; ++j)
          for (int64_t kh = 0; kh < K; ++kh) {
            float* row = acc.data() + ((i * S + kh) * W + j * S) * C;  // pixel (i*S + kh, j*S)
            const uint16_t* in = src + ((i * OW + j) * K + kh) * K * C;
            for (int64_t kw = 0; kw < K; ++kw) {
              float* dst = row + kw * C;
              const uint16_t* s = in + kw * C;
#pragma omp simd
              for (int64_t c = 0; c < C; ++c) dst[c] += bf16_to_float(s[c]);
            }
          }
      uint16_t* out = dx + b * image;
#pragma omp simd
      for (int64_t k = 0; k < image; ++k) out[k] = float_to_bf16(acc[k]);
    }
  }
}

}  // extern "C"
