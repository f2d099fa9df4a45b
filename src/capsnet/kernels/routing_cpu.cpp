// Dynamic routing (Sabour et al. 2017, Procedure 1), forward and backward, fused for the CPU.
//
// Plain C++ with OpenMP, no PyTorch headers: capsnet/cpu_kernels.py compiles it with the
// system's g++ on first use and calls it through ctypes with raw pointers.
//
// Why: routing reads u_hat (1152 x 10 x 16 values per image) again in every iteration. Written
// as tensor operations that is a dozen passes over memory, forward and backward. Here one image
// is routed at a time, its u_hat block (368 KB in bf16) stays in the core's cache for all
// iterations, and each iteration is a single pass: agreement, softmax over the parents j and
// the weighted sum for the next s_j are done together for each input capsule i. The AVX-512
// backward keeps two scalars per (i, j) and iteration and writes d u_hat in one last pass.
//
// Indices: b batch, i input capsule, j output capsule, d dimension. Row (b, i) of u_hat, its
// J x D predictions, starts at b*sb + (i / P)*st + (i % P)*sp (P > 1 when matrices are shared
// per capsule type, so the predictions come out grouped by type).
//
// bias (J x D, or null) is added to every s_j before it is squashed, in every iteration; the
// saved s include it. Its gradient comes out per image (B x J x D: no two threads write one
// row), summed over the iterations; the caller sums over the batch.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr float kSquashEps = 1e-7f;  // as capsnet.routing.SQUASH_EPS

inline float load(const float* p, int64_t k) { return p[k]; }
inline float load(const uint16_t* p, int64_t k) {  // bf16 -> f32: the high half of the bits
  uint32_t bits = static_cast<uint32_t>(p[k]) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline void store(float* p, int64_t k, float x) { p[k] = x; }
inline void store(uint16_t* p, int64_t k, float x) {  // f32 -> bf16, round to nearest even
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  p[k] = static_cast<uint16_t>(bits >> 16);
}

struct Layout {
  int64_t sb, st, sp, P;
  int64_t row(int64_t b, int64_t i) const { return b * sb + (i / P) * st + (i % P) * sp; }
};

// v = s * sqrt(|s|^2 + eps) / (1 + |s|^2), for each of the J capsules.
// dst += src over n values; nothing where src is null (no bias).
inline void add_if(float* dst, const float* src, int64_t n) {
  if (src)
    for (int64_t k = 0; k < n; ++k) dst[k] += src[k];
}

inline void squash(const float* s, float* v, int J, int D) {
  for (int j = 0; j < J; ++j) {
    float n2 = 0.f;
    for (int d = 0; d < D; ++d) n2 += s[j * D + d] * s[j * D + d];
    const float f = std::sqrt(n2 + kSquashEps) / (1.f + n2);
    for (int d = 0; d < D; ++d) v[j * D + d] = s[j * D + d] * f;
  }
}

// ds = d v / d s applied to dv: f dv + 2 s f'(|s|^2) (s . dv).
inline void squash_backward(const float* s, const float* dv, float* ds, int J, int D) {
  for (int j = 0; j < J; ++j) {
    float n2 = 0.f, sdv = 0.f;
    for (int d = 0; d < D; ++d) {
      n2 += s[j * D + d] * s[j * D + d];
      sdv += s[j * D + d] * dv[j * D + d];
    }
    const float root = std::sqrt(n2 + kSquashEps), den = 1.f + n2;
    const float f = root / den;
    const float fprime = (den / (2.f * root) - root) / (den * den);
    for (int d = 0; d < D; ++d) ds[j * D + d] = f * dv[j * D + d] + 2.f * s[j * D + d] * fprime * sdv;
  }
}

// JC, DC: the capsule counts known at compile time (10 x 16 for MNIST), so that the inner
// loops become a few whole-register AVX-512 operations; 0 means "given at run time".
template <typename T, int JC, int DC>
void forward(const T* u, Layout L, int B, int I, int Jr, int Dr, int R, const float* bias, float* v_out,
             float* c_save, float* s_save, int threads) {
  const int J = JC ? JC : Jr, D = DC ? DC : Dr;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int b = 0; b < B; ++b) {
    std::vector<float> logits(static_cast<size_t>(I) * J, 0.f), s(J * D), v(J * D), c(J);
    // iteration 0: all couplings 1/J
    std::fill(s.begin(), s.end(), 0.f);
    for (int i = 0; i < I; ++i) {
      const int64_t row = L.row(b, i);
      for (int k = 0; k < J * D; ++k) s[k] += load(u, row + k);
    }
    for (int k = 0; k < J * D; ++k) s[k] /= static_cast<float>(J);
    add_if(s.data(), bias, J * D);
    if (s_save) std::memcpy(s_save + static_cast<int64_t>(b) * J * D, s.data(), sizeof(float) * J * D);
    for (int r = 1; r < R; ++r) {
      squash(s.data(), v.data(), J, D);
      std::fill(s.begin(), s.end(), 0.f);
      float* c_r = c_save ? c_save + (static_cast<int64_t>(r) * B + b) * I * J : nullptr;  // null: inference
      for (int i = 0; i < I; ++i) {
        const int64_t row = L.row(b, i);
        float* lg = logits.data() + static_cast<int64_t>(i) * J;
        float mx = lg[0];
        for (int j = 0; j < J; ++j) {  // agreement u_hat_j|i . v_j added to the logits
          float a = 0.f;
          for (int d = 0; d < D; ++d) a += load(u, row + j * D + d) * v[j * D + d];
          lg[j] += a;
          mx = std::fmax(mx, lg[j]);
        }
        float total = 0.f;
        for (int j = 0; j < J; ++j) total += (c[j] = std::exp(lg[j] - mx));
        for (int j = 0; j < J; ++j) {  // softmax over the parents j, then s_j += c_ij u_hat_j|i
          const float cij = c[j] / total;
          if (c_r) c_r[i * J + j] = cij;
          for (int d = 0; d < D; ++d) s[j * D + d] += cij * load(u, row + j * D + d);
        }
      }
      add_if(s.data(), bias, J * D);
      if (s_save) std::memcpy(s_save + (static_cast<int64_t>(r) * B + b) * J * D, s.data(), sizeof(float) * J * D);
    }
    squash(s.data(), v_out + static_cast<int64_t>(b) * J * D, J, D);
  }
}

