// torch bindings of the core: thin wrappers that check tensors and call the C API.
// The public ops (torch.ops.fwdkernels.*) are declared in Python (fwdkernels/*.py) with their fake
// kernels; these functions are the "cpp" backend they dispatch to.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "../core/fwdcore.h"

namespace {

void check_status(fwd_status st) {
  TORCH_CHECK(st == FWD_OK, fwd_last_error());
}

int dtype_code(const at::Tensor& t, const char* name) {
  if (t.scalar_type() == at::kFloat) return FWD_F32;
  if (t.scalar_type() == at::kBFloat16) return FWD_BF16;
  TORCH_CHECK(false, name, " must be float32 or bfloat16, got ", t.scalar_type());
  return -1;
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor for the cpp backend, got ", t.device());
}

// Rows must be contiguous with a row stride of at least the row length (it becomes the leading
// dimension); anything else (broadcast rows with stride 0, transposed views) is copied first.
at::Tensor rows2d(const at::Tensor& t, const char* name) {
  check_cpu(t, name);
  TORCH_CHECK(t.dim() == 2, name, " must be 2-D, got ", t.dim(), " dimensions");
  if (t.stride(1) == 1 && t.stride(0) >= t.size(1)) return t;
  at::Tensor u = t.contiguous();
  if (u.size(0) <= 1 && u.stride(0) < u.size(1)) u = u.clone(at::MemoryFormat::Contiguous).as_strided(u.sizes(), {u.size(1), 1});
  return u;
}

at::Tensor philox_words(int64_t seed, int64_t n, int64_t offset) {
  TORCH_CHECK(n > 0, "numel must be positive, got ", n);
  TORCH_CHECK(offset >= 0, "offset must be non-negative, got ", offset);
  auto tmp = at::empty({n, 4}, at::TensorOptions().dtype(at::kInt));
  check_status(fwd_philox_words((uint64_t)seed, n, offset, (uint32_t*)tmp.data_ptr<int32_t>(), at::get_num_threads()));
  return tmp.to(at::kLong).bitwise_and(0xffffffffLL);
}

at::Tensor perturb(int64_t seed, int64_t n, int64_t offset, int64_t dist, at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "cpp perturb produces float32 or bfloat16, got ", dtype);
  auto out = at::empty({n}, at::TensorOptions().dtype(dtype));
  check_status(fwd_perturb((uint64_t)seed, n, offset, (int)dist, dtype == at::kFloat ? FWD_F32 : FWD_BF16,
                           out.data_ptr(), at::get_num_threads()));
  return out;
}

// out (n,) float32 contiguous, updated in place; seeds (N,) int64, coefs (N,) float32.
void perturb_combine(const at::Tensor& seeds, const at::Tensor& coefs, int64_t offset, int64_t dist, at::Tensor& out) {
  TORCH_CHECK(seeds.dtype() == at::kLong && seeds.dim() == 1 && seeds.is_contiguous(), "seeds must be a contiguous 1-D int64 tensor");
  TORCH_CHECK(coefs.dtype() == at::kFloat && coefs.dim() == 1 && coefs.is_contiguous() && coefs.numel() == seeds.numel(),
              "coefs must be a contiguous 1-D float32 tensor with one value per seed");
  TORCH_CHECK(out.dtype() == at::kFloat && out.dim() == 1 && out.is_contiguous() && out.device().is_cpu(),
              "out must be a contiguous 1-D float32 CPU tensor");
  if (seeds.numel() == 0 || out.numel() == 0) return;
  check_status(fwd_perturb_combine((const uint64_t*)seeds.data_ptr<int64_t>(), coefs.data_ptr<float>(), seeds.numel(),
                                   out.numel(), offset, (int)dist, out.data_ptr<float>(), at::get_num_threads()));
}

