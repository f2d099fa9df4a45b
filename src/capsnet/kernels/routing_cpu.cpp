// Dynamic routing (Sabour et al. 2017, Procedure 1), forward and backward, fused for the CPU.
//
// Plain C++ with OpenMP, no PyTorch headers: capsnet/cpu_kernels.py compiles it with the
// system's g++ on first use and calls it through ctypes with raw pointers.
//
// Why: routing reads u_hat (1152 x 10 x 16 values per image) again in every iteration. Written
// as tensor operations that is a dozen passes over memory, forward and backward. Here one image
// is routed at a time, its u_hat block (368 KB in bf16) stays in the core's cache for all
// iterations, and each iteration is a single pass: agreement, softmax over the parents j and
// the weighted sum for the next s_j are done together for each input capsule i.
//
// Indices: b batch, i input capsule, j output capsule, d dimension. Row (b, i) of u_hat, its
// J x D predictions, starts at b*sb + (i / P)*st + (i % P)*sp (P > 1 when matrices are shared
// per capsule type, so the predictions come out grouped by type).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

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
void forward(const T* u, Layout L, int B, int I, int Jr, int Dr, int R, float* v_out, float* c_save,
             float* s_save, int threads) {
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
      if (s_save) std::memcpy(s_save + (static_cast<int64_t>(r) * B + b) * J * D, s.data(), sizeof(float) * J * D);
    }
    squash(s.data(), v_out + static_cast<int64_t>(b) * J * D, J, D);
  }
}

template <typename T, int JC, int DC>
void backward(const T* u, Layout L, int B, int I, int Jr, int Dr, int R, const float* c_save, const float* s_save,
              const float* grad_v, T* grad_u, bool detach_inner, int threads) {
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
void forward_any(const T* u, Layout L, int B, int I, int J, int D, int R, float* v, float* c, float* s, int nt) {
  if (J == 10 && D == 16)
    forward<T, 10, 16>(u, L, B, I, J, D, R, v, c, s, nt);
  else
    forward<T, 0, 0>(u, L, B, I, J, D, R, v, c, s, nt);
}

template <typename T>
void backward_any(const T* u, Layout L, int B, int I, int J, int D, int R, const float* c, const float* s,
                  const float* gv, T* gu, bool detach, int nt) {
  if (J == 10 && D == 16)
    backward<T, 10, 16>(u, L, B, I, J, D, R, c, s, gv, gu, detach, nt);
  else
    backward<T, 0, 0>(u, L, B, I, J, D, R, c, s, gv, gu, detach, nt);
}

extern "C" {

void routing_forward(const void* u, int bf16, int64_t sb, int64_t st, int64_t sp, int64_t P, int B, int I, int J,
                     int D, int R, float* v_out, float* c_save, float* s_save, int threads) {
  const Layout L{sb, st, sp, P};
  if (bf16)
    forward_any(static_cast<const uint16_t*>(u), L, B, I, J, D, R, v_out, c_save, s_save, threads);
  else
    forward_any(static_cast<const float*>(u), L, B, I, J, D, R, v_out, c_save, s_save, threads);
}

void routing_backward(const void* u, int bf16, int64_t sb, int64_t st, int64_t sp, int64_t P, int B, int I, int J,
                      int D, int R, const float* c_save, const float* s_save, const float* grad_v, void* grad_u,
                      int detach_inner, int threads) {
  const Layout L{sb, st, sp, P};
  if (bf16)
    backward_any(static_cast<const uint16_t*>(u), L, B, I, J, D, R, c_save, s_save, grad_v,
                 static_cast<uint16_t*>(grad_u), detach_inner != 0, threads);
  else
    backward_any(static_cast<const float*>(u), L, B, I, J, D, R, c_save, s_save, grad_v,
                 static_cast<float*>(grad_u), detach_inner != 0, threads);
}

}  // extern "C"
