// Native CPU kernel for the ragged expert FFN (see native_ffn.py for the contract and the route).
//
// Rows of x are sorted by expert: expert e owns rows [off[e], off[e+1]). One call runs every
// expert's FFN; the work items are (expert, row chunk) in the forward and whole experts in the
// backward (so each expert's weight gradient is owned by one thread and written straight into
// the stacked [E, ., .] buffer), taken from a shared counter by the threads of at::parallel_for.
// Per item the GEMM results stay in small per-thread fp32 buffers, and bias, activation, combine
// weight and their backward run on them while they are still in cache.
//
// Two GEMM engines behind one driver:
//   F32Engine: fp32, each GEMM is at::mm_out / at::addmm_out on views (BLAS, single-threaded
//              inside the parallel region; multi-threaded when the driver runs experts serially).
//   Bf16Engine (only when built with AVX512-BF16): our own vdpbf16ps micro-kernel (12x32 fp32
//              accumulators in registers) over weights prepacked once per weight version in VNNI
//              panels [N/32][K/2][32][2]; activations for the weight-gradient GEMMs are packed per
//              call with one interleave pass.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define XMOE_BF16_KERNEL 1
#else
#define XMOE_BF16_KERNEL 0
#endif

// MKL (the BLAS of the x86 PyTorch wheels) may start its own threads inside our parallel region;
// pin it to one thread per worker there. Weak: absent with other BLAS builds.
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