#if defined(__AVX512F__)
// The forward pass again, written for AVX-512 where D == 16 (one capsule = one register) and
// J <= 16. The scalar loop above spends most of its time on what vector units do badly: ten
// horizontal dot-product sums and ten scalar exps per input capsule. Here the J dot products of
// an input capsule are summed together by one shuffle network (sum_each), and the softmax over
// the J parents is one vector exp. Same arithmetic, same results to float rounding.

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {  // 16 bf16 -> 16 f32
  const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

inline __m512 add_pd_halves(__m512 a, __m512 b) {  // per 128-bit block: [a0+a2, a1+a3, b0+b2, b1+b3]
  const __m512d x = _mm512_castps_pd(a), y = _mm512_castps_pd(b);
  return _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
}

// Lane k of the result is the sum of the 16 lanes of x[k]: four rounds of shuffle-and-add,
// pairing vectors, then 64-bit halves, then 128-bit blocks twice.
inline __m512 sum_each(const __m512 (&x)[16]) {
  __m512 a[8], b[4];
  for (int k = 0; k < 8; ++k)  // per block: [x_2k, x_2k+1, x_2k, x_2k+1] partial sums
    a[k] = _mm512_add_ps(_mm512_unpacklo_ps(x[2 * k], x[2 * k + 1]), _mm512_unpackhi_ps(x[2 * k], x[2 * k + 1]));
  for (int m = 0; m < 4; ++m) b[m] = add_pd_halves(a[2 * m], a[2 * m + 1]);  // per block: x_4m .. x_4m+3
  const __m512 t = _mm512_add_ps(_mm512_shuffle_f32x4(b[0], b[1], 0x44), _mm512_shuffle_f32x4(b[0], b[1], 0xEE));
  const __m512 q = _mm512_add_ps(_mm512_shuffle_f32x4(b[2], b[3], 0x44), _mm512_shuffle_f32x4(b[2], b[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(t, q, 0x88), _mm512_shuffle_f32x4(t, q, 0xDD));
}

// e^x for x <= 0 (softmax inputs after subtracting the max): 2^n e^r with n = round(x / ln 2),
// r = x - n ln 2 (ln 2 split in two for accuracy), e^r by its degree-6 minimax polynomial.
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

template <typename T, int J>
void forward_avx512(const T* u, Layout L, int B, int I, int R, const float* bias, float* v_out, float* c_save,
                    float* s_save, int threads) {
  static_assert(J >= 1 && J <= 16, "one lane per parent capsule");
  constexpr int D = 16, JD = J * D;
  const __mmask16 parents = static_cast<__mmask16>((1u << J) - 1);
  const int64_t groups = I / L.P;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int b = 0; b < B; ++b) {
    std::vector<float> logits(static_cast<size_t>(I) * 16, 0.f);  // one padded register per input capsule
    alignas(64) float s[JD], v[JD], c[16];
    __m512 acc[J];
    for (int j = 0; j < J; ++j) acc[j] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; ++g)  // iteration 0: all couplings 1/J
      for (int64_t p = 0; p < L.P; ++p) {
        const T* row = u + b * L.sb + g * L.st + p * L.sp;
        for (int j = 0; j < J; ++j) acc[j] = _mm512_add_ps(acc[j], load16(row + j * D));
      }
    for (int j = 0; j < J; ++j) _mm512_store_ps(s + j * D, _mm512_mul_ps(acc[j], _mm512_set1_ps(1.f / J)));
    add_if(s, bias, JD);
    if (s_save) std::memcpy(s_save + static_cast<int64_t>(b) * JD, s, sizeof(float) * JD);
    for (int r = 1; r < R; ++r) {
      squash(s, v, J, D);
      __m512 vj[J];
      for (int j = 0; j < J; ++j) {
        vj[j] = _mm512_load_ps(v + j * D);
        acc[j] = _mm512_setzero_ps();
      }
      float* c_r = c_save ? c_save + (static_cast<int64_t>(r) * B + b) * I * J : nullptr;  // null: inference
      int64_t i = 0;
      for (int64_t g = 0; g < groups; ++g)
        for (int64_t p = 0; p < L.P; ++p, ++i) {
          const T* row = u + b * L.sb + g * L.st + p * L.sp;
          __m512 prod[16];
          for (int j = 0; j < 16; ++j)
            prod[j] = j < J ? _mm512_mul_ps(load16(row + j * D), vj[j]) : _mm512_setzero_ps();
          float* lg_i = logits.data() + i * 16;
          const __m512 lg = _mm512_add_ps(_mm512_loadu_ps(lg_i), sum_each(prod));  // logits += agreement
          _mm512_storeu_ps(lg_i, lg);
          const float mx = _mm512_mask_reduce_max_ps(parents, lg);
          const __m512 e = _mm512_maskz_mov_ps(parents, exp_nonpositive(_mm512_sub_ps(lg, _mm512_set1_ps(mx))));
          const __m512 cv = _mm512_mul_ps(e, _mm512_set1_ps(1.f / _mm512_reduce_add_ps(e)));  // softmax over j
          if (c_r) _mm512_mask_storeu_ps(c_r + i * J, parents, cv);
          _mm512_store_ps(c, cv);
          for (int j = 0; j < J; ++j) acc[j] = _mm512_fmadd_ps(_mm512_set1_ps(c[j]), load16(row + j * D), acc[j]);
        }
      for (int j = 0; j < J; ++j) _mm512_store_ps(s + j * D, acc[j]);
      add_if(s, bias, JD);
      if (s_save) std::memcpy(s_save + (static_cast<int64_t>(r) * B + b) * JD, s, sizeof(float) * JD);
    }
    squash(s, v_out + static_cast<int64_t>(b) * JD, J, D);
  }
}

inline void store16(float* p, __m512 x) { _mm512_storeu_ps(p, x); }
inline void store16(uint16_t* p, __m512 x) {  // 16 f32 -> 16 bf16, round to nearest even (as store())
  __m512i bits = _mm512_castps_si512(x);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  bits = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16)));
}