std::tuple<at::Tensor, at::Tensor> lora_linear_dual(
    const at::Tensor& x, const c10::optional<at::Tensor>& x_dot, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& lora_A,
    const c10::optional<at::Tensor>& lora_B, double scaling, const c10::optional<at::Tensor>& seeds, int64_t K,
    int64_t offset_A, int64_t offset_B, int64_t offset_bias, int64_t dist, const c10::optional<at::Tensor>& A_dot,
    const c10::optional<at::Tensor>& B_dot, const c10::optional<at::Tensor>& bias_dot, bool primal) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2, "x must be (M, d_in) and weight (d_out, d_in)");
  TORCH_CHECK(primal || K > 0, "the tangents only (primal=False) needs K > 0");
  const int64_t M = x.size(0), d_in = x.size(1), d_out = weight.size(0);
  const int in_dt = dtype_code(x, "x");
  at::Tensor xs = rows2d(x, "x"), ws = rows2d(weight, "weight");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "weight dtype ", weight.scalar_type(), " != x dtype ", x.scalar_type());
  fwd_lora_dual_args a;
  memset(&a, 0, sizeof(a));
  a.M = M; a.d_in = d_in; a.d_out = d_out; a.K = K;
  a.in_dtype = in_dt; a.out_dtype = in_dt;
  a.x = xs.data_ptr(); a.ldx = xs.stride(0);
  a.W = ws.data_ptr(); a.ldw = ws.stride(0);
  at::Tensor xds, bs, As, Bs, Ads, Bds, bds, ss;
  if (x_dot) {
    TORCH_CHECK(x_dot->dim() == 3 && x_dot->size(0) == K && x_dot->size(1) == M && x_dot->size(2) == d_in,
                "x_dot must be (K, M, d_in)");
    xds = x_dot->contiguous();  // rows addressed as (k*M + m) * ld
    check_cpu(xds, "x_dot");
    a.x_dot = xds.data_ptr(); a.ldx_dot = d_in;
  }
  if (bias) { bs = bias->contiguous(); check_cpu(bs, "bias"); a.bias = bs.data_ptr(); }
  if (lora_A) {
    As = rows2d(*lora_A, "lora_A"); Bs = rows2d(*lora_B, "lora_B");
    a.A = As.data_ptr(); a.lda = As.stride(0); a.r = As.size(0);
    a.B = Bs.data_ptr(); a.ldb = Bs.stride(0);
  }
  if (A_dot) { Ads = A_dot->contiguous(); check_cpu(Ads, "A_dot"); a.A_dot = Ads.data_ptr(); }
  if (B_dot) { Bds = B_dot->contiguous(); check_cpu(Bds, "B_dot"); a.B_dot = Bds.data_ptr(); }
  if (bias_dot) { bds = bias_dot->contiguous(); check_cpu(bds, "bias_dot"); a.bias_dot = bds.data_ptr(); }
  if (seeds) { ss = seeds->contiguous(); check_cpu(ss, "seeds"); a.seeds = ss.data_ptr<int64_t>(); }
  a.scaling = (float)scaling;
  a.offset_A = offset_A; a.offset_B = offset_B; a.offset_bias = offset_bias;
  a.dist = (int)dist;
  auto y = at::empty({primal ? M : 0, d_out}, x.options());  // (0, d_out): the primal was not asked for
  auto y_dot = at::empty({K, M, d_out}, x.options());
  a.y = primal ? y.data_ptr() : nullptr; a.ldy = d_out;
  a.y_dot = y_dot.data_ptr(); a.ldy_dot = d_out;
  a.num_threads = at::get_num_threads();
  check_status(fwd_lora_linear_dual(&a));
  return {y, y_dot};
}

