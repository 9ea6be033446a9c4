// The CUDA layer (fwdcore_cuda.h) against the CPU core's C API (fwdcore.h), over small odd shapes that
// cross every tile boundary: Philox words bit-identical, perturbation values bit-identical (normal values
// within a few ulp on a real GPU, whose logf / cosf are not glibc's), combinations and the dual kernels
// within float tolerances, and the error contract (codes, "fwd_cuda_...: ..." messages, nothing written).
//
// Built twice (csrc/cuda/tests/CMakeLists.txt):
//  - test_cuda_emu: FWD_CUDA_EMULATE=1, the kernels compiled by the host compiler and run by the SIMT
//    emulator (simt_host.h) on host memory. Runs on every machine.
//  - test_cuda_device (FWDCORE_CUDA=ON): the real kernels on the current GPU, device buffers through
//    cudaMalloc / cudaMemcpy. Exits 77 (ctest: skipped) when there is no usable device.
#include <stdlib.h>

#include <algorithm>
#include <vector>

#include "fwdcore_cuda.h"
#include "test_common.h"

#if defined(FWD_CUDA_EMULATE)
#include "simt_host.h"
static constexpr bool kEmulated = true;
#else
#include <cuda_runtime.h>
static constexpr bool kEmulated = false;
#endif