// The backward pass of forward_avx512, the scalar backward's arithmetic in the same order.
//
// d u_hat_j|i is a sum over the iterations r of c^r_ij ds^r_j (from s_j = sum_i c_ij u_hat_j|i)
// and, where the logits chain, gbeta^r_ij v^(r-1)_j (from the agreement u_hat . v^(r-1)): small
// per-image vectors (ds, v) times two scalars per (i, j). So the passes over the iterations keep
// only those scalars (gbeta per iteration) and one last pass per input capsule sums the terms in
// registers and writes d u_hat once: no I x J x D buffer read and written in every iteration.
template <typename T, int J>
void backward_avx512(const T* u, Layout L, int B, int I, int R, const float* c_save, const float* s_save,
                     const float* grad_v, T* grad_u, float* grad_bias, bool detach_inner, int threads) {
  constexpr int D = 16, JD = J * D;
  const __mmask16 parents = static_cast<__mmask16>((1u << J) - 1);
  const int64_t groups = I / L.P;
  const int first = detach_inner ? R - 1 : 0;
#pragma omp parallel num_threads(threads)
  {
    // Per thread, reused for each of its images: gbeta after each chained iteration (the pass
    // for r adds to the value the pass for r + 1 left), ds^r and v^(r-1) of every iteration.
    std::vector<float> gb_hist(static_cast<size_t>(R) * I * 16);
    std::vector<float> ds_hist(static_cast<size_t>(R) * JD), vprev_hist(static_cast<size_t>(R) * JD);
#pragma omp for schedule(static)
    for (int b = 0; b < B; ++b) {
      alignas(64) float gv[JD], gbs[16];
      std::memcpy(gv, grad_v + static_cast<int64_t>(b) * JD, sizeof(float) * JD);
      for (int r = R - 1; r >= first; --r) {
        float* ds = ds_hist.data() + static_cast<int64_t>(r) * JD;
        squash_backward(s_save + (static_cast<int64_t>(r) * B + b) * JD, gv, ds, J, D);
        if (grad_bias) add_if(grad_bias + static_cast<int64_t>(b) * JD, ds, JD);
        const bool chain = !detach_inner && r >= 1;  // beta^r = beta^(r-1) + u_hat . v^(r-1)
        if (!chain) continue;  // this iteration's c^r ds^r term is summed in the last pass
        float* v_prev = vprev_hist.data() + static_cast<int64_t>(r) * JD;
        squash(s_save + (static_cast<int64_t>(r - 1) * B + b) * JD, v_prev, J, D);
        __m512 dsj[J], acc[J];
        for (int j = 0; j < J; ++j) {
          dsj[j] = _mm512_loadu_ps(ds + j * D);
          acc[j] = _mm512_setzero_ps();
        }
        const float* c_r = c_save + (static_cast<int64_t>(r) * B + b) * I * J;
        float* gb_r = gb_hist.data() + static_cast<int64_t>(r) * I * 16;
        const float* gb_later = r + 1 < R ? gb_r + static_cast<int64_t>(I) * 16 : nullptr;  // null: gbeta 0
        int64_t i = 0;
        for (int64_t g = 0; g < groups; ++g)
          for (int64_t p = 0; p < L.P; ++p, ++i) {
            const T* row = u + b * L.sb + g * L.st + p * L.sp;
            const __m512 cv = _mm512_maskz_loadu_ps(parents, c_r + i * J);
            __m512 prod[16];
            for (int j = 0; j < 16; ++j) prod[j] = j < J ? _mm512_mul_ps(load16(row + j * D), dsj[j]) : _mm512_setzero_ps();
            const __m512 dc = sum_each(prod);  // dL/dc_ij = u_hat_j|i . ds_j
            const float cdc = _mm512_reduce_add_ps(_mm512_mul_ps(cv, dc));
            const __m512 gb = _mm512_fmadd_ps(cv, _mm512_sub_ps(dc, _mm512_set1_ps(cdc)),  // through the softmax
                                              gb_later ? _mm512_loadu_ps(gb_later + i * 16) : _mm512_setzero_ps());
            _mm512_storeu_ps(gb_r + i * 16, gb);
            _mm512_store_ps(gbs, gb);
            for (int j = 0; j < J; ++j) acc[j] = _mm512_fmadd_ps(_mm512_set1_ps(gbs[j]), load16(row + j * D), acc[j]);
          }
        for (int j = 0; j < J; ++j) _mm512_store_ps(gv + j * D, acc[j]);
      }
      // The last pass: d u_hat_j|i = sum over r = R-1 .. first of c^r_ij ds^r_j (+ gbeta^r_ij v^(r-1)_j).
      alignas(64) float cs[16];
      const __m512 uniform = _mm512_maskz_mov_ps(parents, _mm512_set1_ps(1.f / J));
      int64_t i = 0;
      for (int64_t g = 0; g < groups; ++g)
        for (int64_t p = 0; p < L.P; ++p, ++i) {
          __m512 du[J];
          for (int j = 0; j < J; ++j) du[j] = _mm512_setzero_ps();
          for (int r = R - 1; r >= first; --r) {
            const float* ds = ds_hist.data() + static_cast<int64_t>(r) * JD;
            const __m512 cv = r == 0 ? uniform
                                     : _mm512_maskz_loadu_ps(parents, c_save + ((static_cast<int64_t>(r) * B + b) * I + i) * J);
            _mm512_store_ps(cs, cv);
            for (int j = 0; j < J; ++j) du[j] = _mm512_fmadd_ps(_mm512_set1_ps(cs[j]), _mm512_loadu_ps(ds + j * D), du[j]);
            if (detach_inner || r < 1) continue;
            const float* v_prev = vprev_hist.data() + static_cast<int64_t>(r) * JD;
            _mm512_store_ps(gbs, _mm512_loadu_ps(gb_hist.data() + (static_cast<int64_t>(r) * I + i) * 16));
            for (int j = 0; j < J; ++j) du[j] = _mm512_fmadd_ps(_mm512_set1_ps(gbs[j]), _mm512_loadu_ps(v_prev + j * D), du[j]);
          }
          T* row = grad_u + b * L.sb + g * L.st + p * L.sp;
          for (int j = 0; j < J; ++j) store16(row + j * D, du[j]);
        }
    }
  }
}
#endif