// The fused dual attention (fwd_attention_dual). Inputs are made contiguous; the mask (bool: True =
// attend, or additive float) becomes an additive float32 mask broadcast to (B, H, L, S) through strides
// (no copy of broadcast dimensions). K = 0 computes the primal only (o_dot is then (0, B, H, L, D)).
std::tuple<at::Tensor, at::Tensor> attention_dual(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& q_dot,
    const c10::optional<at::Tensor>& k_dot, const c10::optional<at::Tensor>& v_dot,
    const c10::optional<at::Tensor>& attn_mask, bool causal, double scale, int64_t K) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "attention_dual: q must be (B, H, L, D) and k, v (B, Hkv, S, D)");
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3), Hkv = k.size(1), S = k.size(2);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == B && k.size(3) == D, "attention_dual: k and v must be (B, Hkv, S, D) = (",
              B, ", Hkv, S, ", D, "), got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, "attention_dual: H (", H, ") must be a multiple of Hkv (", Hkv, ")");
  TORCH_CHECK(K >= 0, "attention_dual: K must be non-negative, got ", K);
  const int dt = dtype_code(q, "q");
  const std::vector<int64_t> qshape{K, B, H, L, D}, kvshape{K, B, Hkv, S, D};
  fwd_attention_dual_args a;
  memset(&a, 0, sizeof(a));
  a.B = B; a.H = H; a.Hkv = Hkv; a.L = L; a.S = S; a.D = D; a.K = K;
  a.dtype = dt;
  auto prep = [&](const at::Tensor& t, const char* name) {
    check_cpu(t, name);
    TORCH_CHECK(t.scalar_type() == q.scalar_type(), "attention_dual: ", name, " dtype ", t.scalar_type(), " != q dtype ",
                q.scalar_type());
    return t.contiguous();
  };
  at::Tensor qs = prep(q, "q"), ks = prep(k, "k"), vs = prep(v, "v"), qds, kds, vds, ms;
  a.q = qs.data_ptr(); a.k = ks.data_ptr(); a.v = vs.data_ptr();
  if (q_dot) {
    TORCH_CHECK(q_dot->sizes() == at::IntArrayRef(qshape), "attention_dual: q_dot must be ", at::IntArrayRef(qshape),
                ", got ", q_dot->sizes());
    qds = prep(*q_dot, "q_dot"); a.q_dot = qds.data_ptr();
  }
  if (k_dot) {
    TORCH_CHECK(k_dot->sizes() == at::IntArrayRef(kvshape), "attention_dual: k_dot must be ", at::IntArrayRef(kvshape),
                ", got ", k_dot->sizes());
    kds = prep(*k_dot, "k_dot"); a.k_dot = kds.data_ptr();
  }
  if (v_dot) {
    TORCH_CHECK(v_dot->sizes() == at::IntArrayRef(kvshape), "attention_dual: v_dot must be ", at::IntArrayRef(kvshape),
                ", got ", v_dot->sizes());
    vds = prep(*v_dot, "v_dot"); a.v_dot = vds.data_ptr();
  }
  if (attn_mask) {
    const at::Tensor& m = *attn_mask;
    check_cpu(m, "attn_mask");
    TORCH_CHECK(m.dim() <= 4, "attention_dual: attn_mask must have at most 4 dimensions, got ", m.dim());
    const int64_t full[4] = {B, H, L, S};
    for (int64_t d = 0; d < m.dim(); ++d) {
      const int64_t sz = m.size(m.dim() - 1 - d), want = full[3 - d];
      TORCH_CHECK(sz == 1 || sz == want, "attention_dual: attn_mask of shape ", m.sizes(),
                  " is not broadcastable to (B, H, L, S) = (", B, ", ", H, ", ", L, ", ", S, ")");
    }
    if (m.scalar_type() == at::kBool)
      ms = at::where(m, 0.0f, -std::numeric_limits<float>::infinity()).to(at::kFloat);
    else {
      TORCH_CHECK(at::isFloatingType(m.scalar_type()), "attention_dual: attn_mask must be bool or floating point, got ",
                  m.scalar_type());
      ms = m.to(at::kFloat);
    }
    ms = ms.expand({B, H, L, S});
    a.mask = ms.data_ptr<float>();
    for (int d = 0; d < 4; ++d) a.mask_stride[d] = ms.size(d) == 1 ? 0 : ms.stride(d);
  }
  a.causal = causal ? 1 : 0;
  a.scale = (float)scale;
  auto o = at::empty({B, H, L, D}, q.options());
  auto o_dot = at::empty(qshape, q.options());
  a.o = o.data_ptr();
  a.o_dot = K > 0 ? o_dot.data_ptr() : nullptr;
  a.num_threads = at::get_num_threads();
  check_status(fwd_attention_dual(&a));
  return {o, o_dot};
}

// ---- small dual ops. Inputs arrive validated by fwdkernels/dual_ops.py (shapes, one dtype, CPU); these
// wrappers only make buffers dense and call the C API. K = 0: primal only (y_dot is then empty).

at::Tensor dense(const c10::optional<at::Tensor>& t, const char* name) {
  if (!t) return at::Tensor();
  check_cpu(*t, name);
  return t->contiguous();
}
const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

