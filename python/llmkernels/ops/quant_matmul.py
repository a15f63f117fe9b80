"""quant_matmul(x, qweight, bias): x (..., K) times a quantized weight's transpose, without
materializing the float weight. Validation, path selection (backends.py), and the kernels
registered as torch custom ops (with a backward for x, so quantized base layers can be
fine-tuned around, QLoRA style)."""
from __future__ import annotations

from typing import Optional

import torch

from .. import backends
from .._cuda_launch import device_guard, stream_handle
from .._cview import DTYPE_CODES, cview
from ..quantized_weight import SCHEME_CODES, QuantizedWeight
from ..reference.quant_matmul import dequantize_reference, quant_matmul_reference
from .attention import _needs_dispatcher, _recorded, kernels_blocked
from .attention_gpu import triton_interpreting
from .workspace import workspace

OP_NAME = "quant_matmul"
_X_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_SCHEMES_BY_CODE = {v: k for k, v in SCHEME_CODES.items()}
_WORKSPACE_BYTES: dict = {}  # CPU kernel workspace sizes by call shape (a query costs ~3 us)


# ---------------------------------------------------------------- kernels as custom ops

def _workspace(nbytes: int, device: torch.device) -> torch.Tensor:
    if device.type != "cpu":
        return torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)
    return workspace(nbytes)


# The CPU kernels' workspace holds x's rows converted (up to 8 bytes a value): a call with many
# rows runs in slabs of rows whose workspace stays near CPU_SLAB_BYTES (524k rows of K = 4096
# asked for 16 GiB at once), of at least CPU_SLAB_MIN_ROWS rows: those cost nothing measurable
# (4096 x 4096, bf16 x, M = 4096 in slabs of 256-1024 rows ran at 0.92-1.05x the whole call's
# speed, noise, on the Zen 4 here): each slab re-reads the weights, hundreds of multiply-adds
# a byte.
CPU_SLAB_BYTES = 64 << 20
CPU_SLAB_MIN_ROWS = 256


def _cpu_workspace_bytes(native, tier: str, code: int, xv, weight, yv, group_size: int,
                         threads: int) -> int:
    """xv, yv: cviews of x (M, K) and out (M, N)."""
    # The size depends on the key's items alone; the kernel checks it again (a stale entry
    # raises).
    key = (tier, code, xv[2][0], xv[2][1], yv[2][1], xv[1], group_size, threads,
           weight[3] is not None)
    nbytes = _WORKSPACE_BYTES.get(key)
    if nbytes is None:
        nbytes = native.quant_matmul_workspace_bytes(tier, code, xv, *weight, yv, group_size,
                                                     threads)
        if len(_WORKSPACE_BYTES) >= 4096:
            _WORKSPACE_BYTES.clear()
        _WORKSPACE_BYTES[key] = nbytes
    return nbytes


