// torch bindings of the CUDA layer (fwdcore_cuda.h) -> fwdkernels._C_cuda, the "cuda" backend.
//
// The same functions and arguments as csrc/torch/bindings.cpp's CPU ones (the ops that create a tensor
// from nothing, philox_words and perturb, take an extra optional device index; -1 = the current
// device). Each checks its tensors (CUDA, one device, dtype, shape), makes that device current for the
// call (device guard), launches on torch's current stream of that device, and raises the C API's
// message (fwd_last_error) as a RuntimeError. Scratch memory (the dual LoRA linear's workspace) comes
// from torch's caching allocator.
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>
#include <vector>

#include "fwdcore_cuda.h"

namespace {

void check_status(fwd_status st) { TORCH_CHECK(st == FWD_OK, fwd_last_error()); }

int dtype_code(const at::Tensor& t, const char* name) {
  if (t.scalar_type() == at::kFloat) return FWD_F32;
  if (t.scalar_type() == at::kBFloat16) return FWD_BF16;
  TORCH_CHECK(false, name, " must be float32 or bfloat16, got ", t.scalar_type());
  return -1;
}

void check_cuda(const at::Tensor& t, const char* name, const at::Device& dev) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor for the cuda backend, got ", t.device());
  TORCH_CHECK(t.device() == dev, name, " is on ", t.device(), " but the call runs on ", dev);
}

at::Device cuda_device(int64_t index) {
  return at::Device(at::kCUDA, index < 0 ? c10::cuda::current_device() : (c10::DeviceIndex)index);
}

void* current_stream() { return (void*)c10::cuda::getCurrentCUDAStream().stream(); }

// As the CPU bindings: rows contiguous with a row stride >= the row length (the leading dimension);
// anything else is copied first.
at::Tensor rows2d(const at::Tensor& t, const char* name, const at::Device& dev) {
  check_cuda(t, name, dev);
  TORCH_CHECK(t.dim() == 2, name, " must be 2-D, got ", t.dim(), " dimensions");
  if (t.stride(1) == 1 && t.stride(0) >= t.size(1)) return t;
  at::Tensor u = t.contiguous();
  if (u.size(0) <= 1 && u.stride(0) < u.size(1))
    u = u.clone(at::MemoryFormat::Contiguous).as_strided(u.sizes(), {u.size(1), 1});
  return u;
}

at::Tensor philox_words(int64_t seed, int64_t n, int64_t offset, int64_t device_index) {
  TORCH_CHECK(n > 0, "numel must be positive, got ", n);
  TORCH_CHECK(offset >= 0, "offset must be non-negative, got ", offset);
  const at::Device dev = cuda_device(device_index);
  const c10::cuda::CUDAGuard guard(dev);
  auto tmp = at::empty({n, 4}, at::TensorOptions().dtype(at::kInt).device(dev));
  check_status(fwd_cuda_philox_words((uint64_t)seed, n, offset, (uint32_t*)tmp.data_ptr<int32_t>(), current_stream()));
  return tmp.to(at::kLong).bitwise_and(0xffffffffLL);
}

at::Tensor perturb(int64_t seed, int64_t n, int64_t offset, int64_t dist, at::ScalarType dtype, int64_t device_index) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "cuda perturb produces float32 or bfloat16, got ", dtype);
  TORCH_CHECK(n > 0, "numel must be positive, got ", n);
  const at::Device dev = cuda_device(device_index);
  const c10::cuda::CUDAGuard guard(dev);
  auto out = at::empty({n}, at::TensorOptions().dtype(dtype).device(dev));
  check_status(fwd_cuda_perturb((uint64_t)seed, n, offset, (int)dist, dtype == at::kFloat ? FWD_F32 : FWD_BF16,
                                out.data_ptr(), current_stream()));
  return out;
}