// x (R, d); x_dot (K, R, d); weight, bias (d); weight_dot, bias_dot (K, d). inplace: y_dot = x_dot's storage.
std::tuple<at::Tensor, at::Tensor> norm_dual(const at::Tensor& x, const c10::optional<at::Tensor>& x_dot,
                                             const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                                             const c10::optional<at::Tensor>& weight_dot,
                                             const c10::optional<at::Tensor>& bias_dot, double eps, int64_t K, bool rms,
                                             bool inplace) {
  TORCH_CHECK(x.dim() == 2, "norm_dual: x must be (rows, d)");
  check_cpu(x, "x");
  at::Tensor xs = x.contiguous(), xd = dense(x_dot, "x_dot"), w = dense(weight, "weight"), b = dense(bias, "bias"),
             wd = dense(weight_dot, "weight_dot"), bd = dense(bias_dot, "bias_dot");
  fwd_norm_dual_args a;
  memset(&a, 0, sizeof(a));
  a.rows = xs.size(0); a.d = xs.size(1); a.K = K; a.dtype = dtype_code(x, "x"); a.eps = (float)eps;
  a.x = xs.data_ptr(); a.x_dot = ptr_or_null(xd); a.weight = ptr_or_null(w); a.bias = ptr_or_null(b);
  a.weight_dot = ptr_or_null(wd); a.bias_dot = ptr_or_null(bd);
  auto y = at::empty_like(xs);
  const bool reuse = inplace && xd.defined() && x_dot->is_contiguous();
  auto y_dot = reuse ? *x_dot : at::empty({K, a.rows, a.d}, xs.options());
  a.y = y.data_ptr(); a.y_dot = K ? y_dot.data_ptr() : nullptr;
  a.num_threads = at::get_num_threads();
  check_status(rms ? fwd_rms_norm_dual(&a) : fwd_layer_norm_dual(&a));
  return {y, y_dot};
}

// x (n) any shape, x_dot (K, *x.shape); act as fwd_activation.
std::tuple<at::Tensor, at::Tensor> activation_dual(const at::Tensor& x, const c10::optional<at::Tensor>& x_dot,
                                                   int64_t act, int64_t K, bool inplace) {
  check_cpu(x, "x");
  at::Tensor xs = x.contiguous(), xd = dense(x_dot, "x_dot");
  auto y = at::empty_like(xs);
  const bool reuse = inplace && xd.defined() && x_dot->is_contiguous();
  std::vector<int64_t> shape{K};
  shape.insert(shape.end(), xs.sizes().begin(), xs.sizes().end());
  auto y_dot = reuse ? *x_dot : at::empty(shape, xs.options());
  check_status(fwd_activation_dual((int)act, xs.numel(), K, dtype_code(x, "x"), xs.data_ptr(), ptr_or_null(xd),
                                   y.data_ptr(), K ? y_dot.data_ptr() : nullptr, at::get_num_threads()));
  return {y, y_dot};
}

// silu(gate) * up; inplace: the result goes into gate_dot's storage (when given and dense).
std::tuple<at::Tensor, at::Tensor> gated_act_dual(const at::Tensor& gate, const c10::optional<at::Tensor>& gate_dot,
                                                  const at::Tensor& up, const c10::optional<at::Tensor>& up_dot, int64_t K,
                                                  bool inplace) {
  check_cpu(gate, "gate");
  check_cpu(up, "up");
  at::Tensor gs = gate.contiguous(), us = up.contiguous(), gd = dense(gate_dot, "gate_dot"), ud = dense(up_dot, "up_dot");
  auto y = at::empty_like(gs);
  const bool reuse = inplace && gd.defined() && gate_dot->is_contiguous();
  std::vector<int64_t> shape{K};
  shape.insert(shape.end(), gs.sizes().begin(), gs.sizes().end());
  auto y_dot = reuse ? *gate_dot : at::empty(shape, gs.options());
  check_status(fwd_gated_act_dual(gs.numel(), K, dtype_code(gate, "gate"), gs.data_ptr(), ptr_or_null(gd), us.data_ptr(),
                                  ptr_or_null(ud), y.data_ptr(), K ? y_dot.data_ptr() : nullptr, at::get_num_threads()));
  return {y, y_dot};
}