def _run_cpu(x2d, qdata, scales, zeros, bias, out, scheme: str, group_size: int) -> None:
    native = backends.native_module()
    tier, threads, code = backends.cpu_tier_code(), backends.cpu_threads(), SCHEME_CODES[scheme]
    weight = (cview(qdata), cview(scales), cview(zeros), cview(bias))

    M = x2d.shape[0]
    xv, yv = cview(x2d), cview(out)
    nbytes = _cpu_workspace_bytes(native, tier, code, xv, weight, yv, group_size, threads)
    if nbytes <= CPU_SLAB_BYTES or M < 2 * CPU_SLAB_MIN_ROWS:  # one call (decoding: always)
        ws = _workspace(nbytes, x2d.device)
        native.quant_matmul(tier, code, xv, *weight, yv, group_size, threads, ws.data_ptr(),
                            nbytes)
        return

    def workspace_bytes(x, y) -> int:
        return _cpu_workspace_bytes(native, tier, code, cview(x), weight, cview(y), group_size,
                                    threads)

    # bytes = fixed + rows x per_row (per-thread scratch, then the rows' buffers)
    least = workspace_bytes(x2d[:CPU_SLAB_MIN_ROWS], out[:CPU_SLAB_MIN_ROWS])
    per_row = max(1, (nbytes - least) // (M - CPU_SLAB_MIN_ROWS))
    rows = CPU_SLAB_MIN_ROWS + max(0, CPU_SLAB_BYTES - least) // per_row
    slabs = max(1, M // rows)
    rows = -(-M // slabs)  # equal slabs of at least the rows above (the last may be shorter)
    last = M - (slabs - 1) * rows
    nbytes = max(workspace_bytes(x2d[:rows], out[:rows]), workspace_bytes(x2d[:last], out[:last]))
    ws = _workspace(nbytes, x2d.device)
    for r0 in range(0, M, rows):
        native.quant_matmul(tier, code, cview(x2d[r0:r0 + rows]), *weight,
                            cview(out[r0:r0 + rows]), group_size, threads, ws.data_ptr(), nbytes)


def _run_kernel(impl: str, x2d, qdata, scales, zeros, bias, out, scheme: str, group_size: int):
    if impl == "reference":
        out.copy_(quant_matmul_reference(x2d, scheme, qdata, scales, zeros, group_size, bias))
    elif impl == "cpu":
        _run_cpu(x2d, qdata, scales, zeros, bias, out, scheme, group_size)
    elif impl == "cuda":
        native = backends.native_module()
        code = SCHEME_CODES[scheme]
        M, K = x2d.shape
        nbytes = native.quant_matmul_cuda_workspace_bytes(code, M, K)
        ws = _workspace(nbytes, x2d.device) if nbytes else None
        with device_guard(x2d.device):
            native.quant_matmul_cuda(code, cview(x2d), cview(qdata), cview(scales), cview(zeros),
                                     cview(bias), cview(out), ws.data_ptr() if ws is not None else 0,
                                     group_size, stream_handle(x2d.device))
    else:
        kernels, error = backends.triton_kernels_or_error("quant_matmul")
        if kernels is None:
            raise backends.BackendError(f"{OP_NAME}: Triton is unavailable: {error}")
        with device_guard(x2d.device):
            if scheme == "int8":
                kernels.int8_matmul(x2d, qdata, scales, bias, out)
            elif scheme == "int4":
                kernels.int4_matmul(x2d, qdata, scales, zeros, group_size, bias, out)
            else:
                kernels.w8a8_matmul(x2d, qdata, scales, bias, out)


def _quant_matmul_kernel(x2d: torch.Tensor, qdata: torch.Tensor, scales: torch.Tensor,
                         zeros: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                         scheme_code: int, group_size: int, impl: str) -> torch.Tensor:
    """out (M, N) = x2d (M, K) @ dequantize(W)^T (+ bias) on path impl (cpu, triton, cuda,
    reference)."""
    out = x2d.new_empty((x2d.shape[0], qdata.shape[0]))
    if out.numel() == 0:
        return out
    if x2d.shape[1] == 0:
        out.zero_()
        return out if bias is None else out.add_(bias)
    if x2d.stride(-1) != 1 or x2d.is_neg():
        x2d = x2d.resolve_neg().contiguous()
    # The kernels read packed weights and the bias as dense rows (no-ops for the usual
    # contiguous ones; Triton's launcher took a strided bias's stride as 1).
    # (resolve_neg: a negated view's memory holds the values before the negation)
    qdata, scales = qdata.resolve_neg().contiguous(), scales.resolve_neg().contiguous()
    zeros = None if zeros is None else zeros.resolve_neg().contiguous()
    bias = None if bias is None else bias.resolve_neg().contiguous()
    _run_kernel(impl, x2d, qdata, scales, zeros, bias, out, _SCHEMES_BY_CODE[scheme_code],
                group_size)
    return out


quant_matmul_op = torch.library.custom_op("llmkernels::quant_matmul", mutates_args=())(
    _quant_matmul_kernel)


@quant_matmul_op.register_fake
def _(x2d, qdata, scales, zeros, bias, scheme_code, group_size, impl):
    return x2d.new_empty((x2d.shape[0], qdata.shape[0]))


def _setup(ctx, inputs, output):
    x2d, qdata, scales, zeros, bias, scheme_code, group_size, _ = inputs
    ctx.save_for_backward(qdata, scales, zeros)
    ctx.meta = (scheme_code, group_size, x2d.dtype, bias is not None, inputs[-1])


# Off the CPU kernels' path, the backward dequantizes the weight a slice of output rows at a
# time, this many bytes of float32 at most: training through a quantized layer (QLoRA style)
# never forms the whole float weight, which would cost 4-8x the quantized one. The CPU kernel
# (csrc/cpu/quant_matmul_grad.h) dequantizes panels that stay in its cache instead.
BACKWARD_SLICE_BYTES = 16 << 20


@torch.library.custom_op("llmkernels::quant_matmul_grad_x", mutates_args=())
def _grad_x_cpu_op(g: torch.Tensor, qdata: torch.Tensor, scales: torch.Tensor,
                   zeros: Optional[torch.Tensor], scheme_code: int, group_size: int,
                   K: int) -> torch.Tensor:
    """grad_x (M, K) float32 = g (M, N) (float32 or bfloat16) @ dequantize(W), on the CPU
    kernel."""
    native = backends.native_module()
    tier, threads = backends.cpu_tier_code(), backends.cpu_threads()
    # dense packed rows, as the forward reads them (saved as given: a column-major qdata)
    qdata, scales = qdata.contiguous(), scales.contiguous()
    zeros = None if zeros is None else zeros.contiguous()
    grad_x = g.new_empty((g.shape[0], K), dtype=torch.float32)
    args = (cview(g), cview(qdata), cview(scales), cview(zeros), cview(grad_x), group_size,
            threads)
    nbytes = native.quant_matmul_grad_x_workspace_bytes(tier, scheme_code, *args)
    ws = _workspace(nbytes, g.device)
    native.quant_matmul_grad_x(tier, scheme_code, *args, ws.data_ptr(), nbytes)
    return grad_x


@_grad_x_cpu_op.register_fake
def _(g, qdata, scales, zeros, scheme_code, group_size, K):
    return g.new_empty((g.shape[0], K), dtype=torch.float32)


def _grad_x_setup(ctx, inputs, output):
    g, qdata, scales, zeros, scheme_code, group_size, _ = inputs
    ctx.save_for_backward(qdata, scales, zeros)
    ctx.meta = (scheme_code, group_size, g.dtype)


def _grad_x_backward(ctx, grad):
    # Second-order gradients (gradient penalties, Hessian-vector products): the gradient is
    # linear in g, g @ W, so its own is grad @ W^T: the forward product, with w8a8's weight
    # as int8 (float products; the activation rounding is straight through).
    qdata, scales, zeros = ctx.saved_tensors
    scheme_code, group_size, dtype = ctx.meta
    if not ctx.needs_input_grad[0]:
        return None, None, None, None, None, None, None
    code = SCHEME_CODES["int8"] if scheme_code == SCHEME_CODES["w8a8"] else scheme_code
    out = quant_matmul_op(grad.float().contiguous(), qdata, scales, zeros, None, code,
                          group_size, "cpu")
    return out.to(dtype), None, None, None, None, None, None


_grad_x_cpu_op.register_autograd(_grad_x_backward, setup_context=_grad_x_setup)


def _grad_x_cpu(g: torch.Tensor, qdata, scales, zeros, scheme: str, group_size: int,
                K: int) -> torch.Tensor:
    return _grad_x_cpu_op(g, qdata, scales, zeros, SCHEME_CODES[scheme], group_size, K)


# Devices whose sliced backward multiplies 16-bit gradients in their own dtype, as nn.Linear's
# backward does (tensor cores), each slice's product added into float32: float32 products of
# a 4096 x 4096 layer's gradient for 4096 tokens took 3.1 ms on an H200 against nn.Linear's
# 0.18 ms (2026-11-28).
LOW_PRECISION_PRODUCTS = ("cuda",)


def _grad_x_sliced(g: torch.Tensor, qdata, scales, zeros, scheme: str, group_size: int,
                   K: int) -> torch.Tensor:
    N = scales.shape[0]
    low = g.dtype in (torch.bfloat16, torch.float16) and g.device.type in LOW_PRECISION_PRODUCTS
    if not low:
        g = g.float()
    grad_x = g.new_zeros((g.shape[0], K), dtype=torch.float32)
    rows = max(1, BACKWARD_SLICE_BYTES // (4 * max(K, 1)))
    for n0 in range(0, N, rows):
        n1 = min(N, n0 + rows)
        w = dequantize_reference(scheme, qdata[n0:n1], scales[n0:n1],
                                 None if zeros is None else zeros[n0:n1], group_size)
        if low:
            grad_x.add_(g[:, n0:n1] @ w.to(g.dtype))
        else:
            grad_x.addmm_(g[:, n0:n1], w)
        del w  # before the next slice is made: one slice alive at a time
    return grad_x


def _backward(ctx, grad_out):
    # d out / d x = dequantized W (for w8a8: straight through the activation rounding).
    qdata, scales, zeros = ctx.saved_tensors
    scheme_code, group_size, dtype, has_bias, impl = ctx.meta
    grad_bias = grad_out.sum(0) if has_bias and ctx.needs_input_grad[4] else None
    if not ctx.needs_input_grad[0]:  # (a frozen input, a trained bias: no weight needed)
        return None, None, None, None, grad_bias, None, None, None
    scheme = _SCHEMES_BY_CODE[scheme_code]
    K = qdata.shape[1] * (2 if scheme == "int4" else 1)
    if impl == "cpu" and grad_out.device.type == "cpu":  # (bf16 products where the CPU has them)
        g = grad_out if grad_out.dtype in (torch.float32, torch.bfloat16) else grad_out.float()
        grad_x = _grad_x_cpu(g.resolve_neg(), qdata, scales, zeros, scheme, group_size, K)
    else:
        grad_x = _grad_x_sliced(grad_out.resolve_neg(), qdata, scales, zeros, scheme,
                                group_size, K)
    return grad_x.to(dtype), None, None, None, grad_bias, None, None, None


quant_matmul_op.register_autograd(_backward, setup_context=_setup)


# ---------------------------------------------------------------- validation and selection

def _validate(x, qweight, bias) -> None:
    if not isinstance(qweight, QuantizedWeight):
        raise TypeError(f"{OP_NAME}: qweight must be a llmkernels.QuantizedWeight (from "
                        f"quantize_weight), got {type(qweight).__name__}")
    qweight.validate(OP_NAME)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{OP_NAME}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _X_DTYPES:
        raise TypeError(f"{OP_NAME}: x must be float32, bfloat16 or float16, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != qweight.in_features:
        raise ValueError(f"{OP_NAME}: x's last dim must be in_features={qweight.in_features}, "
                         f"got shape {tuple(x.shape)}")
    if x.device != qweight.device:
        raise ValueError(f"{OP_NAME}: x is on {x.device}, the weight on {qweight.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (qweight.out_features,):
            raise ValueError(f"{OP_NAME}: bias must be a ({qweight.out_features},) tensor")
        if bias.dtype != x.dtype:
            raise TypeError(f"{OP_NAME}: bias dtype {bias.dtype} != x dtype {x.dtype}")
        if bias.device != x.device:
            raise ValueError(f"{OP_NAME}: bias is on {bias.device}, x on {x.device}")


# Automatic choice on CUDA GPUs: the CUDA GEMV for up to this many rows (its whole range;
# timed at M = 1 on an H100, 2026-11-26, eager calls: 55-67 us against Triton's 95-135 us for
# a 4096x11008 weight), Triton beyond (its tiled GEMM is 3.5x the CUDA WMMA GEMM at M = 4096).
CUDA_AUTO_MAX_ROWS = 8
# The CUDA GEMM (more rows than its GEMV's 8) has N / 64 blocks in its grid's y: at most 65535.
CUDA_GEMM_MAX_N = 64 * 65535

# w8a8 sums int8 x int8 products in int32: exact while K * 127^2 < 2^31.
MAX_W8A8_K = (2**31 - 1) // (127 * 127)


def _too_long(qweight: QuantizedWeight) -> Optional[str]:
    if qweight.scheme == "w8a8" and qweight.in_features > MAX_W8A8_K:
        return (f"w8a8 with in_features > {MAX_W8A8_K} could overflow the int32 sums; "
                "the reference sums in float64")
    return None


def _checks(x: torch.Tensor, qweight: QuantizedWeight, backend: Optional[str]):
    def too_long() -> Optional[str]:
        return _too_long(qweight)

    def cpu() -> Optional[str]:
        if too_long():
            return too_long()
        native = backends.native_module()
        if native is None:
            return f"the compiled extension is not available ({backends.native_import_error()})"
        if x.device.type != "cpu":
            return f"tensors are on {x.device.type}"
        return None

    def triton() -> Optional[str]:
        if too_long():
            return too_long()
        error = backends.triton_unavailable("quant_matmul")
        if error is not None:
            return error
        if x.device.type != "cuda" and not triton_interpreting():
            return (f"tensors are on {x.device.type} (Triton runs on CUDA GPUs, or on the CPU "
                    "under TRITON_INTERPRET=1)")
        return None

    def cuda() -> Optional[str]:
        if too_long():
            return too_long()
        native = backends.native_module()
        if native is None or not hasattr(native, "quant_matmul_cuda"):
            return "this build has no CUDA kernels (nvcc was not found when it was built)"
        if x.device.type != "cuda":
            return f"tensors are on {x.device.type}"
        if x.dtype == torch.float32:
            return "float32 activations are not a CUDA kernel dtype (bf16, fp16; Triton takes fp32)"
        rows = x.numel() // max(x.shape[-1], 1)
        if rows > CUDA_AUTO_MAX_ROWS and qweight.out_features > CUDA_GEMM_MAX_N:
            return (f"N = {qweight.out_features} > {CUDA_GEMM_MAX_N} with more than "
                    f"{CUDA_AUTO_MAX_ROWS} rows (the CUDA GEMM's grid)")
        if (backends.forced_backend(backend) != "cuda" and triton() is None
                and rows > CUDA_AUTO_MAX_ROWS):
            return (f"more than {CUDA_AUTO_MAX_ROWS} rows: Triton's tiled GEMM is faster there "
                    "(H100: 0.65x against 0.18x bf16 cuBLAS at M=4096; backend='cuda' forces it)")
        return None
    return {"cpu": cpu, "triton": triton, "cuda": cuda}


def cpu_int8_activations(x: torch.Tensor, qweight: QuantizedWeight) -> bool:
    """Whether the CPU kernel serves this call with x quantized to int8 per 32 values
    (bfloat16 x only, AVX2 / AVX-512 tiers: decoding rows of int4 and int8 weights, use_int4_q8
    and use_int8_q8_rows; on AVX512-VNNI CPUs more rows packed, use_packed_q8; all in
    csrc/cpu/quant_matmul_impl.h, below the amx tier's tiles): the extension's own rule, read
    off the name of the kernel it runs for the call."""
    native = backends.native_module()
    if native is None or qweight.scheme not in ("int4", "int8") or x.dtype != torch.bfloat16:
        return False
    rows = x.numel() // max(x.shape[-1], 1)
    kernel = native.quant_matmul_kernel_name(backends.cpu_tier_code(), SCHEME_CODES[qweight.scheme],
                                             rows, x.shape[-1], DTYPE_CODES[x.dtype],
                                             int(qweight.group_size))
    return "x quantized to int8 per 32" in kernel


def _decide(x, qweight, backend, blocked: Optional[str],
            explain: bool = False) -> backends.Decision:
    """The path that serves the call (blocked: kernels_blocked's answer for it); with explain,
    each path's description too (built only then: forced-backend calls take this on every
    matmul)."""
    if not explain:
        return backends.select(OP_NAME, x.device.type, _checks(x, qweight, backend), backend,
                               blocked=blocked)
    native = backends.native_module()
    cpu_detail = ""
    if native is not None:
        rows = x.numel() // max(x.shape[-1], 1)
        kernel = native.quant_matmul_kernel_name(
            backends.cpu_tier_code(), SCHEME_CODES[qweight.scheme], rows, x.shape[-1],
            DTYPE_CODES.get(x.dtype, 0), int(qweight.group_size))
        cpu_detail = f"C++ kernels ({qweight.scheme}), CPU tier {backends.cpu_tier_label()}: {kernel}"
    if cpu_detail and cpu_int8_activations(x, qweight):
        cpu_detail += " (bfloat16 x only; float32 and float16 x keep float products)"
    detail = {"cpu": cpu_detail,
              "triton": "Triton kernels (dequantize in registers)",
              "cuda": "CUDA kernels (GEMV for up to 8 rows, tensor cores beyond)",
              "reference": ("x quantized per row, int8 products summed exactly (float64), "
                            "scaled" if qweight.scheme == "w8a8"
                            else "dequantize, then a float matmul")}
    return backends.select(OP_NAME, x.device.type, _checks(x, qweight, backend), backend, detail,
                           blocked)


def quant_matmul(x: torch.Tensor, qweight: QuantizedWeight, bias: Optional[torch.Tensor] = None,
                 backend: Optional[str] = None) -> torch.Tensor:
    """x (..., K) @ W^T (+ bias) for a quantized W (N, K): (..., N) in x's dtype.

    The float weight is never materialized on the kernel paths. Differentiable with respect to
    x and bias (the weight is frozen). backend: force "cpu", "triton", "cuda" or "reference".
    Under torch.autocast, x and bias are cast to its dtype first, as for F.linear.
    """
    blocked = kernels_blocked(x, bias)
    if backend is None and blocked is None:
        out = _cpu_eager(x, qweight, bias)
        if out is not None:
            return out
    x, bias = _autocast(x, bias)
    _validate(x, qweight, bias)
    if blocked is not None:
        _decide(x, qweight, backend, blocked)  # the reference path, or a forced one raises
        return _reference_in_torch_ops(x, qweight, bias)
    if backend is None and backends.forced_backend() is None:
        # The automatic choice, in select()'s order, without building an explanation (a
        # one-token GEMV takes tens of microseconds: the host's costs show).
        if x.device.type == "cpu":  # _checks' cpu(), without its closures
            cpu_ok = backends.native_module() is not None and _too_long(qweight) is None
            path = "cpu" if cpu_ok else "reference"
        else:
            checks = _checks(x, qweight, None)
            path = next(name for name in backends.CANDIDATES.get(x.device.type, ("reference",))
                        if name == "reference" or checks[name]() is None)
    else:
        path = _decide(x, qweight, backend, blocked).backend
    # The reference path goes through the op too: its backward is the kernels' (w8a8: straight
    # through the activation rounding; autograd through the reference's own ops would only
    # reach x through the per-row absmax of its scales).
    flat = x.dim() == 2  # (a reshape costs ~1 us a call; a decoding step makes hundreds)
    x2d = x if flat else x.reshape(-1, x.shape[-1])
    # Plain eager calls skip the dispatcher (~25 us, a tenth of a one-token GEMV).
    fn = quant_matmul_op if _needs_dispatcher(x2d, bias) else _quant_matmul_kernel
    out = fn(x2d, qweight.qdata, qweight.scales, qweight.zeros, bias,
             SCHEME_CODES[qweight.scheme], int(qweight.group_size), path)
    return out if flat else out.reshape(*x.shape[:-1], qweight.out_features)


def _reference_in_torch_ops(x, qweight, bias) -> torch.Tensor:
    """The reference path in PyTorch's ops alone, for calls the custom ops cannot take
    (kernels_blocked: torch.func transforms, forward-mode AD), with the kernels' gradients:
    w8a8's activation rounding passes x's gradient (and tangent) straight through, as the
    kernels' backward does. (Autograd keeps the float weight for the backward here, where the
    custom op dequantizes slices of it.)"""
    scheme, group_size = qweight.scheme, int(qweight.group_size)
    qdata, scales, zeros = qweight.qdata, qweight.scales, qweight.zeros
    if scheme != "w8a8":
        return quant_matmul_reference(x, scheme, qdata, scales, zeros, group_size, bias)
    # (x detached: its rounding, and its scales' absmax, pass no gradient; the zero added
    # carries x's, through the dequantized weight)
    out = quant_matmul_reference(x.detach(), scheme, qdata, scales, zeros, group_size, bias)
    xf = x.float()
    weight = dequantize_reference(scheme, qdata, scales, zeros, group_size)
    return out + ((xf - xf.detach()) @ weight.t()).to(out.dtype)


def _cpu_eager(x, qweight, bias) -> Optional[torch.Tensor]:
    """The call on the CPU kernel straight from here, or None where quant_matmul's general
    path must take it: another device or path, autograd, torch.compile, tensor subclasses or
    modes, autocast, a strided or negated x or bias, many rows or none, and anything its
    checks would refuse (they raise there, with their messages; the weight's own check runs
    here first, as there).

    A decoding step calls each linear layer once, and between the calls the model's own
    Python evicts the interpreter's state from the caches: there every step of the general
    path (autocast, the reshapes of x and the output, the selection, the custom-op checks)
    costs 2-3x what it costs in a loop (~60 us a call in a 125M model's decoding loop on the
    Zen 3, as much as the kernels). x and the output are handed to the kernel as (M, K) and
    (M, N) views without reshaping them."""
    if type(x) is not torch.Tensor or not x.is_cpu or torch.compiler.is_compiling():
        return None
    if bias is not None and type(bias) is not torch.Tensor and type(bias) is not torch.nn.Parameter:
        return None
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return None
    if (torch.is_autocast_enabled("cpu") or backends.forced_backend() is not None
            or not isinstance(qweight, QuantizedWeight)):
        return None
    if torch.overrides.has_torch_function((x,) if bias is None else (x, bias)):
        return None
    if _recorded():
        return None
    plan = _cpu_plan(qweight)
    if plan is None:
        return None
    weight, code, group_size, N, K = plan
    if (x.dtype not in _X_DTYPES or x.dim() < 1 or x.shape[-1] != K or not x.is_contiguous()
            or x.is_neg()):
        return None
    if bias is not None:
        if (bias.dtype != x.dtype or bias.shape != (N,) or not bias.is_cpu
                or not bias.is_contiguous() or bias.is_neg()):
            return None
        weight = (*weight[:3], cview(bias))
    M = x.numel() // K
    if M == 0 or M >= 2 * CPU_SLAB_MIN_ROWS:
        return None
    out = torch.empty(*x.shape[:-1], N, dtype=x.dtype)  # (int sizes: ~half new_empty's time)
    dtype = DTYPE_CODES[x.dtype]
    xv = (x.data_ptr(), dtype, (M, K), (K, 1))
    yv = (out.data_ptr(), dtype, (M, N), (N, 1))
    tier, threads = backends.cpu_tier_code(), backends.cpu_threads()
    native = backends.native_module()
    nbytes = _cpu_workspace_bytes(native, tier, code, xv, weight, yv, group_size, threads)
    ws = workspace(nbytes)
    native.quant_matmul(tier, code, xv, *weight, yv, group_size, threads, ws.data_ptr(), nbytes)
    return out


def _cpu_plan(qweight: QuantizedWeight):
    """What _cpu_eager hands the kernel for this weight: (cviews of its data, scales, zeros
    and no bias; the scheme's code; group size; N; K), or None where the general path must
    take its calls. Built once and kept while the weight's check (validate, which raises for
    a corrupted weight) still holds for the same tensors at the same addresses, contiguous:
    the checks and views cost ~5 us of a ~17 us call (a decoding step calls each layer once,
    a small model's kernels take 5-40 us)."""
    qweight.validate(OP_NAME)
    d = qweight.__dict__
    plan = d.get("_cpu_plan")
    qdata, scales, zeros = qweight.qdata, qweight.scales, qweight.zeros
    plain = all(t is None or (t.is_contiguous() and not t.is_neg()) for t in (qdata, scales, zeros))
    if (plan is not None and plain and plan[0] is d["_validated"]
            and plan[1] == qdata.data_ptr() and plan[2] == scales.data_ptr()
            and (zeros is None or plan[3] == zeros.data_ptr())):
        return plan[4]
    d.pop("_cpu_plan", None)
    N, K = qweight.shape
    if (not plain or backends.native_module() is None or not qdata.is_cpu or K == 0 or N == 0
            or _too_long(qweight) is not None):
        return None
    views = ((cview(qdata), cview(scales), cview(zeros), None), SCHEME_CODES[qweight.scheme],
             int(qweight.group_size), N, K)
    d["_cpu_plan"] = (d["_validated"], qdata.data_ptr(), scales.data_ptr(),
                      None if zeros is None else zeros.data_ptr(), views)
    return views


def _autocast(x, bias):
    """x and bias as F.linear takes them under torch.autocast: in its dtype (an nn.Linear
    gives bf16 there; a QuantLinear in its place must too)."""
    if not isinstance(x, torch.Tensor):
        return x, bias
    device = x.device.type
    # (meta has no autocast; dynamo of torch 2.11 cannot trace is_autocast_available, which
    # failed torch.compile(fullgraph=True) of quantized models on an H200, 2026-11-28)
    if (device == "meta" or not (torch.compiler.is_compiling()
                                 or torch.amp.is_autocast_available(device))
            or not torch.is_autocast_enabled(device)):
        return x, bias
    dtype = torch.get_autocast_dtype(device)
    if dtype not in _X_DTYPES or x.dtype not in _X_DTYPES:
        return x, bias

    def cast(t):
        return t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in _X_DTYPES else t
    return cast(x), cast(bias)


def _explain(x, qweight, bias=None, backend=None):
    x, bias = _autocast(x, bias)
    _validate(x, qweight, bias)
    return _decide(x, qweight, backend, kernels_blocked(x, bias), explain=True)


quant_matmul.__llmk_explain__ = _explain