namespace {

// ---------------------------------------------------------------------------------------------------
// Device buffers (host memory under emulation)

[[noreturn]] void fatal(const char* what) {
  fprintf(stderr, "test_cuda: %s\n", what);
  exit(1);
}

void* dev_alloc(size_t bytes) {
  if (bytes == 0) bytes = 1;
#if defined(FWD_CUDA_EMULATE)
  void* p = malloc(bytes);
  if (!p) fatal("out of memory");
  return p;
#else
  void* p = nullptr;
  if (cudaMalloc(&p, bytes) != cudaSuccess) fatal("cudaMalloc failed");
  return p;
#endif
}
void dev_free(void* p) {
#if defined(FWD_CUDA_EMULATE)
  free(p);
#else
  cudaFree(p);
#endif
}
void copy_to_dev(void* d, const void* h, size_t bytes) {
#if defined(FWD_CUDA_EMULATE)
  memcpy(d, h, bytes);
#else
  if (cudaMemcpy(d, h, bytes, cudaMemcpyHostToDevice) != cudaSuccess) fatal("cudaMemcpy H2D failed");
#endif
}
void copy_to_host(void* h, const void* d, size_t bytes) {
#if defined(FWD_CUDA_EMULATE)
  memcpy(h, d, bytes);
#else
  if (cudaDeviceSynchronize() != cudaSuccess) fatal("a kernel failed (cudaDeviceSynchronize)");
  if (cudaMemcpy(h, d, bytes, cudaMemcpyDeviceToHost) != cudaSuccess) fatal("cudaMemcpy D2H failed");
#endif
}

template <typename T>
struct Dev {
  T* p = nullptr;
  size_t n = 0;
  Dev() = default;
  explicit Dev(const std::vector<T>& h) : n(h.size()) {
    p = (T*)dev_alloc(n * sizeof(T));
    if (n) copy_to_dev(p, h.data(), n * sizeof(T));
  }
  explicit Dev(size_t count, T fill) : Dev(std::vector<T>(count, fill)) {}
  Dev(const Dev&) = delete;
  Dev& operator=(const Dev&) = delete;
  ~Dev() {
    if (p) dev_free(p);
  }
  std::vector<T> get() const {
    std::vector<T> h(n);
    if (n) copy_to_host(h.data(), p, n * sizeof(T));
    return h;
  }
};

float bf(uint16_t b) { return ref::bf16_to_f32(b); }
uint16_t to_bf(float f) { return ref::f32_to_bf16_rne(f); }

// max |got - want| <= atol + rtol * max |want| over the elements (NaN anywhere fails).
template <typename T>
bool close(const std::vector<T>& got, const std::vector<T>& want, double rtol, double atol, int dtype,
           std::string* why) {
  if (got.size() != want.size()) {
    *why = "size mismatch";
    return false;
  }
  auto val = [&](T v) -> double {
    if constexpr (sizeof(T) == 2) return (double)bf((uint16_t)v);
    (void)dtype;
    return (double)v;
  };
  double mref = 0, merr = 0;
  size_t worst = 0;
  for (size_t i = 0; i < want.size(); ++i) mref = std::max(mref, fabs(val(want[i])));
  for (size_t i = 0; i < want.size(); ++i) {
    const double e = fabs(val(got[i]) - val(want[i]));
    if (!(e <= merr) || e != e) {  // NaN propagates as a failure
      merr = e != e ? INFINITY : e;
      worst = i;
    }
  }
  const double lim = atol + rtol * mref;
  if (merr <= lim) return true;
  *why = strf("max |err| %.3g at %zu (got %.7g, want %.7g) > %.3g (max |ref| %.3g)", merr, worst,
              val(got[worst]), val(want[worst]), lim, mref);
  return false;
}

#define CHECK_CLOSE(got, want, rtol, atol, dtype)                          \
  do {                                                                     \
    std::string why_;                                                      \
    const bool ok_ = close((got), (want), (rtol), (atol), (dtype), &why_); \
    CHECK(ok_, "%s: %s", #got, why_.c_str());                              \
  } while (0)

// ---------------------------------------------------------------------------------------------------
// Philox words and perturbation values

void test_philox_words() {
  const struct {
    uint64_t seed;
    int64_t n, offset;
  } cases[] = {{0, 1, 0},
               {0x0123456789abcdefull, 1000, 5},
               {99, 70, ((int64_t)1 << 32) - 33},  // the counter's carry into its high word
               {7, 3, INT64_MAX - 3},               // the top of the counter range
               {(uint64_t)-424242, 3001, 12345}};
  for (const auto& c : cases) {
    g_context = "philox_words";
    std::vector<uint32_t> want((size_t)(4 * c.n));
    CHECK(fwd_philox_words(c.seed, c.n, c.offset, want.data(), 1) == FWD_OK, "%s", fwd_last_error());
    Dev<uint32_t> out((size_t)(4 * c.n), 0xCDCDCDCDu);
    const fwd_status st = fwd_cuda_philox_words(c.seed, c.n, c.offset, out.p, nullptr);
    CHECK(st == FWD_OK, "%s", fwd_last_error());
    const std::vector<uint32_t> got = out.get();
    int bad = 0;
    for (size_t i = 0; i < got.size(); ++i)
      CHECK_LIMITED(bad, got[i] == want[i], "seed %llu n %lld offset %lld word %zu: %08x != %08x",
                    (unsigned long long)c.seed, (long long)c.n, (long long)c.offset, i, got[i], want[i]);
  }
}

void test_perturb() {
  const struct {
    uint64_t seed;
    int64_t n, offset;
  } cases[] = {{1, 1, 0}, {42, 777, 3}, {(uint64_t)-5, 2049, ((int64_t)1 << 32) - 100}, {9, 5, INT64_MAX - 5}};
  for (const auto& c : cases)
    for (int dist : {FWD_DIST_RADEMACHER, FWD_DIST_NORMAL}) {
      const std::string ctx = strf("perturb seed %llu n %lld offset %lld dist %d", (unsigned long long)c.seed,
                                   (long long)c.n, (long long)c.offset, dist);
      g_context = ctx.c_str();
      // the real GPU's logf / cosf may differ from glibc's in the last bits: exact only for rademacher or
      // under emulation (same libm)
      const bool exact = kEmulated || dist == FWD_DIST_RADEMACHER;
      {
        std::vector<float> want((size_t)c.n);
        CHECK(fwd_perturb(c.seed, c.n, c.offset, dist, FWD_F32, want.data(), 1) == FWD_OK, "%s", fwd_last_error());
        Dev<float> out((size_t)c.n, 123.0f);
        CHECK(fwd_cuda_perturb(c.seed, c.n, c.offset, dist, FWD_F32, out.p, nullptr) == FWD_OK, "%s", fwd_last_error());
        const std::vector<float> got = out.get();
        int bad = 0;
        for (size_t i = 0; i < got.size(); ++i) {
          const bool ok = exact ? memcmp(&got[i], &want[i], 4) == 0
                                : fabsf(got[i] - want[i]) <= 4e-6f * std::max(1.0f, fabsf(want[i]));
          CHECK_LIMITED(bad, ok, "f32 element %zu: %.9g != %.9g", i, got[i], want[i]);
        }
      }
      {
        std::vector<uint16_t> want((size_t)c.n);
        CHECK(fwd_perturb(c.seed, c.n, c.offset, dist, FWD_BF16, want.data(), 1) == FWD_OK, "%s", fwd_last_error());
        Dev<uint16_t> out((size_t)c.n, 0);
        CHECK(fwd_cuda_perturb(c.seed, c.n, c.offset, dist, FWD_BF16, out.p, nullptr) == FWD_OK, "%s",
              fwd_last_error());
        const std::vector<uint16_t> got = out.get();
        int bad = 0;
        for (size_t i = 0; i < got.size(); ++i) {
          const bool ok = exact ? got[i] == want[i] : abs((int)got[i] - (int)want[i]) <= 1;  // one bf16 ulp
          CHECK_LIMITED(bad, ok, "bf16 element %zu: %04x != %04x", i, got[i], want[i]);
        }
      }
    }
}

void test_perturb_combine() {
  ref::Rng rng(11);
  const struct {
    int64_t n_seeds, n, offset;
  } cases[] = {{1, 1, 0}, {3, 1000, 17}, {300, 2500, ((int64_t)1 << 32) - 1000}, {5, 4097, 0}};
  for (const auto& c : cases)
    for (int dist : {FWD_DIST_RADEMACHER, FWD_DIST_NORMAL}) {
      const std::string ctx = strf("perturb_combine n_seeds %lld n %lld dist %d", (long long)c.n_seeds, (long long)c.n, dist);
      g_context = ctx.c_str();
      std::vector<uint64_t> seeds((size_t)c.n_seeds);
      std::vector<float> coefs((size_t)c.n_seeds), out0((size_t)c.n);
      for (auto& s : seeds) s = rng.next();
      for (size_t j = 0; j < coefs.size(); ++j) coefs[j] = j % 4 == 1 ? 0.0f : (float)rng.uniform(-1, 1);
      for (auto& v : out0) v = (float)rng.uniform(-2, 2);
      std::vector<float> want = out0;
      CHECK(fwd_perturb_combine(seeds.data(), coefs.data(), c.n_seeds, c.n, c.offset, dist, want.data(), 1) == FWD_OK,
            "%s", fwd_last_error());
      Dev<uint64_t> ds(seeds);
      Dev<float> dc(coefs), dout(out0);
      CHECK(fwd_cuda_perturb_combine(ds.p, dc.p, c.n_seeds, c.n, c.offset, dist, dout.p, nullptr) == FWD_OK, "%s",
            fwd_last_error());
      double scale = 2.0;
      for (float cf : coefs) scale += fabs(cf) * (dist == FWD_DIST_NORMAL ? 5.0 : 1.0);
      CHECK_CLOSE(dout.get(), want, 0.0, 1e-6 * scale, FWD_F32);
    }
}

// ---------------------------------------------------------------------------------------------------
// The dual LoRA linear

struct LoraCase {
  int64_t M, d_in, d_out, r, K;  // r = 0: no LoRA
  bool xdot;
  int bias;  // 0 none, 1 frozen, 2 trainable
  int expl;  // explicit tangents: 1 A_dot, 2 B_dot, 4 bias_dot
  int dist, in_dtype, out_dtype;
  int64_t pad;  // extra elements per row of x, W, A, B, y, y_dot (x_dot too)
};

template <typename T>
std::vector<T> rand_vec(size_t n, ref::Rng& rng, double lo = -1, double hi = 1) {
  std::vector<T> v(n);
  for (auto& e : v) {
    const float f = (float)rng.uniform(lo, hi);
    if constexpr (sizeof(T) == 2)
      e = to_bf(f);
    else
      e = f;
  }
  return v;
}

template <typename TI, typename TO>
void run_lora_case(const LoraCase& c, int idx) {
  const std::string ctx = strf("lora case %d: M %lld d_in %lld d_out %lld r %lld K %lld xdot %d bias %d expl %d dist %d "
                               "in %d out %d pad %lld",
                               idx, (long long)c.M, (long long)c.d_in, (long long)c.d_out, (long long)c.r,
                               (long long)c.K, c.xdot, c.bias, c.expl, c.dist, c.in_dtype, c.out_dtype, (long long)c.pad);
  g_context = ctx.c_str();
  ref::Rng rng(1000 + idx);
  const int64_t M = c.M, d_in = c.d_in, d_out = c.d_out, r = c.r, K = c.K, pad = c.pad;
  const int64_t ldx = d_in + pad, ldw = d_in + pad, lda = d_in + pad, ldb = r + pad, ldy = d_out + pad;
  const int64_t Kt = std::max<int64_t>(K, 0);
  std::vector<TI> x = rand_vec<TI>((size_t)(M * ldx), rng), W = rand_vec<TI>((size_t)(d_out * ldw), rng);
  std::vector<TI> xd = rand_vec<TI>((size_t)(Kt * M * ldx), rng), bias = rand_vec<TI>((size_t)d_out, rng);
  std::vector<TI> A = rand_vec<TI>((size_t)(r * lda), rng), B = rand_vec<TI>((size_t)(d_out * ldb), rng);
  std::vector<TI> Ad = rand_vec<TI>((size_t)(Kt * r * d_in), rng), Bd = rand_vec<TI>((size_t)(Kt * d_out * r), rng);
  std::vector<TI> bd = rand_vec<TI>((size_t)(Kt * d_out), rng);
  std::vector<int64_t> seeds((size_t)Kt);
  for (auto& s : seeds) s = (int64_t)rng.next();

  fwd_lora_dual_args a;
  memset(&a, 0, sizeof a);
  a.M = M; a.d_in = d_in; a.d_out = d_out; a.r = r; a.K = K;
  a.in_dtype = c.in_dtype; a.out_dtype = c.out_dtype;
  a.ldx = ldx; a.ldx_dot = ldx; a.ldw = ldw; a.lda = lda; a.ldb = ldb; a.ldy = ldy; a.ldy_dot = ldy;
  a.scaling = 0.75f;
  a.offset_A = 3; a.offset_B = 3 + r * d_in + 11; a.offset_bias = c.bias == 2 ? 5 : -1;
  a.dist = c.dist;
  a.num_threads = 1;
  const bool lora = r > 0, tang = K > 0;
  // host (CPU reference) and device argument sets
  fwd_lora_dual_args h = a, d = a;
  h.x = x.data(); h.W = W.data();
  h.x_dot = tang && c.xdot ? xd.data() : nullptr;
  h.bias = c.bias ? bias.data() : nullptr;
  h.A = lora ? A.data() : nullptr; h.B = lora ? B.data() : nullptr;
  h.A_dot = tang && lora && (c.expl & 1) ? Ad.data() : nullptr;
  h.B_dot = tang && lora && (c.expl & 2) ? Bd.data() : nullptr;
  h.bias_dot = tang && c.bias == 2 && (c.expl & 4) ? bd.data() : nullptr;
  if (h.bias_dot) h.offset_bias = -1;
  h.seeds = tang ? seeds.data() : nullptr;
  std::vector<TO> y_ref((size_t)(M * ldy), TO(0)), yd_ref((size_t)(Kt * M * ldy), TO(0));
  h.y = y_ref.data(); h.y_dot = tang ? yd_ref.data() : nullptr;
  d.offset_bias = h.offset_bias;
  CHECK(fwd_lora_linear_dual(&h) == FWD_OK, "CPU reference: %s", fwd_last_error());

  Dev<TI> dx(x), dW(W), dxd(xd), dbias(bias), dA(A), dB(B), dAd(Ad), dBd(Bd), dbd(bd);
  Dev<int64_t> dseeds(seeds);
  // outputs pre-filled with a sentinel: the padding must survive
  const TO sentinel = sizeof(TO) == 2 ? TO(0x7f7f) : TO(-777.0f);
  Dev<TO> dy((size_t)(M * ldy), sentinel), dyd((size_t)(Kt * M * ldy), sentinel);
  d.x = dx.p; d.W = dW.p;
  d.x_dot = h.x_dot ? dxd.p : nullptr;
  d.bias = h.bias ? dbias.p : nullptr;
  d.A = h.A ? dA.p : nullptr; d.B = h.B ? dB.p : nullptr;
  d.A_dot = h.A_dot ? dAd.p : nullptr; d.B_dot = h.B_dot ? dBd.p : nullptr; d.bias_dot = h.bias_dot ? dbd.p : nullptr;
  d.seeds = tang ? dseeds.p : nullptr;
  d.y = dy.p; d.y_dot = tang ? dyd.p : nullptr;
  // both entry points: internal stream-ordered workspace, and the caller's workspace
  for (int variant = 0; variant < 2; ++variant) {
    fwd_status st;
    if (variant == 0) {
      st = fwd_cuda_lora_linear_dual(&d, nullptr);
    } else {
      const size_t wb = fwd_cuda_lora_dual_workspace_bytes(&d);
      CHECK(wb == (lora ? (size_t)((Kt + 1) * M * r) * sizeof(float) : 0), "workspace bytes %zu", wb);
      Dev<float> ws(wb / sizeof(float), NAN);
      st = fwd_cuda_lora_linear_dual_ws(&d, wb ? ws.p : nullptr, wb, nullptr);
    }
    CHECK(st == FWD_OK, "variant %d: %s", variant, fwd_last_error());
    std::vector<TO> y = dy.get(), yd = dyd.get();
    // compare the rows; the padding must hold the sentinel
    std::vector<TO> yv, yv_ref, ydv, ydv_ref;
    int bad = 0;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = 0; j < ldy; ++j) {
        const size_t i = (size_t)(m * ldy + j);
        if (j < d_out) {
          yv.push_back(y[i]);
          yv_ref.push_back(y_ref[i]);
        } else {
          CHECK_LIMITED(bad, memcmp(&y[i], &sentinel, sizeof(TO)) == 0, "y padding overwritten at row %lld", (long long)m);
        }
      }
    for (int64_t m = 0; m < Kt * M; ++m)
      for (int64_t j = 0; j < ldy; ++j) {
        const size_t i = (size_t)(m * ldy + j);
        if (j < d_out) {
          ydv.push_back(yd[i]);
          ydv_ref.push_back(yd_ref[i]);
        } else {
          CHECK_LIMITED(bad, memcmp(&yd[i], &sentinel, sizeof(TO)) == 0, "y_dot padding overwritten at row %lld",
                        (long long)m);
        }
      }
    // float32 outputs: accumulation order only (rel. to the largest value); bfloat16 outputs may round
    // the slightly different float32 sums to neighbouring bf16 values, and bf16 inputs give large values
    const double rtol = sizeof(TO) == 2 ? 1e-2 : 2e-5;
    CHECK_CLOSE(yv, yv_ref, rtol, 1e-6, c.out_dtype);
    CHECK_CLOSE(ydv, ydv_ref, rtol, 1e-6, c.out_dtype);
  }
}

void test_lora() {
  const int R = FWD_DIST_RADEMACHER, N = FWD_DIST_NORMAL, F = FWD_F32, H = FWD_BF16;
  const LoraCase cases[] = {
      {1, 19, 23, 1, 1, true, 2, 0, N, F, F, 0},
      {7, 45, 70, 3, 2, true, 2, 0, R, F, F, 0},
      {7, 45, 70, 3, 2, false, 1, 0, N, F, F, 3},
      {33, 70, 19, 8, 5, true, 0, 0, N, F, F, 0},
      {65, 33, 130, 4, 3, true, 2, 0, N, F, F, 1},   // crosses the 64-row and 64-column tiles
      {130, 17, 65, 20, 2, true, 1, 0, R, F, F, 0},  // r > 16: two rank tiles in the down projection
      {9, 21, 31, 5, 3, true, 2, 7, N, F, F, 0},     // explicit A_dot, B_dot, bias_dot
      {9, 21, 31, 5, 3, false, 2, 1, N, F, F, 0},    // explicit A_dot only
      {9, 21, 31, 5, 3, true, 2, 6, R, F, F, 2},     // explicit B_dot, bias_dot
      {12, 40, 24, 0, 3, true, 2, 0, N, F, F, 0},    // no LoRA: a frozen linear with a BitFit bias
      {12, 40, 24, 0, 2, false, 0, 0, N, F, F, 0},   // no LoRA, no x_dot, no bias: zero tangents
      {10, 30, 20, 4, 0, false, 1, 0, N, F, F, 1},   // K = 0: the primal only
      {17, 37, 29, 6, 3, true, 2, 0, N, H, H, 0},    // bfloat16
      {17, 37, 29, 6, 3, true, 2, 3, R, H, F, 2},    // bfloat16 in, float32 out
      {17, 37, 29, 6, 3, true, 1, 0, N, F, H, 0},    // float32 in, bfloat16 out
  };
  int idx = 0;
  for (const LoraCase& c : cases) {
    if (c.in_dtype == F && c.out_dtype == F) run_lora_case<float, float>(c, idx);
    if (c.in_dtype == H && c.out_dtype == H) run_lora_case<uint16_t, uint16_t>(c, idx);
    if (c.in_dtype == H && c.out_dtype == F) run_lora_case<uint16_t, float>(c, idx);
    if (c.in_dtype == F && c.out_dtype == H) run_lora_case<float, uint16_t>(c, idx);
    ++idx;
  }
}

// ---------------------------------------------------------------------------------------------------
// The dual attention

struct AttnCase {
  int64_t B, H, Hkv, L, S, D, K;
  const char* tangents;  // subset of "qkv"
  bool causal;
  int mask;  // 0 none, 1 padding (B, 1, 1, S) with -inf keys, 2 full (B, H, L, S) additive with a masked row
  int dtype;
};

template <typename T>
void run_attn_case(const AttnCase& c, int idx) {
  const std::string ctx = strf("attention case %d: B %lld H %lld Hkv %lld L %lld S %lld D %lld K %lld tangents '%s' "
                               "causal %d mask %d dtype %d",
                               idx, (long long)c.B, (long long)c.H, (long long)c.Hkv, (long long)c.L, (long long)c.S,
                               (long long)c.D, (long long)c.K, c.tangents, c.causal, c.mask, c.dtype);
  g_context = ctx.c_str();
  ref::Rng rng(5000 + idx);
  const size_t nq = (size_t)(c.B * c.H * c.L * c.D), nkv = (size_t)(c.B * c.Hkv * c.S * c.D);
  const size_t K = (size_t)c.K;
  std::vector<T> q = rand_vec<T>(nq, rng, -2, 2), k = rand_vec<T>(nkv, rng, -2, 2), v = rand_vec<T>(nkv, rng);
  std::vector<T> qd = rand_vec<T>(K * nq, rng), kd = rand_vec<T>(K * nkv, rng), vd = rand_vec<T>(K * nkv, rng);
  const bool has_q = strchr(c.tangents, 'q') != nullptr, has_k = strchr(c.tangents, 'k') != nullptr,
             has_v = strchr(c.tangents, 'v') != nullptr;
  std::vector<float> mask;
  int64_t ms[4] = {0, 0, 0, 0};
  if (c.mask == 1) {  // batch b masks its last b + 1 keys (all of them when S is small)
    mask.assign((size_t)(c.B * c.S), 0.0f);
    for (int64_t b = 0; b < c.B; ++b)
      for (int64_t j = std::max<int64_t>(0, c.S - b - 1); j < c.S; ++j) mask[(size_t)(b * c.S + j)] = -INFINITY;
    ms[0] = c.S;
    ms[3] = 1;
  } else if (c.mask == 2) {
    mask.resize((size_t)(c.B * c.H * c.L * c.S));
    for (auto& m : mask) m = (float)rng.uniform(-1, 1);
    for (int64_t j = 0; j < c.S; ++j) mask[(size_t)j] = -INFINITY;  // row (0, 0, 0): every key masked
    ms[0] = c.H * c.L * c.S;
    ms[1] = c.L * c.S;
    ms[2] = c.S;
    ms[3] = 1;
  }
  fwd_attention_dual_args a;
  memset(&a, 0, sizeof a);
  a.B = c.B; a.H = c.H; a.Hkv = c.Hkv; a.L = c.L; a.S = c.S; a.D = c.D; a.K = c.K;
  a.dtype = c.dtype;
  a.causal = c.causal;
  a.scale = 1.0f / sqrtf((float)c.D);
  a.num_threads = 1;
  for (int i = 0; i < 4; ++i) a.mask_stride[i] = ms[i];
  fwd_attention_dual_args h = a, d = a;
  std::vector<T> o_ref(nq), od_ref(K * nq);
  h.q = q.data(); h.k = k.data(); h.v = v.data();
  h.q_dot = K && has_q ? qd.data() : nullptr;
  h.k_dot = K && has_k ? kd.data() : nullptr;
  h.v_dot = K && has_v ? vd.data() : nullptr;
  h.mask = c.mask ? mask.data() : nullptr;
  h.o = o_ref.data();
  h.o_dot = K ? od_ref.data() : nullptr;
  CHECK(fwd_attention_dual(&h) == FWD_OK, "CPU reference: %s", fwd_last_error());

  Dev<T> dq(q), dk(k), dv(v), dqd(qd), dkd(kd), dvd(vd);
  Dev<float> dmask(mask);
  const T sentinel = sizeof(T) == 2 ? T(0x7f7f) : T(-777.0f);
  Dev<T> dout(nq, sentinel), dod(K * nq, sentinel);
  d.q = dq.p; d.k = dk.p; d.v = dv.p;
  d.q_dot = h.q_dot ? dqd.p : nullptr;
  d.k_dot = h.k_dot ? dkd.p : nullptr;
  d.v_dot = h.v_dot ? dvd.p : nullptr;
  d.mask = c.mask ? dmask.p : nullptr;
  d.o = dout.p;
  d.o_dot = K ? dod.p : nullptr;
  CHECK(fwd_cuda_attention_dual(&d, nullptr) == FWD_OK, "%s", fwd_last_error());
  const double rtol = sizeof(T) == 2 ? 1.5e-2 : 5e-5;
  CHECK_CLOSE(dout.get(), o_ref, rtol, 1e-6, c.dtype);
  if (K) CHECK_CLOSE(dod.get(), od_ref, rtol, 1e-6, c.dtype);
}

void test_attention() {
  const int F = FWD_F32, H = FWD_BF16;
  const AttnCase cases[] = {
      {1, 1, 1, 1, 1, 1, 1, "qkv", false, 0, F},
      {2, 4, 2, 5, 7, 3, 2, "qkv", false, 0, F},    // grouped-query attention
      {1, 2, 1, 33, 17, 40, 3, "qkv", false, 1, F},  // D <= 64 tiles, 3 query blocks, padding mask
      {1, 1, 1, 9, 70, 100, 5, "qkv", false, 0, F},  // D <= 128 tiles, 5 key blocks, 2 stream chunks
      {1, 2, 2, 5, 9, 200, 2, "qk", false, 2, F},    // D <= 256 tiles, full additive mask, a masked row
      {2, 2, 1, 40, 40, 32, 9, "qkv", true, 0, F},   // causal, D <= 32 tiles, 3 stream chunks
      {1, 1, 1, 12, 5, 16, 2, "qkv", true, 0, F},    // causal with L > S: the first rows see no key
      {1, 3, 3, 6, 11, 8, 3, "q", true, 1, F},
      {1, 3, 3, 6, 11, 8, 3, "k", false, 2, F},
      {1, 3, 3, 6, 11, 8, 3, "v", false, 0, F},
      {1, 3, 3, 6, 11, 8, 3, "", false, 0, F},        // K > 0 but no tangent: o_dot = 0
      {2, 2, 2, 7, 13, 24, 0, "", true, 1, F},       // K = 0: the primal only
      {2, 4, 2, 19, 23, 64, 3, "qkv", true, 1, H},   // bfloat16
      {1, 2, 1, 5, 37, 130, 2, "qkv", false, 2, H},
  };
  int idx = 0;
  for (const AttnCase& c : cases) {
    if (c.dtype == F)
      run_attn_case<float>(c, idx);
    else
      run_attn_case<uint16_t>(c, idx);
    ++idx;
  }
}

// ---------------------------------------------------------------------------------------------------
// Errors: the code, a "<function>: ..." message naming the problem, and nothing written.

#define EXPECT_ERR(call, want, fn, keyword)                                                                    \
  do {                                                                                                         \
    const fwd_status st_ = (call);                                                                             \
    CHECK(st_ == (want), "%s returned %d, want %d (%s); message: '%s'", #call, (int)st_, (int)(want), #want, \
          fwd_last_error());                                                                                   \
    const std::string msg_ = fwd_last_error() ? fwd_last_error() : "";                                         \
    CHECK(msg_.rfind(fn, 0) == 0, "%s: message '%s' does not start with '%s'", #call, msg_.c_str(), fn);      \
    CHECK(msg_.find(keyword) != std::string::npos, "%s: message '%s' does not mention '%s'", #call,            \
          msg_.c_str(), keyword);                                                                              \
  } while (0)

void test_errors() {
  g_context = "errors";
  Dev<uint32_t> w(16, 0xCDCDCDCDu);
  Dev<float> f(16, 9.0f);
  Dev<uint64_t> s(4, 1);
  const char* fn = "fwd_cuda_philox_words";
  EXPECT_ERR(fwd_cuda_philox_words(1, 0, 0, w.p, nullptr), FWD_ERR_SIZE, fn, "n must be positive");
  EXPECT_ERR(fwd_cuda_philox_words(1, 2, -1, w.p, nullptr), FWD_ERR_SIZE, fn, "offset");
  EXPECT_ERR(fwd_cuda_philox_words(1, 3, INT64_MAX - 1, w.p, nullptr), FWD_ERR_SIZE, fn, "counter range");
  EXPECT_ERR(fwd_cuda_philox_words(1, 2, 0, nullptr, nullptr), FWD_ERR_NULL, fn, "out");
  for (uint32_t v : w.get()) CHECK(v == 0xCDCDCDCDu, "a failing fwd_cuda_philox_words wrote its output");
  fn = "fwd_cuda_perturb";
  EXPECT_ERR(fwd_cuda_perturb(1, -1, 0, FWD_DIST_NORMAL, FWD_F32, f.p, nullptr), FWD_ERR_SIZE, fn, "n must be positive");
  EXPECT_ERR(fwd_cuda_perturb(1, 4, 0, 2, FWD_F32, f.p, nullptr), FWD_ERR_ARG, fn, "dist");
  EXPECT_ERR(fwd_cuda_perturb(1, 4, 0, FWD_DIST_NORMAL, 7, f.p, nullptr), FWD_ERR_ARG, fn, "out_dtype");
  EXPECT_ERR(fwd_cuda_perturb(1, 4, 0, FWD_DIST_NORMAL, FWD_F32, nullptr, nullptr), FWD_ERR_NULL, fn, "out");
  fn = "fwd_cuda_perturb_combine";
  EXPECT_ERR(fwd_cuda_perturb_combine(s.p, f.p, 0, 4, 0, 0, f.p, nullptr), FWD_ERR_SIZE, fn, "n_seeds");
  EXPECT_ERR(fwd_cuda_perturb_combine(s.p, f.p, 2, 0, 0, 0, f.p, nullptr), FWD_ERR_SIZE, fn, "n must be positive");
  EXPECT_ERR(fwd_cuda_perturb_combine(nullptr, f.p, 2, 4, 0, 0, f.p, nullptr), FWD_ERR_NULL, fn, "seeds");
  EXPECT_ERR(fwd_cuda_perturb_combine(s.p, nullptr, 2, 4, 0, 0, f.p, nullptr), FWD_ERR_NULL, fn, "coefs");
  EXPECT_ERR(fwd_cuda_perturb_combine(s.p, f.p, 2, 4, 0, 5, f.p, nullptr), FWD_ERR_ARG, fn, "dist");
  for (float v : f.get()) CHECK(v == 9.0f, "a failing call wrote its output");

  // the dual LoRA linear
  Dev<float> x(64, 1.0f), W(64, 1.0f), y(64, 5.0f), yd(128, 5.0f), A(64, 1.0f), B(64, 1.0f), ws(64, 0.0f);
  Dev<int64_t> seeds(2, 3);
  fwd_lora_dual_args a;
  memset(&a, 0, sizeof a);
  a.M = 2; a.d_in = 4; a.d_out = 3; a.r = 2; a.K = 2;
  a.x = x.p; a.ldx = 4; a.W = W.p; a.ldw = 4; a.A = A.p; a.lda = 4; a.B = B.p; a.ldb = 2;
  a.scaling = 1.0f; a.seeds = seeds.p; a.offset_bias = -1;
  a.y = y.p; a.ldy = 3; a.y_dot = yd.p; a.ldy_dot = 3;
  fn = "fwd_cuda_lora_linear_dual";
  EXPECT_ERR(fwd_cuda_lora_linear_dual(nullptr, nullptr), FWD_ERR_NULL, fn, "args");
  fwd_lora_dual_args b = a;
  b.M = 0;
  EXPECT_ERR(fwd_cuda_lora_linear_dual(&b, nullptr), FWD_ERR_SIZE, fn, "M must be positive");
  b = a;
  b.K = -1;
  EXPECT_ERR(fwd_cuda_lora_linear_dual(&b, nullptr), FWD_ERR_SIZE, fn, "K");
  b = a;
  b.in_dtype = 5;
  EXPECT_ERR(fwd_cuda_lora_linear_dual(&b, nullptr), FWD_ERR_ARG, fn, "in_dtype");
  b = a;
  b.dist = 9;
  EXPECT_ERR(fwd_cuda_lora_linear_dual(&b, nullptr), FWD_ERR_ARG, fn, "dist");
  b = a;
  b.W = nullptr;
  EXPECT_ERR(fwd_cuda_lora_linear_dual(&b, nullptr), FWD_ERR_NULL, fn, "W is NULL");
  b = a;
  b.B = nullptr;
  EXPECT_ERR(fwd_cuda_lora_linear_dual(&b, nullptr), FWD_ERR_NULL, fn, "lora_A and lora_B");
  b = a;
  b.ldx = 3;
  EXPECT_ERR(fwd_cuda_lora_linear_dual(&b, nullptr), FWD_ERR_SIZE, fn, "ldx");
  b = a;
  b.seeds = nullptr;
  EXPECT_ERR(fwd_cuda_lora_linear_dual(&b, nullptr), FWD_ERR_NULL, fn, "seeds");
  b = a;
  b.offset_bias = 0;  // trainable bias without a bias
  EXPECT_ERR(fwd_cuda_lora_linear_dual(&b, nullptr), FWD_ERR_ARG, fn, "bias");
  b = a;
  b.scaling = INFINITY;
  EXPECT_ERR(fwd_cuda_lora_linear_dual(&b, nullptr), FWD_ERR_ARG, fn, "scaling");
  EXPECT_ERR(fwd_cuda_lora_linear_dual_ws(&a, ws.p, 4, nullptr), FWD_ERR_SIZE, "fwd_cuda_lora_linear_dual_ws",
             "workspace_bytes");
  EXPECT_ERR(fwd_cuda_lora_linear_dual_ws(&a, nullptr, 1024, nullptr), FWD_ERR_NULL, "fwd_cuda_lora_linear_dual_ws",
             "workspace");
  CHECK(fwd_cuda_lora_dual_workspace_bytes(nullptr) == 0, "NULL args");
  for (float v : y.get()) CHECK(v == 5.0f, "a failing fwd_cuda_lora_linear_dual wrote y");
  for (float v : yd.get()) CHECK(v == 5.0f, "a failing fwd_cuda_lora_linear_dual wrote y_dot");

  // the dual attention
  Dev<float> big(2 * 300 * 4, 1.0f), o(2 * 300 * 4, 5.0f);
  fwd_attention_dual_args t;
  memset(&t, 0, sizeof t);
  t.B = 1; t.H = 1; t.Hkv = 1; t.L = 2; t.S = 2; t.D = 4; t.K = 1;
  t.q = t.k = t.v = big.p;
  t.o = o.p; t.o_dot = o.p;
  t.scale = 0.5f;
  fn = "fwd_cuda_attention_dual";
  EXPECT_ERR(fwd_cuda_attention_dual(nullptr, nullptr), FWD_ERR_NULL, fn, "args");
  fwd_attention_dual_args u = t;
  u.L = 0;
  EXPECT_ERR(fwd_cuda_attention_dual(&u, nullptr), FWD_ERR_SIZE, fn, "L must be positive");
  u = t;
  u.H = 3; u.Hkv = 2;
  EXPECT_ERR(fwd_cuda_attention_dual(&u, nullptr), FWD_ERR_SIZE, fn, "multiple of Hkv");
  u = t;
  u.dtype = 3;
  EXPECT_ERR(fwd_cuda_attention_dual(&u, nullptr), FWD_ERR_ARG, fn, "dtype");
  u = t;
  u.o_dot = nullptr;
  EXPECT_ERR(fwd_cuda_attention_dual(&u, nullptr), FWD_ERR_NULL, fn, "o_dot");
  u = t;
  u.K = 0;
  u.q_dot = big.p;
  EXPECT_ERR(fwd_cuda_attention_dual(&u, nullptr), FWD_ERR_ARG, fn, "q_dot");
  u = t;
  u.scale = NAN;
  EXPECT_ERR(fwd_cuda_attention_dual(&u, nullptr), FWD_ERR_ARG, fn, "scale");
  u = t;
  u.mask = big.p;
  u.mask_stride[2] = -1;
  EXPECT_ERR(fwd_cuda_attention_dual(&u, nullptr), FWD_ERR_SIZE, fn, "mask_stride");
  u = t;
  u.D = 300;
  EXPECT_ERR(fwd_cuda_attention_dual(&u, nullptr), FWD_ERR_ARG, fn, "D <= 256");
  CHECK(fwd_cuda_attention_max_head_dim() == 256, "max head dim");
  for (float v : o.get()) CHECK(v == 5.0f, "a failing fwd_cuda_attention_dual wrote its output");

#if !defined(FWD_CUDA_EMULATE)
  // host memory where device memory is required (unless the device reads pageable memory)
  int dev = 0, pageable = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&pageable, cudaDevAttrPageableMemoryAccess, dev);
  if (!pageable) {
    std::vector<float> host(16);
    EXPECT_ERR(fwd_cuda_perturb(1, 4, 0, FWD_DIST_NORMAL, FWD_F32, host.data(), nullptr), FWD_ERR_ARG,
               "fwd_cuda_perturb", "not device memory");
  }
#endif
}

#if defined(FWD_CUDA_EMULATE)
// The emulator itself: barriers order the threads of a block, and a divergent barrier is an error.
void test_emulator() {
  g_context = "emulator";
  std::vector<int> out(64, -1);
  simt::launch(dim3(2), dim3(32), [&] {
    static int stage[32];
    stage[threadIdx.x] = (int)(blockIdx.x * 100 + threadIdx.x);
    __syncthreads();
    out[blockIdx.x * 32 + threadIdx.x] = stage[31 - threadIdx.x];  // another thread's write, before the barrier
  });
  for (int b = 0; b < 2; ++b)
    for (int t = 0; t < 32; ++t) CHECK(out[(size_t)(b * 32 + t)] == b * 100 + 31 - t, "barrier order");
  bool threw = false;
  try {
    simt::launch(dim3(1), dim3(4), [&] {
      if (threadIdx.x == 0) return;
      __syncthreads();
    });
  } catch (const simt::Error&) {
    threw = true;
  }
  CHECK(threw, "a divergent __syncthreads() was not reported");
}
#endif

}  // namespace

int main() {
#if !defined(FWD_CUDA_EMULATE)
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    printf("test_cuda_device: no usable CUDA device; skipped\n");
    return 77;
  }
#else
  test_emulator();
#endif
  test_philox_words();
  test_perturb();
  test_perturb_combine();
  test_lora();
  test_attention();
  test_errors();
  return test_summary(kEmulated ? "test_cuda_emu" : "test_cuda_device");
}