namespace {

using at::Tensor;
using Vec = at::vec::Vectorized<float>;
constexpr int64_t kV = Vec::size();

enum Act : int64_t { kGelu = 0, kRelu = 1, kSilu = 2, kSwiglu = 3 };

// ------------------------------------------------------------------------------------------
// Elementwise helpers (fp32 in registers; storage is float or bf16 bits as uint16_t)
// ------------------------------------------------------------------------------------------

inline Vec sigmoid(const Vec& x) { return Vec(1.f) / (Vec(1.f) + x.neg().exp()); }

inline Vec act_fwd(const Vec& x, int64_t act) {
  if (act == kGelu) return x * Vec(0.5f) * (Vec(1.f) + (x * Vec(float(M_SQRT1_2))).erf());
  if (act == kRelu) return at::vec::maximum(x, Vec(0.f));
  return x * sigmoid(x);  // silu (and the gate of swiglu)
}

// d act(x) / dx * g
inline Vec act_bwd(const Vec& g, const Vec& x, int64_t act) {
  if (act == kGelu) {
    const float kBeta = float(M_2_SQRTPI * M_SQRT1_2 * 0.5);
    Vec cdf = Vec(0.5f) * (Vec(1.f) + (x * Vec(float(M_SQRT1_2))).erf());
    Vec pdf = (x * x * Vec(-0.5f)).exp() * Vec(kBeta);
    return g * (cdf + x * pdf);
  }
  if (act == kRelu) return Vec::blendv(Vec(0.f), g, x > Vec(0.f));
  Vec s = sigmoid(x);
  return g * s * (Vec(1.f) + x * (Vec(1.f) - s));
}

inline Vec load(const float* p, int64_t n) { return n == kV ? Vec::loadu(p) : Vec::loadu(p, n); }
inline void store(float* p, const Vec& v, int64_t n) { n == kV ? v.store(p) : v.store(p, n); }

#if XMOE_BF16_KERNEL
static_assert(kV == 16, "the bf16 kernel is built with AVX-512 vectors");
inline Vec load(const uint16_t* p, int64_t n) {
  __mmask16 m = n == 16 ? 0xFFFF : __mmask16((1u << n) - 1);
  __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return Vec(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
}
inline void store(uint16_t* p, const Vec& v, int64_t n) {
  __mmask16 m = n == 16 ? 0xFFFF : __mmask16((1u << n) - 1);
  __m256i h = (__m256i)_mm512_cvtneps_pbh(__m512(v));
  _mm256_mask_storeu_epi16(p, m, h);
}
#endif

template <typename T>
inline void zero_rows(T* p, int64_t n) { std::memset(p, 0, sizeof(T) * n); }

// ------------------------------------------------------------------------------------------
// F32 engine: BLAS through ATen on views (no copies; MKL/OpenBLAS honour the leading dims)
// ------------------------------------------------------------------------------------------

struct F32Engine {
  using T = float;
  Tensor w[3];  // w1 [E,d,h], w2 [E,h,d], w3 [E,d,h] (fp32, contiguous; w3 may be undefined)

  static Tensor view(const float* p, int64_t r, int64_t c, int64_t ld) {
    return torch::from_blob(const_cast<float*>(p), {r, c}, {ld, 1}, torch::kFloat32);
  }
  // C[m, N] (+)= A[m, K] @ W_which[e]  (or @ W_which[e]^T)
  void mm_w(int which, bool trans, int64_t e, const float* A, int64_t lda, int64_t m, float* C,
            int64_t ldc, bool acc) const {
    Tensor we = w[which][e];
    if (trans) we = we.t();
    Tensor a = view(A, m, we.size(0), lda), c = view(C, m, we.size(1), ldc);
    if (acc) at::addmm_out(c, c, a, we); else at::mm_out(c, a, we);
  }
  // G_j[k1, k2] (+)= A[n, k1]^T @ B_j[n, k2] for j in {0, 1} (B_1 / G_1 optional)
  void wgrad(const float* A, int64_t lda, int64_t k1, const float* B0, const float* B1, int64_t ldb,
             int64_t k2, int64_t n, float* G0, float* G1, bool acc) const {
    Tensor a = view(A, n, k1, lda).t();
    const float* Bs[2] = {B0, B1};
    float* Gs[2] = {G0, G1};
    for (int j = 0; j < 2; ++j) {
      if (!Gs[j]) continue;
      Tensor b = view(Bs[j], n, k2, ldb), g = view(Gs[j], k1, k2, k2);
      if (acc) at::addmm_out(g, g, a, b); else at::mm_out(g, a, b);
    }
  }
};

// ------------------------------------------------------------------------------------------
// BF16 engine: AVX512-BF16 micro-kernel over VNNI-packed B
// ------------------------------------------------------------------------------------------
#if XMOE_BF16_KERNEL

constexpr int64_t kNR = 32;  // columns per B panel (two zmm of fp32 accumulators)
constexpr int64_t kMR = 12;  // rows per micro-tile: 24 accumulators + 2 B registers

inline int64_t panels(int64_t N) { return (N + kNR - 1) / kNR; }
inline int64_t pairs(int64_t K) { return (K + 1) / 2; }
// Elements (uint16) of one packed [K, N] matrix.
inline int64_t packed_size(int64_t K, int64_t N) { return panels(N) * pairs(K) * kNR * 2; }

// Pack B[k, n] = src[k * rs + n * cs] (K x N, bf16 bits) into panels [NP][KP][32][2], zero padded.
void pack_b_generic(const uint16_t* src, int64_t rs, int64_t cs, int64_t K, int64_t N, uint16_t* dst) {
  const int64_t KP = pairs(K);
  for (int64_t np = 0; np < panels(N); ++np)
    for (int64_t p = 0; p < KP; ++p) {
      uint16_t* o = dst + (np * KP + p) * kNR * 2;
      for (int64_t j = 0; j < kNR; ++j) {
        int64_t n = np * kNR + j, k = 2 * p;
        bool ok = n < N;
        o[2 * j] = ok ? src[k * rs + n * cs] : 0;
        o[2 * j + 1] = (ok && k + 1 < K) ? src[(k + 1) * rs + n * cs] : 0;
      }
    }
}

// Interleave rows 2p and 2p+1 of a row-major [K, N] matrix (ld) into VNNI pairs.
// panel = true:  dst is B panels [NP][KP][32][2];   panel = false: dst is [KP][N][2] (an A^T).
void pack_rows(const uint16_t* src, int64_t ld, int64_t K, int64_t N, uint16_t* dst, bool panel) {
  static const __m512i lo = [] {
    alignas(64) uint16_t idx[32];
    for (int j = 0; j < 16; ++j) { idx[2 * j] = j; idx[2 * j + 1] = 32 + j; }
    return _mm512_load_si512(idx);
  }();
  static const __m512i hi = [] {
    alignas(64) uint16_t idx[32];
    for (int j = 0; j < 16; ++j) { idx[2 * j] = 16 + j; idx[2 * j + 1] = 48 + j; }
    return _mm512_load_si512(idx);
  }();
  const int64_t KP = pairs(K), NP = panels(N);
  for (int64_t p = 0; p < KP; ++p) {
    const uint16_t* r0 = src + 2 * p * ld;
    const uint16_t* r1 = r0 + ld;
    bool has1 = 2 * p + 1 < K;
    for (int64_t np = 0; np < NP; ++np) {
      int64_t n0 = np * kNR, cnt = std::min(kNR, N - n0);
      __mmask32 m = cnt == 32 ? 0xFFFFFFFFu : __mmask32((1u << cnt) - 1);
      __m512i a = _mm512_maskz_loadu_epi16(m, r0 + n0);
      __m512i b = has1 ? _mm512_maskz_loadu_epi16(m, r1 + n0) : _mm512_setzero_si512();
      __m512i x0 = _mm512_permutex2var_epi16(a, lo, b), x1 = _mm512_permutex2var_epi16(a, hi, b);
      if (panel) {
        uint16_t* o = dst + (np * KP + p) * kNR * 2;
        _mm512_storeu_si512(o, x0);
        _mm512_storeu_si512(o + 32, x1);
      } else {  // only the valid 2*cnt elements
        uint16_t* o = dst + (p * N + n0) * 2;
        int64_t c0 = std::min<int64_t>(cnt, 16), c1 = cnt - c0;
        _mm512_mask_storeu_epi16(o, c0 == 16 ? 0xFFFFFFFFu : __mmask32((1ull << (2 * c0)) - 1), x0);
        if (c1 > 0)
          _mm512_mask_storeu_epi16(o + 32, c1 == 16 ? 0xFFFFFFFFu : __mmask32((1ull << (2 * c1)) - 1), x1);
      }
    }
  }
}

// C[MR, ncols<=32] (+)= sum_p A(i, p) . B[p] where A(i, p) is the bf16 pair at A + i*a_is + p*a_ps
// (a_ps = 2 for a row-major A, whose odd K tail `kodd` is read as (a, 0)).
template <int MR>
inline void ukernel(int64_t kp, bool kodd, const uint16_t* A, int64_t a_is, int64_t a_ps,
                    const uint16_t* B, float* C, int64_t ldc, int64_t ncols, bool acc) {
  __m512 c0[MR], c1[MR];
  const __mmask16 m0 = ncols >= 16 ? 0xFFFF : __mmask16((1u << ncols) - 1);
  const __mmask16 m1 = ncols >= 32 ? 0xFFFF : ncols <= 16 ? 0 : __mmask16((1u << (ncols - 16)) - 1);
  for (int i = 0; i < MR; ++i) {
    c0[i] = acc ? _mm512_maskz_loadu_ps(m0, C + i * ldc) : _mm512_setzero_ps();
    c1[i] = acc ? _mm512_maskz_loadu_ps(m1, C + i * ldc + 16) : _mm512_setzero_ps();
  }
  for (int64_t p = 0; p < kp; ++p) {
    __m512bh b0 = (__m512bh)_mm512_loadu_si512(B + p * 64);
    __m512bh b1 = (__m512bh)_mm512_loadu_si512(B + p * 64 + 32);
    const uint16_t* ap = A + p * a_ps;
#pragma GCC unroll 12
    for (int i = 0; i < MR; ++i) {
      int32_t v;
      std::memcpy(&v, ap + i * a_is, 4);
      __m512bh a = (__m512bh)_mm512_set1_epi32(v);
      c0[i] = _mm512_dpbf16_ps(c0[i], a, b0);
      c1[i] = _mm512_dpbf16_ps(c1[i], a, b1);
    }
  }
  if (kodd) {
    __m512bh b0 = (__m512bh)_mm512_loadu_si512(B + kp * 64);
    __m512bh b1 = (__m512bh)_mm512_loadu_si512(B + kp * 64 + 32);
    const uint16_t* ap = A + kp * a_ps;
    for (int i = 0; i < MR; ++i) {
      __m512bh a = (__m512bh)_mm512_set1_epi32(int32_t(ap[i * a_is]));
      c0[i] = _mm512_dpbf16_ps(c0[i], a, b0);
      c1[i] = _mm512_dpbf16_ps(c1[i], a, b1);
    }
  }
  for (int i = 0; i < MR; ++i) {
    _mm512_mask_storeu_ps(C + i * ldc, m0, c0[i]);
    if (m1) _mm512_mask_storeu_ps(C + i * ldc + 16, m1, c1[i]);
  }
}

using UK = void (*)(int64_t, bool, const uint16_t*, int64_t, int64_t, const uint16_t*, float*, int64_t,
                    int64_t, bool);
template <int... I>
constexpr std::array<UK, sizeof...(I)> make_uks(std::integer_sequence<int, I...>) {
  return {&ukernel<I + 1>...};
}
const auto kUK = make_uks(std::make_integer_sequence<int, kMR>{});

// C[M, N] (+)= A @ Bp, K = 2*kp + kodd. Parallel over panels when not already in a parallel region.
void gemm_packed(int64_t M, int64_t N, int64_t kp, bool kodd, const uint16_t* A, int64_t a_is,
                 int64_t a_ps, const uint16_t* Bp, float* C, int64_t ldc, bool acc) {
  const int64_t NP = panels(N), pstride = (kp + kodd) * kNR * 2;
  at::parallel_for(0, NP, 1, [&](int64_t b, int64_t e) {
    for (int64_t np = b; np < e; ++np) {
      const uint16_t* B = Bp + np * pstride;
      int64_t ncols = std::min(kNR, N - np * kNR);
      for (int64_t m0 = 0; m0 < M; m0 += kMR) {
        int64_t mr = std::min(kMR, M - m0);
        kUK[mr - 1](kp, kodd, A + m0 * a_is, a_is, a_ps, B, C + m0 * ldc + np * kNR, ldc, ncols, acc);
      }
    }
  });
}

struct Bf16Engine {
  using T = uint16_t;
  // Packed weights, [E, packed_size] each: p[which][trans]; which: 0 = w1, 1 = w2, 2 = w3.
  const uint16_t* p[3][2] = {{nullptr, nullptr}, {nullptr, nullptr}, {nullptr, nullptr}};
  int64_t d = 0, h = 0;

  void mm_w(int which, bool trans, int64_t e, const uint16_t* A, int64_t lda, int64_t m, float* C,
            int64_t ldc, bool acc) const {
    // w1, w3: [d, h]; w2: [h, d]; transposed swaps them.
    int64_t K = (which == 1) != trans ? h : d, N = (which == 1) != trans ? d : h;
    const uint16_t* B = p[which][trans] + e * packed_size(K, N);
    gemm_packed(m, N, K / 2, K % 2, A, lda, 2, B, C, ldc, acc);
  }
  void wgrad(const uint16_t* A, int64_t lda, int64_t k1, const uint16_t* B0, const uint16_t* B1,
             int64_t ldb, int64_t k2, int64_t n, float* G0, float* G1, bool acc) const {
    thread_local std::vector<uint16_t> pa, pb;
    pa.resize(pairs(n) * k1 * 2);
    pb.resize(packed_size(n, k2));
    pack_rows(A, lda, n, k1, pa.data(), false);
    const uint16_t* Bs[2] = {B0, B1};
    float* Gs[2] = {G0, G1};
    for (int j = 0; j < 2; ++j) {
      if (!Gs[j]) continue;
      pack_rows(Bs[j], ldb, n, k2, pb.data(), true);
      gemm_packed(k1, k2, pairs(n), false, pa.data(), 2, 2 * k1, pb.data(), Gs[j], k2, acc);
    }
  }
};

Tensor pack_weight(const Tensor& w, bool trans) {
  // w: [E, K, N] bf16 (trans: pack w[e]^T, i.e. [N, K]) -> [E, packed_size] bf16 bits
  TORCH_CHECK(w.dim() == 3 && w.scalar_type() == at::kBFloat16, "pack_weight: [E, K, N] bf16");
  Tensor wc = w.contiguous();
  const int64_t E = wc.size(0), R = wc.size(1), Cc = wc.size(2);
  const int64_t K = trans ? Cc : R, N = trans ? R : Cc, sz = packed_size(K, N);
  Tensor out = at::empty({E, sz}, wc.options());
  const uint16_t* src = reinterpret_cast<const uint16_t*>(wc.data_ptr<at::BFloat16>());
  uint16_t* dst = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(0, E, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const uint16_t* s = src + i * R * Cc;
      if (trans) pack_b_generic(s, 1, Cc, K, N, dst + i * sz);
      else pack_rows(s, Cc, K, N, dst + i * sz, true);
    }
  });
  return out;
}
#endif  // XMOE_BF16_KERNEL

