// The one Python module, llmkernels._C. Functions take plain tensor views built in
// python/llmkernels/_cview.py: (data_ptr, dtype_code, sizes, strides), or None.
// No torch headers here, on purpose (DESIGN.md): one binary serves every torch version.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>
#include <vector>

#include "common/attention_band.h"
#include "common/checks.h"
#include "common/half.h"
#include "common/cpu_features.h"
#include "common/tensor_view.h"
#include "common/thread_pool.h"
#include "cpu/amx_tiles.h"
#include "cpu/attention.h"
#include "cpu/optim.h"
#include "cpu/quant_matmul.h"
#ifdef LLMK_WITH_CUDA
#include "cuda/attention.h"
#include "cuda/optim.h"
#include "cuda/quant_matmul.h"
#include "cuda/runtime.h"
#endif

namespace py = pybind11;
using namespace llmk;

namespace {

// A (data_ptr, dtype code, sizes, strides) tuple of Python ints. Read with the C API: an
// optimizer step passes thousands (pybind11's casts into std::vectors took ~0.8 us a view).
TensorView to_view(const py::handle& obj, const char* name) {
  TensorView v;
  if (obj.is_none()) return v;
  PyObject* t = obj.ptr();
  LLMK_CHECK(PyTuple_Check(t) && PyTuple_GET_SIZE(t) == 4,
             name << ": expected (data_ptr, dtype, sizes, strides)");
  auto as_int = [&](PyObject* o) {
    const long long x = PyLong_AsLongLong(o);
    if (x == -1 && PyErr_Occurred()) {
      PyErr_Clear();
      LLMK_CHECK(false, name << ": expected integers in (data_ptr, dtype, sizes, strides)");
    }
    return int64_t(x);
  };
  PyObject* ptr = PyTuple_GET_ITEM(t, 0);
  const unsigned long long address = PyLong_AsUnsignedLongLong(ptr);
  if (address == static_cast<unsigned long long>(-1) && PyErr_Occurred()) {
    PyErr_Clear();
    LLMK_CHECK(false, name << ": data_ptr must be a non-negative integer");
  }
  v.data = reinterpret_cast<void*>(uintptr_t(address));
  const int64_t code = as_int(PyTuple_GET_ITEM(t, 1));
  LLMK_CHECK(code >= 0 && code <= int(DType::i64), name << ": unknown dtype code " << code);
  v.dtype = DType(code);
  PyObject* sizes = PyTuple_GET_ITEM(t, 2);
  PyObject* strides = PyTuple_GET_ITEM(t, 3);
  LLMK_CHECK(PyTuple_Check(sizes) && PyTuple_Check(strides) &&
                 PyTuple_GET_SIZE(sizes) == PyTuple_GET_SIZE(strides) &&
                 PyTuple_GET_SIZE(sizes) <= kMaxDims,
             name << ": bad sizes/strides");
  v.ndim = int32_t(PyTuple_GET_SIZE(sizes));
  for (int i = 0; i < v.ndim; ++i) {
    v.sizes[i] = as_int(PyTuple_GET_ITEM(sizes, i));
    v.strides[i] = as_int(PyTuple_GET_ITEM(strides, i));
  }
  return v;
}

CpuTier to_tier(int tier) {
  LLMK_CHECK(tier >= 0 && tier <= int(CpuTier::amx), "unknown CPU tier " << tier);
  return CpuTier(tier);
}

AttentionParams make_params(const py::object& q, const py::object& k, const py::object& v,
                            const py::object& mask, float scale, float softcap,
                            int64_t window_left, int64_t window_right, int64_t diag_offset,
                            int num_threads) {
  AttentionParams p;
  p.q = to_view(q, "query");
  p.k = to_view(k, "key");
  p.v = to_view(v, "value");
  p.mask = to_view(mask, "attn_mask");
  p.scale = scale;
  p.softcap = softcap;
  p.window_left = window_left;
  p.window_right = window_right;
  p.diag_offset = diag_offset;
  LLMK_CHECK(num_threads >= 1 && num_threads <= kMaxThreads, "num_threads out of range");
  p.num_threads = num_threads;
  return p;
}

QuantMatmulParams make_quant_params(int scheme, const py::object& x, const py::object& qdata,
                                    const py::object& scales, const py::object& zeros,
                                    const py::object& bias, const py::object& out,
                                    int64_t group_size, int num_threads) {
  QuantMatmulParams p;
  LLMK_CHECK(scheme >= 0 && scheme <= int(QuantScheme::w8a8), "unknown scheme " << scheme);
  p.scheme = QuantScheme(scheme);
  p.x = to_view(x, "x");
  p.qdata = to_view(qdata, "qdata");
  p.scales = to_view(scales, "scales");
  p.zeros = to_view(zeros, "zeros");
  p.bias = to_view(bias, "bias");
  p.out = to_view(out, "out");
  p.group_size = group_size;
  LLMK_CHECK(num_threads >= 1 && num_threads <= kMaxThreads, "num_threads out of range");
  p.num_threads = num_threads;
  return p;
}

py::dict build_info() {
  py::dict info;
  const CpuFeatures& f = cpu_features();
  py::dict feats;
  feats["avx2"] = f.avx2; feats["fma"] = f.fma; feats["f16c"] = f.f16c;
  feats["avx512f"] = f.avx512f; feats["avx512bw"] = f.avx512bw; feats["avx512vl"] = f.avx512vl;
  feats["avx512dq"] = f.avx512dq; feats["avx512_bf16"] = f.avx512_bf16;
  feats["avx512_fp16"] = f.avx512_fp16; feats["avx512_vnni"] = f.avx512_vnni;
  feats["amx_tile"] = f.amx_tile; feats["amx_bf16"] = f.amx_bf16; feats["amx_int8"] = f.amx_int8;
  feats["neon"] = f.neon;
  info["cpu_features"] = feats;
  info["cpu_vendor"] = f.vendor;
  info["cpu_brand"] = f.brand;
  std::vector<std::string> built;
  for (CpuTier t : kAllTiers) built.push_back(tier_name(t));
  info["cpu_tiers_built"] = built;
  info["cpu_tiers_supported"] = supported_tiers();
  info["cpu_tier_best"] = tier_name(best_tier());
  std::string amx_why;
  info["amx_hardware"] = amx::hardware_usable(&amx_why);
  info["amx_hardware_why_not"] = amx_why;
  info["amx_emulated"] = tier_supported(CpuTier::amx) && amx::emulated();
#ifdef LLMK_WITH_CUDA
  info["cuda_built"] = true;
  info["cuda_archs"] = std::string(LLMK_CUDA_ARCHS);
  info["cuda_runtime_version"] = cuda::runtime_version();
  info["cuda_driver_version"] = cuda::driver_version();
  info["cuda_devices"] = cuda::device_names();
#else
  info["cuda_built"] = false;
  info["cuda_archs"] = std::string();
#endif
  info["compiler"] = std::string(__VERSION__);
  return info;
}

#ifdef LLMK_WITH_CUDA
cuda::AttentionCudaArgs make_cuda_args(const py::object& q, const py::object& k, const py::object& v,
                                       const py::object& cu_seqlens_q, const py::object& cu_seqlens_k,
                                       const py::object& seqused_k, int64_t max_seqlen_q,
                                       int64_t max_seqlen_k, float scale, float softcap,
                                       int64_t window_left, int64_t window_right,
                                       int64_t diag_offset, bool bottom_right, uintptr_t stream) {
  cuda::AttentionCudaArgs a;
  a.q = to_view(q, "query");
  a.k = to_view(k, "key");
  a.v = to_view(v, "value");
  a.cu_seqlens_q = to_view(cu_seqlens_q, "cu_seqlens_q");
  a.cu_seqlens_k = to_view(cu_seqlens_k, "cu_seqlens_k");
  a.seqused_k = to_view(seqused_k, "seqused_k");
  a.max_seqlen_q = max_seqlen_q;
  a.max_seqlen_k = max_seqlen_k;
  a.scale = scale;
  a.softcap = softcap;
  a.window_left = window_left;
  a.window_right = window_right;
  a.diag_offset = diag_offset;
  a.bottom_right = bottom_right;
  a.stream = stream;
  return a;
}
#endif

}  // namespace