// out (n,) float32 contiguous CUDA tensor, updated in place; seeds (N,) int64, coefs (N,) float32 (moved to
// out's device if they are elsewhere).
void perturb_combine(const at::Tensor& seeds, const at::Tensor& coefs, int64_t offset, int64_t dist, at::Tensor& out) {
  TORCH_CHECK(seeds.dtype() == at::kLong && seeds.dim() == 1, "seeds must be a 1-D int64 tensor");
  TORCH_CHECK(coefs.dtype() == at::kFloat && coefs.dim() == 1 && coefs.numel() == seeds.numel(),
              "coefs must be a 1-D float32 tensor with one value per seed");
  TORCH_CHECK(out.is_cuda() && out.dtype() == at::kFloat && out.dim() == 1 && out.is_contiguous(),
              "out must be a contiguous 1-D float32 CUDA tensor");
  if (seeds.numel() == 0 || out.numel() == 0) return;
  const at::Device dev = out.device();
  const c10::cuda::CUDAGuard guard(dev);
  const at::Tensor s = seeds.to(dev).contiguous(), c = coefs.to(dev).contiguous();
  check_status(fwd_cuda_perturb_combine((const uint64_t*)s.data_ptr<int64_t>(), c.data_ptr<float>(), s.numel(),
                                        out.numel(), offset, (int)dist, out.data_ptr<float>(), current_stream()));
}

std::tuple<at::Tensor, at::Tensor> lora_linear_dual(
    const at::Tensor& x, const c10::optional<at::Tensor>& x_dot, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& lora_A,
    const c10::optional<at::Tensor>& lora_B, double scaling, const c10::optional<at::Tensor>& seeds, int64_t K,
    int64_t offset_A, int64_t offset_B, int64_t offset_bias, int64_t dist, const c10::optional<at::Tensor>& A_dot,
    const c10::optional<at::Tensor>& B_dot, const c10::optional<at::Tensor>& bias_dot) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2, "x must be (M, d_in) and weight (d_out, d_in)");
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor for the cuda backend, got ", x.device());
  const at::Device dev = x.device();
  const c10::cuda::CUDAGuard guard(dev);
  const int64_t M = x.size(0), d_in = x.size(1), d_out = weight.size(0);
  const int in_dt = dtype_code(x, "x");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "weight dtype ", weight.scalar_type(), " != x dtype ",
              x.scalar_type());
  at::Tensor xs = rows2d(x, "x", dev), ws = rows2d(weight, "weight", dev);
  fwd_lora_dual_args a;
  memset(&a, 0, sizeof(a));
  a.M = M; a.d_in = d_in; a.d_out = d_out; a.K = K;
  a.in_dtype = in_dt; a.out_dtype = in_dt;
  a.x = xs.data_ptr(); a.ldx = xs.stride(0);
  a.W = ws.data_ptr(); a.ldw = ws.stride(0);
  auto dense = [&](const at::Tensor& t, const char* name) {
    check_cuda(t, name, dev);
    TORCH_CHECK(t.scalar_type() == x.scalar_type(), name, " dtype ", t.scalar_type(), " != x dtype ", x.scalar_type());
    return t.contiguous();
  };
  at::Tensor xds, bs, As, Bs, Ads, Bds, bds, ss;
  if (x_dot) {
    TORCH_CHECK(x_dot->dim() == 3 && x_dot->size(0) == K && x_dot->size(1) == M && x_dot->size(2) == d_in,
                "x_dot must be (K, M, d_in)");
    xds = dense(*x_dot, "x_dot");  // rows addressed as (k*M + m) * ld
    a.x_dot = xds.data_ptr(); a.ldx_dot = d_in;
  }
  if (bias) { bs = dense(*bias, "bias"); a.bias = bs.data_ptr(); }
  if (lora_A) {
    TORCH_CHECK(lora_B.has_value(), "lora_A and lora_B must be given together");
    As = rows2d(*lora_A, "lora_A", dev); Bs = rows2d(*lora_B, "lora_B", dev);
    a.A = As.data_ptr(); a.lda = As.stride(0); a.r = As.size(0);
    a.B = Bs.data_ptr(); a.ldb = Bs.stride(0);
  }
  if (A_dot) { Ads = dense(*A_dot, "A_dot"); a.A_dot = Ads.data_ptr(); }
  if (B_dot) { Bds = dense(*B_dot, "B_dot"); a.B_dot = Bds.data_ptr(); }
  if (bias_dot) { bds = dense(*bias_dot, "bias_dot"); a.bias_dot = bds.data_ptr(); }
  if (seeds) {
    TORCH_CHECK(seeds->scalar_type() == at::kLong, "seeds must be int64, got ", seeds->scalar_type());
    ss = seeds->to(dev).contiguous();  // the kernels read the seeds on the device
    a.seeds = ss.data_ptr<int64_t>();
  }
  a.scaling = (float)scaling;
  a.offset_A = offset_A; a.offset_B = offset_B; a.offset_bias = offset_bias;
  a.dist = (int)dist;
  auto y = at::empty({M, d_out}, x.options());
  auto y_dot = at::empty({K, M, d_out}, x.options());
  a.y = y.data_ptr(); a.ldy = d_out;
  a.y_dot = K > 0 ? y_dot.data_ptr() : nullptr; a.ldy_dot = d_out;
  const size_t wbytes = fwd_cuda_lora_dual_workspace_bytes(&a);
  at::Tensor work = at::empty({(int64_t)((wbytes + sizeof(float) - 1) / sizeof(float))}, x.options().dtype(at::kFloat));
  check_status(fwd_cuda_lora_linear_dual_ws(&a, wbytes ? work.data_ptr() : nullptr, wbytes, current_stream()));
  return {y, y_dot};
}