// ------------------------------------------------------------------------------------------
// Work distribution: threads pull items from a shared counter (load balance over ragged sizes)
// ------------------------------------------------------------------------------------------

template <typename F>
void for_each_item(int64_t n_items, bool parallel, const F& f) {
  if (!parallel || n_items <= 1 || at::in_parallel_region()) {
    for (int64_t i = 0; i < n_items; ++i) f(i);
    return;
  }
  std::atomic<int64_t> next{0};
  int64_t nt = std::min<int64_t>(at::get_num_threads(), n_items);
  at::parallel_for(0, nt, 1, [&](int64_t, int64_t) {
    static const bool pin = MKL_Set_Num_Threads_Local && !std::getenv("XMOE_NATIVE_NO_MKL_PIN");
    int old = pin ? MKL_Set_Num_Threads_Local(1) : 0;
    for (int64_t i = next++; i < n_items; i = next++) f(i);
    if (pin) MKL_Set_Num_Threads_Local(old);
  });
}

struct Common {
  int64_t A, d, h, E, act;
  const int64_t* off;
  const float *b1, *b2, *b3, *rw;  // fp32, may be null
};

// ------------------------------------------------------------------------------------------
// Forward driver
// ------------------------------------------------------------------------------------------

template <typename Eng>
void forward_impl(const Eng& eng, const Common& c, const typename Eng::T* x, typename Eng::T* y,
                  float* h1s, float* h3s, int64_t row_tile) {
  using T = typename Eng::T;
  const bool glu = c.act == kSwiglu;
  const int64_t d = c.d, h = c.h;
  struct Item { int64_t e, r0, n; };
  std::vector<Item> items;
  for (int64_t e = 0; e < c.E; ++e) {
    int64_t n = c.off[e + 1] - c.off[e];
    if (n == 0) continue;
    int64_t k = (n + row_tile - 1) / row_tile, step = (n + k - 1) / k;
    for (int64_t r = 0; r < n; r += step) items.push_back({e, c.off[e] + r, std::min(step, n - r)});
  }
  for_each_item(int64_t(items.size()), true, [&](int64_t it) {
    const auto [e, r0, n] = items[it];
    thread_local std::vector<float> s1, s3, s2;
    thread_local std::vector<T> hb;
    s1.resize(n * h);
    if (glu) s3.resize(n * h);
    eng.mm_w(0, false, e, x + r0 * d, d, n, s1.data(), h, false);
    if (glu) eng.mm_w(2, false, e, x + r0 * d, d, n, s3.data(), h, false);
    // hidden rows: act(x w1 + b1) [* (x w3 + b3)] * rw, in T (in place for fp32)
    T* hp;
    if constexpr (std::is_same_v<T, float>) hp = s1.data();
    else { hb.resize(n * h); hp = hb.data(); }
    const float* b1e = c.b1 ? c.b1 + e * h : nullptr;
    const float* b3e = c.b3 ? c.b3 + e * h : nullptr;
    for (int64_t i = 0; i < n; ++i) {
      Vec rwv(c.rw ? c.rw[r0 + i] : 1.f);
      float* a1 = s1.data() + i * h;
      float* a3 = glu ? s3.data() + i * h : nullptr;
      for (int64_t j = 0; j < h; j += kV) {
        int64_t m = std::min(kV, h - j);
        Vec v = load(a1 + j, m);
        if (b1e) v = v + load(b1e + j, m);
        if (h1s) store(h1s + (r0 + i) * h + j, v, m);
        Vec a = act_fwd(v, c.act);
        if (glu) {
          Vec u = load(a3 + j, m);
          if (b3e) u = u + load(b3e + j, m);
          if (h3s) store(h3s + (r0 + i) * h + j, u, m);
          a = a * u;
        }
        store(hp + i * h + j, a * rwv, m);
      }
    }
    // y rows = h @ w2 + rw * b2
    float* out;
    if constexpr (std::is_same_v<T, float>) out = y + r0 * d;
    else { s2.resize(n * d); out = s2.data(); }
    eng.mm_w(1, false, e, hp, h, n, out, d, false);
    const float* b2e = c.b2 ? c.b2 + e * d : nullptr;
    if (b2e || !std::is_same_v<T, float>) {
      for (int64_t i = 0; i < n; ++i) {
        Vec rwv(c.rw ? c.rw[r0 + i] : 1.f);
        for (int64_t j = 0; j < d; j += kV) {
          int64_t m = std::min(kV, d - j);
          Vec v = load(out + i * d + j, m);
          if (b2e) v = v + load(b2e + j, m) * rwv;
          store(y + (r0 + i) * d + j, v, m);
        }
      }
    }
  });
}