template <typename T, int JC, int DC>
void backward(const T* u, Layout L, int B, int I, int Jr, int Dr, int R, const float* c_save, const float* s_save,
              const float* grad_v, T* grad_u, float* grad_bias, bool detach_inner, int threads) {
  const int J = JC ? JC : Jr, D = DC ? DC : Dr;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int b = 0; b < B; ++b) {
    const int64_t JD = static_cast<int64_t>(J) * D;
    std::vector<float> du(static_cast<size_t>(I) * JD, 0.f), gbeta(static_cast<size_t>(I) * J, 0.f);
    std::vector<float> gv(grad_v + b * JD, grad_v + (b + 1) * JD), gv_prev(JD), ds(JD), v_prev(JD), dc(J);
    const int first = detach_inner ? R - 1 : 0;
    for (int r = R - 1; r >= first; --r) {
      const float* s_r = s_save + (static_cast<int64_t>(r) * B + b) * JD;
      squash_backward(s_r, gv.data(), ds.data(), J, D);
      if (grad_bias) add_if(grad_bias + b * JD, ds.data(), JD);
      const bool chain = !detach_inner && r >= 1;  // beta^r = beta^(r-1) + u_hat . v^(r-1)
      if (chain) {
        squash(s_save + (static_cast<int64_t>(r - 1) * B + b) * JD, v_prev.data(), J, D);
        std::fill(gv_prev.begin(), gv_prev.end(), 0.f);
      }
      const float* c_r = r == 0 ? nullptr : c_save + (static_cast<int64_t>(r) * B + b) * I * J;
      const float uniform = 1.f / static_cast<float>(J);
      for (int i = 0; i < I; ++i) {
        const int64_t row = L.row(b, i);
        float* du_i = du.data() + static_cast<int64_t>(i) * JD;
        float* gb = gbeta.data() + static_cast<int64_t>(i) * J;
        float cdc = 0.f;
        for (int j = 0; j < J; ++j) {
          const float cij = c_r ? c_r[i * J + j] : uniform;
          float a = 0.f;
          for (int d = 0; d < D; ++d) {
            a += load(u, row + j * D + d) * ds[j * D + d];
            du_i[j * D + d] += cij * ds[j * D + d];  // from s_j = sum_i c_ij u_hat_j|i
          }
          dc[j] = a;
          cdc += cij * a;
        }
        if (!chain) continue;
        for (int j = 0; j < J; ++j) {
          const float cij = c_r ? c_r[i * J + j] : uniform;
          gb[j] += cij * (dc[j] - cdc);  // through the softmax into beta^r
          for (int d = 0; d < D; ++d) {
            du_i[j * D + d] += gb[j] * v_prev[j * D + d];  // from the agreement u_hat . v^(r-1)
            gv_prev[j * D + d] += gb[j] * load(u, row + j * D + d);
          }
        }
      }
      if (chain) gv.swap(gv_prev);
    }
    for (int i = 0; i < I; ++i) {
      const int64_t row = L.row(b, i);
      for (int64_t k = 0; k < JD; ++k) store(grad_u, row + k, du[static_cast<int64_t>(i) * JD + k]);
    }
  }
}

}  // namespace