// As the CPU binding: inputs made contiguous; the mask (bool: True = attend, or additive float) becomes an
// additive float32 mask on the device, broadcast to (B, H, L, S) through zero strides (no copy).
std::tuple<at::Tensor, at::Tensor> attention_dual(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& q_dot,
    const c10::optional<at::Tensor>& k_dot, const c10::optional<at::Tensor>& v_dot,
    const c10::optional<at::Tensor>& attn_mask, bool causal, double scale, int64_t K) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "attention_dual: q must be (B, H, L, D) and k, v (B, Hkv, S, D)");
  TORCH_CHECK(q.is_cuda(), "attention_dual: q must be a CUDA tensor for the cuda backend, got ", q.device());
  const at::Device dev = q.device();
  const c10::cuda::CUDAGuard guard(dev);
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
    check_cuda(t, name, dev);
    TORCH_CHECK(t.scalar_type() == q.scalar_type(), "attention_dual: ", name, " dtype ", t.scalar_type(),
                " != q dtype ", q.scalar_type());
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
    TORCH_CHECK(m.dim() <= 4, "attention_dual: attn_mask must have at most 4 dimensions, got ", m.dim());
    const int64_t full[4] = {B, H, L, S};
    for (int64_t d = 0; d < m.dim(); ++d) {
      const int64_t sz = m.size(m.dim() - 1 - d), want = full[3 - d];
      TORCH_CHECK(sz == 1 || sz == want, "attention_dual: attn_mask of shape ", m.sizes(),
                  " is not broadcastable to (B, H, L, S) = (", B, ", ", H, ", ", L, ", ", S, ")");
    }
    const at::Tensor md = m.to(dev);
    if (md.scalar_type() == at::kBool) {
      ms = at::where(md, 0.0f, -std::numeric_limits<float>::infinity()).to(at::kFloat);
    } else {
      TORCH_CHECK(at::isFloatingType(md.scalar_type()), "attention_dual: attn_mask must be bool or floating point, got ",
                  md.scalar_type());
      ms = md.to(at::kFloat);
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
  check_status(fwd_cuda_attention_dual(&a, current_stream()));
  return {o, o_dot};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "fwdkernels compiled CUDA backend (torch bindings of csrc/cuda's fwd_cuda_* C API)";
  m.def("philox_words", &philox_words, py::arg("seed"), py::arg("n"), py::arg("offset"), py::arg("device_index") = -1);
  m.def("perturb", &perturb, py::arg("seed"), py::arg("n"), py::arg("offset"), py::arg("dist"), py::arg("dtype"),
        py::arg("device_index") = -1);
  m.def("perturb_combine", &perturb_combine);
  m.def("lora_linear_dual", &lora_linear_dual);
  m.def("attention_dual", &attention_dual);
  m.def("max_head_dim", []() { return fwd_cuda_attention_max_head_dim(); });
  m.def("core_version", []() { return std::string(fwd_version()); });
#ifdef FWD_TORCH_VERSION
  m.attr("torch_version") = FWD_TORCH_VERSION;
#else
  m.attr("torch_version") = "unknown";
#endif
}