// ------------------------------------------------------------------------------------------
// Backward driver: one item per expert (its weight gradients are its own), rows in chunks
// ------------------------------------------------------------------------------------------

struct Grads {
  float *gw1, *gw2, *gw3, *gb1, *gb2, *gb3, *grw;  // null = not needed
  bool need_x;
  // bf16 weight gradients: accumulate per expert in fp32 scratch, write bf16 here (else null)
  uint16_t *ow1 = nullptr, *ow2 = nullptr, *ow3 = nullptr;
};

// Round an expert's fp32 weight gradient into the bf16 output (or zero it).
inline void finish_wgrad(const float* src, uint16_t* dst, int64_t n) {
#if XMOE_BF16_KERNEL
  if (!dst) return;
  if (!src) { zero_rows(dst, n); return; }
  for (int64_t i = 0; i < n; i += kV) {
    int64_t m = std::min(kV, n - i);
    store(dst + i, load(src + i, m), m);
  }
#endif
}

inline float hsum(const Vec& v) {
  alignas(64) float t[kV];
  v.store(t);
  float s = 0;
  for (int64_t i = 0; i < kV; ++i) s += t[i];
  return s;
}

template <typename Eng>
void backward_impl(const Eng& eng, const Common& c, const typename Eng::T* gy, const typename Eng::T* x,
                   const float* h1s, const float* h3s, const float* b2, typename Eng::T* gx, const Grads& g,
                   int64_t row_tile) {
  using T = typename Eng::T;
  const bool glu = c.act == kSwiglu;
  const int64_t d = c.d, h = c.h;
  // Largest experts first; parallel over experts only when there are enough of them, else
  // experts run one after another and each GEMM uses all threads.
  std::vector<int64_t> order;
  int64_t nonempty = 0, biggest = 0;
  for (int64_t e = 0; e < c.E; ++e) {
    int64_t n = c.off[e + 1] - c.off[e];
    order.push_back(e);
    nonempty += n > 0;
    biggest = std::max(biggest, n);
  }
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return c.off[a + 1] - c.off[a] > c.off[b + 1] - c.off[b];
  });
  const int64_t nt = at::get_num_threads();
  const bool parallel = nonempty >= 2 * nt && biggest * nt <= 2 * c.A;
  for_each_item(c.E, parallel, [&](int64_t it) {
    const int64_t e = order[it], n_all = c.off[e + 1] - c.off[e];
    uint16_t* ow[3] = {g.ow1 ? g.ow1 + e * d * h : nullptr, g.ow2 ? g.ow2 + e * h * d : nullptr,
                       g.ow3 ? g.ow3 + e * d * h : nullptr};
    if (n_all == 0) {
      if (g.gw1) zero_rows(g.gw1 + e * d * h, d * h);
      if (g.gw3) zero_rows(g.gw3 + e * d * h, d * h);
      if (g.gw2) zero_rows(g.gw2 + e * h * d, h * d);
      for (auto* o : ow) finish_wgrad(nullptr, o, d * h);
      return;
    }
    thread_local std::vector<float> sa, sgh, sgx, sw1, sw2, sw3;
    auto wbuf = [&](float* all, uint16_t* o, std::vector<float>& sc, int64_t n) -> float* {
      if (o) { sc.resize(n); return sc.data(); }
      return all ? all + e * n : nullptr;
    };
    float* gw1e = wbuf(g.gw1, ow[0], sw1, d * h);
    float* gw2e = wbuf(g.gw2, ow[1], sw2, h * d);
    float* gw3e = wbuf(g.gw3, ow[2], sw3, d * h);
    thread_local std::vector<T> hw, g1b, g3b;
    const float* b2e = b2 ? b2 + e * d : nullptr;
    bool first = true;
    for (int64_t r0 = c.off[e]; r0 < c.off[e + 1]; r0 += row_tile) {
      const int64_t n = std::min(row_tile, c.off[e + 1] - r0);
      sa.resize(n * h);
      sgh.resize(n * h);
      hw.resize(n * h);
      g1b.resize(n * h);
      if (glu) g3b.resize(n * h);
      // a = act(h1) [* h3] (fp32, kept for d rw);  hw = a * rw (T, the GEMM operand)
      for (int64_t i = 0; i < n; ++i) {
        Vec rwv(c.rw ? c.rw[r0 + i] : 1.f);
        for (int64_t j = 0; j < h; j += kV) {
          int64_t m = std::min(kV, h - j);
          Vec a = act_fwd(load(h1s + (r0 + i) * h + j, m), c.act);
          if (glu) a = a * load(h3s + (r0 + i) * h + j, m);
          store(sa.data() + i * h + j, a, m);
          store(hw.data() + i * h + j, a * rwv, m);
        }
      }
      const T* gyc = gy + r0 * d;
      if (gw2e) eng.wgrad(hw.data(), h, h, gyc, nullptr, d, d, n, gw2e, nullptr, !first);
      if (g.gb2) {
        float* gb = g.gb2 + e * d;
        for (int64_t i = 0; i < n; ++i) {
          Vec rwv(c.rw ? c.rw[r0 + i] : 1.f);
          for (int64_t j = 0; j < d; j += kV) {
            int64_t m = std::min(kV, d - j);
            store(gb + j, load(gb + j, m) + load(gyc + i * d + j, m) * rwv, m);
          }
        }
      }
      // gh = gy @ w2^T  (d loss / d (rw * a))
      eng.mm_w(1, true, e, gyc, d, n, sgh.data(), h, false);
      float* gb1 = g.gb1 ? g.gb1 + e * h : nullptr;
      float* gb3 = g.gb3 ? g.gb3 + e * h : nullptr;
      for (int64_t i = 0; i < n; ++i) {
        const int64_t r = r0 + i;
        float* ghi = sgh.data() + i * h;
        if (g.grw) {
          Vec acc(0.f);
          for (int64_t j = 0; j < h; j += kV) {
            int64_t m = std::min(kV, h - j);
            acc = acc + load(ghi + j, m) * load(sa.data() + i * h + j, m);
          }
          if (b2e)
            for (int64_t j = 0; j < d; j += kV) {
              int64_t m = std::min(kV, d - j);
              acc = acc + load(gyc + i * d + j, m) * load(b2e + j, m);
            }
          g.grw[r] = hsum(acc);
        }
        Vec rwv(c.rw ? c.rw[r] : 1.f);
        for (int64_t j = 0; j < h; j += kV) {
          int64_t m = std::min(kV, h - j);
          Vec gh = load(ghi + j, m) * rwv, h1 = load(h1s + r * h + j, m), g1;
          if (glu) {
            Vec h3 = load(h3s + r * h + j, m);
            Vec g3 = gh * act_fwd(h1, kSilu);
            g1 = act_bwd(gh * h3, h1, kSilu);
            store(g3b.data() + i * h + j, g3, m);
            if (gb3) store(gb3 + j, load(gb3 + j, m) + g3, m);
          } else {
            g1 = act_bwd(gh, h1, c.act);
          }
          store(g1b.data() + i * h + j, g1, m);
          if (gb1) store(gb1 + j, load(gb1 + j, m) + g1, m);
        }
      }
      const T* xc = x + r0 * d;
      if (gw1e || gw3e)
        eng.wgrad(xc, d, d, g1b.data(), glu ? g3b.data() : nullptr, h, h, n, gw1e, gw3e, !first);
      if (g.need_x) {
        float* out;
        if constexpr (std::is_same_v<T, float>) out = gx + r0 * d;
        else { sgx.resize(n * d); out = sgx.data(); }
        eng.mm_w(0, true, e, g1b.data(), h, n, out, d, false);
        if (glu) eng.mm_w(2, true, e, g3b.data(), h, n, out, d, true);
        if constexpr (!std::is_same_v<T, float>)
          for (int64_t i = 0; i < n * d; i += kV) {
            int64_t m = std::min(kV, n * d - i);
            store(gx + r0 * d + i, load(out + i, m), m);
          }
      }
      first = false;
    }
    finish_wgrad(gw1e, ow[0], d * h);
    finish_wgrad(gw2e, ow[1], h * d);
    finish_wgrad(gw3e, ow[2], d * h);
  });
}