// x (B, H, L, D) with a dense last dim (any other strides, e.g. a transposed (B, L, H, D) buffer);
// x_dot (K, B, H, L, D) likewise; cos / sin broadcastable to (B, H, L, D), dense last dim.
std::tuple<at::Tensor, at::Tensor> rotary_dual(const at::Tensor& x, const c10::optional<at::Tensor>& x_dot,
                                               const at::Tensor& cos, const at::Tensor& sin, int64_t K) {
  TORCH_CHECK(x.dim() == 4, "rotary_dual: x must be (B, H, L, D)");
  check_cpu(x, "x");
  auto lastdense = [](const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); };
  at::Tensor xs = lastdense(x);
  at::Tensor xd = x_dot ? lastdense(*x_dot) : at::Tensor();
  const int64_t B = x.size(0), H = x.size(1), L = x.size(2), D = x.size(3);
  at::Tensor c = lastdense(cos.expand({B, H, L, D})), s = lastdense(sin.expand({B, H, L, D}));
  if (c.strides() != s.strides()) { c = c.contiguous(); s = s.contiguous(); }
  fwd_rotary_dual_args a;
  memset(&a, 0, sizeof(a));
  a.B = B; a.H = H; a.L = L; a.D = D; a.K = K; a.dtype = dtype_code(x, "x");
  a.x = xs.data_ptr();
  for (int i = 0; i < 3; ++i) { a.x_stride[i] = xs.stride(i); a.cs_stride[i] = c.stride(i); }
  if (xd.defined()) {
    a.x_dot = xd.data_ptr();
    for (int i = 0; i < 4; ++i) a.x_dot_stride[i] = xd.stride(i);
  }
  a.cos = c.data_ptr(); a.sin = s.data_ptr();
  auto y = at::empty({B, H, L, D}, x.options());
  auto y_dot = at::empty({K, B, H, L, D}, x.options());
  a.y = y.data_ptr(); a.y_dot = K ? y_dot.data_ptr() : nullptr;
  a.num_threads = at::get_num_threads();
  check_status(fwd_rotary_dual(&a));
  return {y, y_dot};
}

// logits (N, C), logits_dot (K, N, C), labels (N) int64 -> (loss () float32, loss_dot (K,) float32)
std::tuple<at::Tensor, at::Tensor> cross_entropy_dual(const at::Tensor& logits, const c10::optional<at::Tensor>& logits_dot,
                                                      const at::Tensor& labels, int64_t ignore_index, int64_t K) {
  TORCH_CHECK(logits.dim() == 2, "cross_entropy_dual: logits must be (N, C)");
  check_cpu(logits, "logits");
  check_cpu(labels, "labels");
  TORCH_CHECK(labels.scalar_type() == at::kLong, "cross_entropy_dual: labels must be int64");
  at::Tensor ls = logits.contiguous(), ld = dense(logits_dot, "logits_dot"), lab = labels.contiguous();
  auto f32 = at::TensorOptions().dtype(at::kFloat);
  auto loss = at::empty({}, f32), loss_dot = at::empty({K}, f32);
  check_status(fwd_cross_entropy_dual(ls.size(0), ls.size(1), K, dtype_code(logits, "logits"), ls.data_ptr(), ptr_or_null(ld),
                                      lab.data_ptr<int64_t>(), ignore_index, loss.data_ptr<float>(),
                                      K ? loss_dot.data_ptr<float>() : nullptr, at::get_num_threads()));
  return {loss, loss_dot};
}

at::Tensor sgemm_nt(const at::Tensor& A, const at::Tensor& B) {
  TORCH_CHECK(A.scalar_type() == at::kFloat && B.scalar_type() == at::kFloat, "sgemm_nt takes float32");
  auto As = rows2d(A, "A"), Bs = rows2d(B, "B");
  auto C = at::empty({A.size(0), B.size(0)}, A.options());
  check_status(fwd_sgemm_nt(A.size(0), B.size(0), A.size(1), As.data_ptr<float>(), As.stride(0), Bs.data_ptr<float>(),
                            Bs.stride(0), C.data_ptr<float>(), C.size(1), at::get_num_threads()));
  return C;
}

uint64_t derive_seed(uint64_t base, const std::vector<int64_t>& ints) {
  return fwd_derive_seed(base, ints.data(), (int)ints.size());
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fwdkernels compiled CPU backend (torch bindings of the fwdcore C API)";
  m.def("philox_words", &philox_words);
  m.def("perturb", &perturb);
  m.def("perturb_combine", &perturb_combine);
  m.def("lora_linear_dual", &lora_linear_dual);
  m.def("attention_dual", &attention_dual);
  m.def("sgemm_nt", &sgemm_nt);
  m.def("norm_dual", &norm_dual);
  m.def("activation_dual", &activation_dual);
  m.def("gated_act_dual", &gated_act_dual);
  m.def("rotary_dual", &rotary_dual);
  m.def("cross_entropy_dual", &cross_entropy_dual);
  m.def("derive_seed", &derive_seed);
  m.def("simd", []() { return std::string(fwd_simd()); });
  m.def("core_version", []() { return std::string(fwd_version()); });
#ifdef FWD_TORCH_VERSION
  m.attr("torch_version") = FWD_TORCH_VERSION;
#else
  m.attr("torch_version") = "unknown";
#endif
}