namespace {

// The optimizer steps' arguments (shared by the CPU and CUDA bindings): hyperparameters,
// then per tensor a tuple of views and floats (see the Python callers in llmkernels/optim).
AdamHyper adam_hyper(float lr, float beta1, float beta2, float eps, float weight_decay,
                     bool decoupled, bool amsgrad, bool maximize, float inv_grad_scale,
                     int num_threads, double decay, double one_minus_beta1,
                     double one_minus_beta2, bool stochastic_rounding) {
  AdamHyper h;
  h.stochastic_rounding = stochastic_rounding;
  h.decay = float(decay);
  h.one_minus_beta1 = float(one_minus_beta1);
  h.one_minus_beta2 = float(one_minus_beta2);
  h.lr = lr; h.beta1 = beta1; h.beta2 = beta2; h.eps = eps;
  h.weight_decay = weight_decay; h.decoupled = decoupled; h.amsgrad = amsgrad;
  h.maximize = maximize; h.inv_grad_scale = inv_grad_scale;
  LLMK_CHECK(num_threads >= 1 && num_threads <= kMaxThreads, "num_threads out of range");
  h.num_threads = num_threads;
  return h;
}

std::vector<AdamTensor> adam_tensors(const py::list& tensors) {
  std::vector<AdamTensor> ts;
  for (const auto& item : tensors) {
    auto t = item.cast<py::tuple>();
    LLMK_CHECK(t.size() == 8, "adam_step: expected (param, grad, exp_avg, exp_avg_sq, "
                              "max_exp_avg_sq, step_size, bias_correction2_sqrt, sr_key)");
    AdamTensor a;
    a.param = to_view(t[0], "param");
    a.grad = to_view(t[1], "grad");
    a.exp_avg = to_view(t[2], "exp_avg");
    a.exp_avg_sq = to_view(t[3], "exp_avg_sq");
    a.max_exp_avg_sq = to_view(t[4], "max_exp_avg_sq");
    a.step_size = t[5].cast<float>();
    a.bias_correction2_sqrt = t[6].cast<float>();
    a.sr_key = t[7].cast<uint32_t>();
    ts.push_back(a);
  }
  return ts;
}

std::vector<Adam8bitTensor> adam8bit_tensors(const py::list& tensors) {
  std::vector<Adam8bitTensor> ts;
  for (const auto& item : tensors) {
    auto t = item.cast<py::tuple>();
    LLMK_CHECK(t.size() == 8, "adam8bit_step: expected (param, grad, m_codes, m_scales, "
                              "v_codes, v_scales, step_size, bias_correction2_sqrt)");
    Adam8bitTensor a;
    a.param = to_view(t[0], "param");
    a.grad = to_view(t[1], "grad");
    a.m_codes = to_view(t[2], "m_codes");
    a.m_scales = to_view(t[3], "m_scales");
    a.v_codes = to_view(t[4], "v_codes");
    a.v_scales = to_view(t[5], "v_scales");
    a.step_size = t[6].cast<float>();
    a.bias_correction2_sqrt = t[7].cast<float>();
    ts.push_back(a);
  }
  return ts;
}

SgdHyper sgd_hyper(float lr, float momentum, float dampening, float weight_decay, bool nesterov,
                   bool maximize, float inv_grad_scale, int num_threads,
                   double one_minus_dampening, bool stochastic_rounding) {
  SgdHyper h;
  h.stochastic_rounding = stochastic_rounding;
  h.one_minus_dampening = float(one_minus_dampening);
  h.lr = lr; h.momentum = momentum; h.dampening = dampening;
  h.weight_decay = weight_decay; h.nesterov = nesterov; h.maximize = maximize;
  h.inv_grad_scale = inv_grad_scale;
  LLMK_CHECK(num_threads >= 1 && num_threads <= kMaxThreads, "num_threads out of range");
  h.num_threads = num_threads;
  return h;
}

std::vector<SgdTensor> sgd_tensors(const py::list& tensors) {
  std::vector<SgdTensor> ts;
  for (const auto& item : tensors) {
    auto t = item.cast<py::tuple>();
    LLMK_CHECK(t.size() == 5, "sgd_step: expected (param, grad, momentum_buffer, first, sr_key)");
    SgdTensor a;
    a.param = to_view(t[0], "param");
    a.grad = to_view(t[1], "grad");
    a.momentum_buffer = to_view(t[2], "momentum_buffer");
    a.first_step = t[3].cast<bool>();
    a.sr_key = t[4].cast<uint32_t>();
    ts.push_back(a);
  }
  return ts;
}
}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "llmkernels compiled kernels (torch-free views; see python/llmkernels/_cview.py)";
  m.def("build_info", &build_info);
  m.def("amx_forked_self_check", [] {
    std::string why;
    const bool ok = amx::forked_self_check(&why);
    return py::make_tuple(ok, why);
  }, "Run the AMX tile self-check in a forked child: (passed, why not).");
  m.def("amx_scope_selftest", &amx::scope_selftest,
        "Tile scopes on the software model keep the caller's configuration: '' or what failed.");
  m.def("use_openmp_runtime", [](const std::string& path) { return use_openmp_runtime(path.c_str()); },
        "Run parallel loops on the OpenMP runtime loaded from path ('' = our own pool)");
  m.def("threading_runtime", [] { return std::string(threading_runtime()); });
  m.def("parallel_for_selftest", [](int64_t n, int nthreads, int64_t throw_at) {
    LLMK_CHECK(n >= 0 && nthreads >= 1 && nthreads <= kMaxThreads, "bad selftest arguments");
    py::gil_scoped_release release;
    return parallel_for_selftest(n, nthreads, throw_at);
  });
  m.def("tier_code", [](const std::string& name) {
    for (CpuTier t : kAllTiers)
      if (name == tier_name(t)) return int(t);
    throw py::value_error("unknown CPU tier '" + name + "'");
  });
  m.def("tier_supported", [](int tier) { return tier_supported(to_tier(tier)); });
  m.def("half_conversions_selftest", &half_conversions_selftest,
        "Checks the branch-free float16 conversions against the branchy ones; '' when equal.");
  m.def("attention_set_round_bytes", &set_attention_round_bytes, py::arg("bytes"),
        "Testing knob: the workspace budget of one round of heads (0 restores the default).");

  m.def(
      "adam_step",
      [](int tier, py::list tensors, float lr, float beta1, float beta2, float eps,
         float weight_decay, bool decoupled, bool amsgrad, bool maximize, float inv_grad_scale,
         int num_threads, double decay, double one_minus_beta1, double one_minus_beta2,
         bool stochastic_rounding) {
        const AdamHyper h = adam_hyper(lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad,
                                       maximize, inv_grad_scale, num_threads, decay,
                                       one_minus_beta1, one_minus_beta2, stochastic_rounding);
        const std::vector<AdamTensor> ts = adam_tensors(tensors);
        const CpuTier ct = to_tier(tier);
        py::gil_scoped_release release;
        adam_step(ct, h, ts);
      },
      "Fused Adam/AdamW step over a list of tensors (see csrc/cpu/optim.h).");
  m.def(
      "adam8bit_step",
      [](int tier, py::list tensors, float eps, float weight_decay, float beta2, bool decoupled,
         bool maximize, float inv_grad_scale, int num_threads, double decay,
         double one_minus_beta1, double one_minus_beta2) {
        const AdamHyper h = adam_hyper(0.f, 0.f, beta2, eps, weight_decay, decoupled, false,
                                       maximize, inv_grad_scale, num_threads, decay,
                                       one_minus_beta1, one_minus_beta2, false);
        const std::vector<Adam8bitTensor> ts = adam8bit_tensors(tensors);
        const CpuTier ct = to_tier(tier);
        py::gil_scoped_release release;
        adam8bit_step(ct, h, ts);
      },
      "Fused 8-bit AdamW step (block-wise int8/uint8 moments; see csrc/cpu/optim.h).");
  m.def(
      "sgd_step",
      [](int tier, py::list tensors, float lr, float momentum, float dampening,
         float weight_decay, bool nesterov, bool maximize, float inv_grad_scale,
         int num_threads, double one_minus_dampening, bool stochastic_rounding) {
        const SgdHyper h = sgd_hyper(lr, momentum, dampening, weight_decay, nesterov, maximize,
                                     inv_grad_scale, num_threads, one_minus_dampening,
                                     stochastic_rounding);
        const std::vector<SgdTensor> ts = sgd_tensors(tensors);
        const CpuTier ct = to_tier(tier);
        py::gil_scoped_release release;
        sgd_step(ct, h, ts);
      },
      "Fused SGD step over a list of tensors (see csrc/cpu/optim.h).");
  m.def(
      "quant_matmul_kernel_name",
      [](int tier, int scheme, int64_t rows, int64_t k, int x_dtype, int64_t group_size) {
        LLMK_CHECK(scheme >= 0 && scheme <= 2, "unknown scheme code " << scheme);
        LLMK_CHECK(x_dtype >= 0 && x_dtype <= int(DType::i64), "unknown dtype code " << x_dtype);
        QuantMatmulParams p;
        p.scheme = QuantScheme(scheme);
        p.group_size = group_size;
        p.x.dtype = DType(x_dtype);
        p.x.ndim = 2;
        p.x.sizes[0] = rows;
        p.x.sizes[1] = k;  // int4's paired layout needs whole groups in each half of K
        return std::string(quant_matmul_kernel_name(to_tier(tier), p));
      },
      "Which CPU kernel layout serves a call of this scheme, row count, K, x dtype and group.");
  m.def(
      "quant_matmul_workspace_bytes",
      [](int tier, int scheme, py::object x, py::object qdata, py::object scales,
         py::object zeros, py::object bias, py::object out, int64_t group_size,
         int num_threads) {
        QuantMatmulParams p = make_quant_params(scheme, x, qdata, scales, zeros, bias, out,
                                                group_size, num_threads);
        return quant_matmul_workspace_bytes(to_tier(tier), p);
      },
      py::arg("tier"), py::arg("scheme"), py::arg("x"), py::arg("qdata"), py::arg("scales"),
      py::arg("zeros"), py::arg("bias"), py::arg("out"), py::arg("group_size"),
      py::arg("num_threads"));
  m.def(
      "quant_matmul_grad_x_workspace_bytes",
      [](int tier, int scheme, py::object grad_out, py::object qdata, py::object scales,
         py::object zeros, py::object grad_x, int64_t group_size, int num_threads) {
        QuantMatmulParams p = make_quant_params(scheme, grad_out, qdata, scales, zeros,
                                                py::none(), grad_x, group_size, num_threads);
        return quant_matmul_grad_x_workspace_bytes(to_tier(tier), p);
      },
      py::arg("tier"), py::arg("scheme"), py::arg("grad_out"), py::arg("qdata"),
      py::arg("scales"), py::arg("zeros"), py::arg("grad_x"), py::arg("group_size"),
      py::arg("num_threads"));
  m.def(
      "quant_matmul_grad_x",
      [](int tier, int scheme, py::object grad_out, py::object qdata, py::object scales,
         py::object zeros, py::object grad_x, int64_t group_size, int num_threads,
         uintptr_t workspace, int64_t workspace_bytes) {
        QuantMatmulParams p = make_quant_params(scheme, grad_out, qdata, scales, zeros,
                                                py::none(), grad_x, group_size, num_threads);
        const CpuTier t = to_tier(tier);
        py::gil_scoped_release release;
        quant_matmul_grad_x(t, p, reinterpret_cast<void*>(workspace), workspace_bytes);
      },
      py::arg("tier"), py::arg("scheme"), py::arg("grad_out"), py::arg("qdata"),
      py::arg("scales"), py::arg("zeros"), py::arg("grad_x"), py::arg("group_size"),
      py::arg("num_threads"), py::arg("workspace"), py::arg("workspace_bytes"),
      "The quantized matmul's input gradient on the CPU: grad_x = grad_out @ dequantize(W), "
      "float32.");
  m.def(
      "quant_matmul",
      [](int tier, int scheme, py::object x, py::object qdata, py::object scales,
         py::object zeros, py::object bias, py::object out, int64_t group_size,
         int num_threads, uintptr_t workspace, int64_t workspace_bytes) {
        QuantMatmulParams p = make_quant_params(scheme, x, qdata, scales, zeros, bias, out,
                                                group_size, num_threads);
        const CpuTier t = to_tier(tier);
        py::gil_scoped_release release;
        quant_matmul(t, p, reinterpret_cast<void*>(workspace), workspace_bytes);
      },
      py::arg("tier"), py::arg("scheme"), py::arg("x"), py::arg("qdata"), py::arg("scales"),
      py::arg("zeros"), py::arg("bias"), py::arg("out"), py::arg("group_size"),
      py::arg("num_threads"), py::arg("workspace"), py::arg("workspace_bytes"),
      "Quantized matmul on the CPU: out = x @ dequantize(W)^T (+ bias); schemes 0 int8, "
      "1 int4, 2 w8a8.");
  m.def(
      "kvcache_append",
      [](py::object cache, py::object src, std::vector<int64_t> starts) {
        const TensorView d = to_view(cache, "cache"), s = to_view(src, "new");
        py::gil_scoped_release release;
        kvcache_append(d, s, starts.data(), int64_t(starts.size()));
      },
      py::arg("cache"), py::arg("new"), py::arg("starts"),
      "Writes token t of new (B, n, H, E) at position starts[b] + t of cache (B, S, H, E).");
  m.def("attention_decode_shaped", &attention_decode_shaped, py::arg("queries"),
        py::arg("group"),
        "Whether L queries a head with group query heads a kv head take the decode-shaped "
        "forward (the calls that accept key_lens).");
  m.def(
      "attention_forward_workspace_bytes",
      [](int tier, py::object q, py::object k, py::object v, py::object mask, int num_threads,
         double dropout_p) {
        AttentionParams p = make_params(q, k, v, mask, 1.f, 0.f, -1, -1, 0, num_threads);
        p.dropout_p = dropout_p;  // it decides between the decode-shaped and tiled layouts
        return attention_forward_workspace_bytes(to_tier(tier), p);
      },
      py::arg("tier"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("mask"),
      py::arg("num_threads"), py::arg("dropout_p") = 0.0);
  m.def(
      "attention_backward_workspace_bytes",
      [](int tier, py::object q, py::object k, py::object v, py::object mask, int num_threads) {
        AttentionParams p = make_params(q, k, v, mask, 1.f, 0.f, -1, -1, 0, num_threads);
        return attention_backward_workspace_bytes(to_tier(tier), p);
      },
      py::arg("tier"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("mask"),
      py::arg("num_threads"));
  m.def(
      "attention_forward",
      [](int tier, py::object q, py::object k, py::object v, py::object mask, py::object out,
         py::object lse, uintptr_t workspace, int64_t workspace_bytes, float scale, float softcap,
         int64_t window_left, int64_t window_right, int64_t diag_offset, int num_threads,
         py::object out_residual, std::optional<std::vector<int64_t>> key_lens,
         double dropout_p, uint64_t dropout_seed) {
        AttentionParams p = make_params(q, k, v, mask, scale, softcap, window_left, window_right,
                                        diag_offset, num_threads);
        p.dropout_p = dropout_p;
        p.dropout_seed = dropout_seed;
        if (key_lens) {
          LLMK_CHECK(int64_t(key_lens->size()) == p.q.sizes[0],
                     "key_lens has " << key_lens->size() << " entries, the batch "
                     << p.q.sizes[0]);
          p.key_lens = key_lens->data();
        }
        ForwardIO io;
        io.out = to_view(out, "out");
        io.lse = to_view(lse, "lse");
        io.out_residual = to_view(out_residual, "out_residual");
        io.workspace = reinterpret_cast<void*>(workspace);
        io.workspace_bytes = workspace_bytes;
        const CpuTier t = to_tier(tier);
        py::gil_scoped_release release;
        return attention_forward(t, p, io);
      },
      py::arg("tier"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("mask"), py::arg("out"),
      py::arg("lse"), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("scale"),
      py::arg("softcap"), py::arg("window_left"), py::arg("window_right"),
      py::arg("diag_offset"), py::arg("num_threads"), py::arg("out_residual") = py::none(),
      py::arg("key_lens") = py::none(), py::arg("dropout_p") = 0.0, py::arg("dropout_seed") = 0,
      "Fused attention forward; returns the number of output rows holding NaN/Inf. key_lens "
      "(decode-shaped calls): keys each batch entry sees, from the first. dropout_p / "
      "dropout_seed: attention dropout, its pattern a hash of (seed, row, key).");
  m.def(
      "attention_backward",
      [](int tier, py::object q, py::object k, py::object v, py::object mask, py::object dout,
         py::object out, py::object lse, py::object dq, py::object dk, py::object dv,
         uintptr_t workspace, int64_t workspace_bytes, float scale, float softcap,
         int64_t window_left, int64_t window_right, int64_t diag_offset, int num_threads,
         py::object out_residual, double dropout_p, uint64_t dropout_seed, py::object dmask) {
        AttentionParams p = make_params(q, k, v, mask, scale, softcap, window_left, window_right,
                                        diag_offset, num_threads);
        p.dropout_p = dropout_p;
        p.dropout_seed = dropout_seed;
        BackwardIO io;
        io.out_residual = to_view(out_residual, "out_residual");
        io.dmask = to_view(dmask, "dmask");
        io.dout = to_view(dout, "grad_out");
        io.out = to_view(out, "out");
        io.lse = to_view(lse, "lse");
        io.dq = to_view(dq, "dq");
        io.dk = to_view(dk, "dk");
        io.dv = to_view(dv, "dv");
        io.workspace = reinterpret_cast<void*>(workspace);
        io.workspace_bytes = workspace_bytes;
        const CpuTier t = to_tier(tier);
        py::gil_scoped_release release;
        attention_backward(t, p, io);
      },
      py::arg("tier"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("mask"),
      py::arg("dout"), py::arg("out"), py::arg("lse"), py::arg("dq"), py::arg("dk"),
      py::arg("dv"), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("scale"),
      py::arg("softcap"), py::arg("window_left"), py::arg("window_right"),
      py::arg("diag_offset"), py::arg("num_threads"), py::arg("out_residual") = py::none(),
      py::arg("dropout_p") = 0.0, py::arg("dropout_seed") = 0, py::arg("dmask") = py::none(),
      "Fused attention backward (dropout_p / dropout_seed: the forward's; dmask: a zeroed, "
      "contiguous float32 (B, Hq, L, S) buffer for the float mask's gradient).");

  // Band math of the GPU kernels' block skipping (csrc/common/attention_band.h), exposed for
  // tests/test_attention_band.py. Returns (first_block, end_block); (0, 0) when empty.
  m.def(
      "attention_band_key_block_range",
      [](int64_t q_start, int64_t q_end, int64_t len_q, int64_t len_k, int64_t window_left,
         int64_t window_right, int64_t off, int64_t block_n) {
        LLMK_CHECK(block_n >= 1, "block_n must be >= 1");
        const band::Range r = band::key_block_range(
            q_start, q_end, len_q, len_k, band::clamp_window(window_left),
            band::clamp_window(window_right), band::clamp_offset(off), block_n);
        return std::make_pair(r.first, r.end);
      },
      py::arg("q_start"), py::arg("q_end"), py::arg("len_q"), py::arg("len_k"),
      py::arg("window_left"), py::arg("window_right"), py::arg("off"), py::arg("block_n"));
  m.def(
      "attention_band_query_block_range",
      [](int64_t k_start, int64_t k_end, int64_t len_q, int64_t len_k, int64_t window_left,
         int64_t window_right, int64_t off, int64_t block_m) {
        LLMK_CHECK(block_m >= 1, "block_m must be >= 1");
        const band::Range r = band::query_block_range(
            k_start, k_end, len_q, len_k, band::clamp_window(window_left),
            band::clamp_window(window_right), band::clamp_offset(off), block_m);
        return std::make_pair(r.first, r.end);
      },
      py::arg("k_start"), py::arg("k_end"), py::arg("len_q"), py::arg("len_k"),
      py::arg("window_left"), py::arg("window_right"), py::arg("off"), py::arg("block_m"));

#ifdef LLMK_WITH_CUDA
  m.def("attention_cuda_supports", [](int dtype_code, int64_t head_dim) {
    return cuda::attention_cuda_supports(dtype_code, head_dim);
  }, py::arg("dtype_code"), py::arg("head_dim"));
  m.def(
      "attention_forward_cuda",
      [](py::object q, py::object k, py::object v, py::object out, py::object lse,
         py::object cu_seqlens_q, py::object cu_seqlens_k, py::object seqused_k,
         int64_t max_seqlen_q, float scale, float softcap, int64_t window_left,
         int64_t window_right, int64_t diag_offset, bool bottom_right, uintptr_t stream) {
        cuda::AttentionCudaArgs a =
            make_cuda_args(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, 0, scale,
                           softcap, window_left, window_right, diag_offset, bottom_right, stream);
        const TensorView o = to_view(out, "out"), l = to_view(lse, "lse");
        py::gil_scoped_release release;
        cuda::attention_forward_cuda(a, o, l);
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"),
      py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"), py::arg("seqused_k"),
      py::arg("max_seqlen_q"), py::arg("scale"), py::arg("softcap"), py::arg("window_left"),
      py::arg("window_right"), py::arg("diag_offset"), py::arg("bottom_right"), py::arg("stream"),
      "CUDA fused attention forward (fp16/bf16, head dim 64/128) on the given stream.");
  m.def(
      "attention_backward_cuda",
      [](py::object q, py::object k, py::object v, py::object out, py::object dout, py::object lse,
         py::object delta, py::object dq, py::object dk, py::object dv, py::object cu_seqlens_q,
         py::object cu_seqlens_k, py::object seqused_k, int64_t max_seqlen_q,
         int64_t max_seqlen_k, float scale, float softcap, int64_t window_left,
         int64_t window_right, int64_t diag_offset, bool bottom_right, uintptr_t stream) {
        cuda::AttentionCudaArgs a = make_cuda_args(
            q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, scale,
            softcap, window_left, window_right, diag_offset, bottom_right, stream);
        const TensorView o = to_view(out, "out"), d = to_view(dout, "grad_out");
        const TensorView l = to_view(lse, "lse"), de = to_view(delta, "delta");
        const TensorView gq = to_view(dq, "dq"), gk = to_view(dk, "dk"), gv = to_view(dv, "dv");
        py::gil_scoped_release release;
        cuda::attention_backward_cuda(a, o, d, l, de, gq, gk, gv);
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("dout"), py::arg("lse"),
      py::arg("delta"), py::arg("dq"), py::arg("dk"), py::arg("dv"), py::arg("cu_seqlens_q"),
      py::arg("cu_seqlens_k"), py::arg("seqused_k"), py::arg("max_seqlen_q"),
      py::arg("max_seqlen_k"), py::arg("scale"), py::arg("softcap"), py::arg("window_left"),
      py::arg("window_right"), py::arg("diag_offset"), py::arg("bottom_right"), py::arg("stream"),
      "CUDA fused attention backward (FlashAttention-2; delta is a float32 workspace).");

  m.def(
      "quant_matmul_cuda",
      [](int scheme, py::object x, py::object qdata, py::object scales, py::object zeros,
         py::object bias, py::object out, uintptr_t workspace, int64_t group_size,
         uintptr_t stream) {
        const TensorView xv = to_view(x, "x"), qv = to_view(qdata, "qdata");
        const TensorView sv = to_view(scales, "scales"), zv = to_view(zeros, "zeros");
        const TensorView bv = to_view(bias, "bias"), ov = to_view(out, "out");
        py::gil_scoped_release release;
        cuda::quant_matmul_cuda(scheme, xv, qv, sv, zv, bv, ov, workspace, group_size, stream);
      },
      py::arg("scheme"), py::arg("x"), py::arg("qdata"), py::arg("scales"), py::arg("zeros"),
      py::arg("bias"), py::arg("out"), py::arg("workspace"), py::arg("group_size"),
      py::arg("stream"),
      "CUDA quantized matmul out = x @ dequantize(W)^T (+ bias); scheme 0 int8, 1 int4, 2 w8a8.");
  m.def("quant_matmul_cuda_workspace_bytes", &cuda::quant_matmul_cuda_workspace_bytes,
        py::arg("scheme"), py::arg("M"), py::arg("K"),
        "Device workspace bytes quant_matmul_cuda needs (w8a8: quantized activations + row scales).");
  m.def("quant_matmul_cuda_host_selftest", &cuda::quant_matmul_cuda_host_selftest,
        "Checks the CUDA quant_matmul index/unpacking helpers on the host; '' when all agree.");
  m.def(
      "adam_step_cuda",
      [](py::list tensors, float lr, float beta1, float beta2, float eps, float weight_decay,
         bool decoupled, bool amsgrad, bool maximize, float inv_grad_scale, double decay,
         double one_minus_beta1, double one_minus_beta2, uintptr_t stream,
         uintptr_t device_floats, std::vector<int32_t> rows) {
        const AdamHyper h = adam_hyper(lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad,
                                       maximize, inv_grad_scale, 1, decay, one_minus_beta1,
                                       one_minus_beta2, false);
        const std::vector<AdamTensor> ts = adam_tensors(tensors);
        py::gil_scoped_release release;
        cuda::adam_step_cuda(h, ts, stream, reinterpret_cast<const float*>(device_floats), rows);
      },
      "CUDA fused Adam/AdamW step (the CPU kernel's math; see csrc/cuda/optim.h). "
      "device_floats (0: none) and rows: a capturable step's per-step floats in device memory.");
  m.def(
      "adam8bit_step_cuda",
      [](py::list tensors, float eps, float weight_decay, float beta2, bool maximize,
         float inv_grad_scale, double decay, double one_minus_beta1, double one_minus_beta2,
         uintptr_t stream, uintptr_t device_floats, std::vector<int32_t> rows) {
        const AdamHyper h = adam_hyper(0.f, 0.f, beta2, eps, weight_decay, true, false, maximize,
                                       inv_grad_scale, 1, decay, one_minus_beta1,
                                       one_minus_beta2, false);
        const std::vector<Adam8bitTensor> ts = adam8bit_tensors(tensors);
        py::gil_scoped_release release;
        cuda::adam8bit_step_cuda(h, ts, stream, reinterpret_cast<const float*>(device_floats),
                                 rows);
      },
      "CUDA fused 8-bit AdamW step (the CPU kernel's math; see csrc/cuda/optim.h). "
      "device_floats (0: none) and rows: a capturable step's per-step floats in device memory.");
  m.def(
      "sgd_step_cuda",
      [](py::list tensors, float lr, float momentum, float dampening, float weight_decay,
         bool nesterov, bool maximize, float inv_grad_scale, double one_minus_dampening,
         uintptr_t stream) {
        const SgdHyper h = sgd_hyper(lr, momentum, dampening, weight_decay, nesterov, maximize,
                                     inv_grad_scale, 1, one_minus_dampening, false);
        const std::vector<SgdTensor> ts = sgd_tensors(tensors);
        py::gil_scoped_release release;
        cuda::sgd_step_cuda(h, ts, stream);
      },
      "CUDA fused SGD step (the CPU kernel's math; see csrc/cuda/optim.h).");
  m.def("optim_cuda_host_selftest", &cuda::optim_cuda_host_selftest,
        "Checks the CUDA optimizer launch plan on the host; '' when every chunk is covered once.");
#endif
}