// ------------------------------------------------------------------------------------------
// Python entry points
// ------------------------------------------------------------------------------------------

const float* fptr(const c10::optional<Tensor>& t) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous(), "bias / row weight: contiguous fp32");
  return t->data_ptr<float>();
}

Common common(const Tensor& x, const Tensor& off, int64_t h, int64_t act, const c10::optional<Tensor>& b1,
              const c10::optional<Tensor>& b2, const c10::optional<Tensor>& b3,
              const c10::optional<Tensor>& rw) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x: contiguous [A, d]");
  TORCH_CHECK(off.scalar_type() == at::kLong && off.is_contiguous() && off.device().is_cpu(), "offsets: int64 [E+1]");
  TORCH_CHECK(act >= 0 && act <= 3, "activation code");
  const int64_t* o = off.data_ptr<int64_t>();
  const int64_t E = off.numel() - 1;
  TORCH_CHECK(o[0] == 0 && o[E] == x.size(0), "offsets must span the rows of x");
  for (int64_t e = 0; e < E; ++e) TORCH_CHECK(o[e + 1] >= o[e], "offsets must be non-decreasing");
  return Common{x.size(0), x.size(1), h, E, act, o, fptr(b1), fptr(b2), fptr(b3), fptr(rw)};
}

std::vector<Tensor> forward_f32(Tensor x, Tensor off, Tensor w1, Tensor w2, c10::optional<Tensor> w3,
                                c10::optional<Tensor> b1, c10::optional<Tensor> b2, c10::optional<Tensor> b3,
                                c10::optional<Tensor> rw, int64_t act, bool save, int64_t row_tile) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, "forward_f32: fp32 x");
  F32Engine eng;
  eng.w[0] = w1.contiguous();
  eng.w[1] = w2.contiguous();
  if (act == kSwiglu) eng.w[2] = w3.value().contiguous();
  Common c = common(x, off, w1.size(2), act, b1, b2, b3, rw);
  Tensor y = at::empty({c.A, c.d}, x.options());
  Tensor h1s, h3s;
  if (save) {
    h1s = at::empty({c.A, c.h}, x.options().dtype(at::kFloat));
    if (act == kSwiglu) h3s = at::empty_like(h1s);
  }
  forward_impl(eng, c, x.data_ptr<float>(), y.data_ptr<float>(), save ? h1s.data_ptr<float>() : nullptr,
               h3s.defined() ? h3s.data_ptr<float>() : nullptr, row_tile);
  return {y, h1s, h3s};
}