template <typename T>
void forward_any(const T* u, Layout L, int B, int I, int J, int D, int R, const float* bias, float* v, float* c,
                 float* s, int nt) {
#if defined(__AVX512F__)
  if (J == 10 && D == 16) return forward_avx512<T, 10>(u, L, B, I, R, bias, v, c, s, nt);
#endif
  if (J == 10 && D == 16)
    forward<T, 10, 16>(u, L, B, I, J, D, R, bias, v, c, s, nt);
  else
    forward<T, 0, 0>(u, L, B, I, J, D, R, bias, v, c, s, nt);
}

template <typename T>
void backward_any(const T* u, Layout L, int B, int I, int J, int D, int R, const float* c, const float* s,
                  const float* gv, T* gu, float* gb, bool detach, int nt) {
#if defined(__AVX512F__)
  if (J == 10 && D == 16) return backward_avx512<T, 10>(u, L, B, I, R, c, s, gv, gu, gb, detach, nt);
#endif
  if (J == 10 && D == 16)
    backward<T, 10, 16>(u, L, B, I, J, D, R, c, s, gv, gu, gb, detach, nt);
  else
    backward<T, 0, 0>(u, L, B, I, J, D, R, c, s, gv, gu, gb, detach, nt);
}

extern "C" {

void routing_forward(const void* u, int bf16, int64_t sb, int64_t st, int64_t sp, int64_t P, int B, int I, int J,
                     int D, int R, const float* bias, float* v_out, float* c_save, float* s_save, int threads) {
  const Layout L{sb, st, sp, P};
  if (bf16)
    forward_any(static_cast<const uint16_t*>(u), L, B, I, J, D, R, bias, v_out, c_save, s_save, threads);
  else
    forward_any(static_cast<const float*>(u), L, B, I, J, D, R, bias, v_out, c_save, s_save, threads);
}

void routing_backward(const void* u, int bf16, int64_t sb, int64_t st, int64_t sp, int64_t P, int B, int I, int J,
                      int D, int R, const float* c_save, const float* s_save, const float* grad_v, void* grad_u,
                      float* grad_bias, int detach_inner, int threads) {
  const Layout L{sb, st, sp, P};
  if (bf16)
    backward_any(static_cast<const uint16_t*>(u), L, B, I, J, D, R, c_save, s_save, grad_v,
                 static_cast<uint16_t*>(grad_u), grad_bias, detach_inner != 0, threads);
  else
    backward_any(static_cast<const float*>(u), L, B, I, J, D, R, c_save, s_save, grad_v,
                 static_cast<float*>(grad_u), grad_bias, detach_inner != 0, threads);
}

}  // extern "C"