Grads make_grads(const Common& c, const std::vector<bool>& need, bool glu, const at::TensorOptions& f32,
                 std::vector<Tensor>& out, bool wbf16 = false) {
  // need: [x, rw, w1, w2, w3, b1, b2, b3]
  auto mk = [&](bool want, std::initializer_list<int64_t> shape, bool zero) -> float* {
    if (!want) { out.emplace_back(); return nullptr; }
    out.push_back(zero ? at::zeros(shape, f32) : at::empty(shape, f32));
    return out.back().data_ptr<float>();
  };
  Grads g{};
  out.clear();
  out.emplace_back();  // gx, filled by the caller
  g.grw = mk(need[1] && c.rw, {c.A}, false);
  auto mkw = [&](bool want, std::initializer_list<int64_t> shape, uint16_t** o) -> float* {
    if (!want || !wbf16) return mk(want, shape, false);
    out.push_back(at::empty(shape, f32.dtype(at::kBFloat16)));
    *o = reinterpret_cast<uint16_t*>(out.back().data_ptr<at::BFloat16>());
    return nullptr;
  };
  g.gw1 = mkw(need[2], {c.E, c.d, c.h}, &g.ow1);
  g.gw2 = mkw(need[3], {c.E, c.h, c.d}, &g.ow2);
  g.gw3 = mkw(need[4] && glu, {c.E, c.d, c.h}, &g.ow3);
  g.gb1 = mk(need[5], {c.E, c.h}, true);
  g.gb2 = mk(need[6], {c.E, c.d}, true);
  g.gb3 = mk(need[7] && glu, {c.E, c.h}, true);
  g.need_x = need[0];
  return g;
}

std::vector<Tensor> backward_f32(Tensor gy, Tensor x, Tensor off, Tensor h1s, c10::optional<Tensor> h3s,
                                 Tensor w1, Tensor w2, c10::optional<Tensor> w3, c10::optional<Tensor> b2,
                                 c10::optional<Tensor> rw, int64_t act, std::vector<bool> need, int64_t row_tile) {
  F32Engine eng;
  eng.w[0] = w1.contiguous();
  eng.w[1] = w2.contiguous();
  const bool glu = act == kSwiglu;
  if (glu) eng.w[2] = w3.value().contiguous();
  gy = gy.contiguous();
  Common c = common(x, off, w1.size(2), act, {}, {}, {}, rw);
  std::vector<Tensor> out;
  Grads g = make_grads(c, need, glu, x.options().dtype(at::kFloat), out);
  if (g.need_x) out[0] = at::empty({c.A, c.d}, x.options());
  backward_impl(eng, c, gy.data_ptr<float>(), x.data_ptr<float>(), h1s.data_ptr<float>(),
                glu ? h3s.value().data_ptr<float>() : nullptr, fptr(b2),
                g.need_x ? out[0].data_ptr<float>() : nullptr, g, row_tile);
  return out;
}

#if XMOE_BF16_KERNEL
inline const uint16_t* u16(const Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 && t.is_contiguous(), "bf16 contiguous tensor expected");
  return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>());
}

std::vector<Tensor> forward_bf16(Tensor x, Tensor off, int64_t h, Tensor p1, Tensor p2, c10::optional<Tensor> p3,
                                 c10::optional<Tensor> b1, c10::optional<Tensor> b2, c10::optional<Tensor> b3,
                                 c10::optional<Tensor> rw, int64_t act, bool save, int64_t row_tile) {
  Common c = common(x, off, h, act, b1, b2, b3, rw);
  Bf16Engine eng;
  eng.d = c.d;
  eng.h = h;
  eng.p[0][0] = u16(p1);
  eng.p[1][0] = u16(p2);
  if (act == kSwiglu) eng.p[2][0] = u16(p3.value());
  Tensor y = at::empty({c.A, c.d}, x.options());
  Tensor h1s, h3s;
  if (save) {
    h1s = at::empty({c.A, h}, x.options().dtype(at::kFloat));
    if (act == kSwiglu) h3s = at::empty_like(h1s);
  }
  forward_impl(eng, c, u16(x), const_cast<uint16_t*>(u16(y)), save ? h1s.data_ptr<float>() : nullptr,
               h3s.defined() ? h3s.data_ptr<float>() : nullptr, row_tile);
  return {y, h1s, h3s};
}

std::vector<Tensor> backward_bf16(Tensor gy, Tensor x, Tensor off, Tensor h1s, c10::optional<Tensor> h3s,
                                  Tensor p1t, Tensor p2t, c10::optional<Tensor> p3t, c10::optional<Tensor> b2,
                                  c10::optional<Tensor> rw, int64_t act, std::vector<bool> need, int64_t row_tile,
                                  bool wgrad_bf16) {
  const bool glu = act == kSwiglu;
  gy = gy.contiguous();
  Common c = common(x, off, h1s.size(1), act, {}, {}, {}, rw);
  Bf16Engine eng;
  eng.d = c.d;
  eng.h = c.h;
  eng.p[0][1] = u16(p1t);
  eng.p[1][1] = u16(p2t);
  if (glu) eng.p[2][1] = u16(p3t.value());
  std::vector<Tensor> out;
  Grads g = make_grads(c, need, glu, x.options().dtype(at::kFloat), out, wgrad_bf16);
  if (g.need_x) out[0] = at::empty({c.A, c.d}, x.options());
  backward_impl(eng, c, u16(gy), u16(x), h1s.data_ptr<float>(), glu ? h3s.value().data_ptr<float>() : nullptr,
                fptr(b2), g.need_x ? const_cast<uint16_t*>(u16(out[0])) : nullptr, g, row_tile);
  return out;
}
#endif

std::string isa() {
#if XMOE_BF16_KERNEL
  return "fp32: BLAS via ATen (" + std::string(kV == 16 ? "avx512" : "avx2") +
         " epilogues); bf16: avx512-bf16 vdpbf16ps micro-kernel, VNNI-prepacked weights";
#else
  return "fp32: BLAS via ATen (" + std::string(kV == 16 ? "avx512" : kV == 8 ? "avx2" : "scalar") +
         " epilogues); bf16: no native kernel in this build (computed in fp32)";
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward_f32", &forward_f32);
  m.def("backward_f32", &backward_f32);
  m.def("isa", &isa);
  m.attr("has_bf16_kernel") = bool(XMOE_BF16_KERNEL);
#if XMOE_BF16_KERNEL
  m.def("pack_weight", &pack_weight);
  m.def("forward_bf16", &forward_bf16);
  m.def("backward_bf16", &backward_bf16);
#endif
}
