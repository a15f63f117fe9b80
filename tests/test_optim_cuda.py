"""The CUDA optimizer kernels (csrc/cuda/optim.cu): bit for bit the C++ CPU kernels' updates
(parameters and state) for AdamW / Adam / SGD and AdamW8bit, over several steps, on tensor
lists that take several launches (more tensors than a launch's table, tensors longer than a
launch's blocks). The launch plan's bookkeeping is checked on the host wherever the extension
was built with CUDA; the kernels need a GPU."""
import pytest
import torch

import llmkernels
from llmkernels import backends, optim
from optim_utils import assert_same_but_nan_payloads, non_finite_8bit_run, run_steps

native = backends.native_module()
HAS_CUDA_KERNELS = native is not None and hasattr(native, "adam_step_cuda")
needs_gpu = pytest.mark.skipif(not (HAS_CUDA_KERNELS and torch.cuda.is_available()),
                               reason="needs a GPU and the CUDA build")

# 30 tensors (> 24 per launch), one of 2048 * 170 + 5 elements (86 chunks: blocks of 16 chunks,
# the last one ragged). Launches of more than 320 blocks: optim_cuda_host_selftest.
SIZES = [(1,), (255,), (2048,), (2049,), (33, 65), (2048 * 170 + 5,)] + [(7 * i + 3,) for i in range(24)]
CASES = [
    (optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    (optim.AdamW, dict(lr=1e-2, amsgrad=True, maximize=True)),
    (optim.Adam, dict(lr=1e-2, weight_decay=0.1)),
    (optim.SGD, dict(lr=1e-2, momentum=0.9, weight_decay=0.01)),
    (optim.SGD, dict(lr=1e-2, momentum=0.9, nesterov=True)),
    (optim.SGD, dict(lr=1e-2, momentum=0.9, dampening=0.3)),
    (optim.SGD, dict(lr=1e-2)),
    (optim.AdamW8bit, dict(lr=1e-2, weight_decay=0.1, min_8bit_size=256)),
]


@pytest.mark.skipif(not HAS_CUDA_KERNELS, reason="the extension was built without CUDA")
def test_launch_plan_covers_every_chunk_once():
    assert native.optim_cuda_host_selftest() == ""


@pytest.mark.skipif(not HAS_CUDA_KERNELS, reason="the extension was built without CUDA")
def test_capturable_rows_are_checked_before_any_launch():
    """The capturable steps' table rows (one per tensor, >= 0, only with a table): refused
    with a clear error, on the host (an empty tensor list launches nothing)."""
    hyper = (0.0, 0.9, 0.99, 1e-8, 0.0, True, False, False, 1.0, 1.0, 0.1, 0.01, 0)
    native.adam_step_cuda([], *hyper, 0, [])
    with pytest.raises(RuntimeError, match="one row per tensor"):
        native.adam_step_cuda([], *hyper, 0, [3])
    eight = (1e-8, 0.0, 0.99, False, 1.0, 1.0, 0.1, 0.01, 0)
    native.adam8bit_step_cuda([], *eight, 0, [])
    with pytest.raises(RuntimeError, match="one row per tensor"):
        native.adam8bit_step_cuda([], *eight, 0, [1])


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("make,kw", CASES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_cuda_kernels_match_the_cpu_kernels_bit_for_bit(make, kw, dtype):
    torch.manual_seed(0)
    # AdamW8bit: tensors under min_8bit_size keep float32 moments (16-bit parameters too).
    params = [torch.randn(s).to(dtype) for s in SIZES]
    grads = [[torch.randn(p.shape).to(dtype) for p in params] for _ in range(3)]
    a, opt_a = run_steps(make, kw, params, grads, "cpu", "cpu")
    b, opt_b = run_steps(make, kw, params, grads, "cuda", "cuda")
    for pa, pb in zip(a, b):
        assert torch.equal(pa.detach(), pb.detach().cpu())
        for key, value in opt_a.state[pa].items():
            if isinstance(value, torch.Tensor) and key != "step":
                assert torch.equal(value, opt_b.state[pb][key].cpu()), key


@needs_gpu
def test_cuda_8bit_kernel_codes_non_finite_gradients_as_the_cpu_kernel():
    """Block scales are bit-pattern maxima on every path: a NaN gradient makes its block's scale
    NaN on the GPU too (fmaxf would have dropped it), and an infinity's block NaN a step on."""
    (a,), opt_a = non_finite_8bit_run("cpu", "cpu")
    (b,), opt_b = non_finite_8bit_run("cuda", "cuda")
    assert opt_a.state[a]["exp_avg_scales"].isnan().any()
    assert_same_but_nan_payloads(a.detach(), b.detach())
    for key in ("exp_avg_codes", "exp_avg_sq_codes", "exp_avg_scales", "exp_avg_sq_scales"):
        assert_same_but_nan_payloads(opt_a.state[a][key], opt_b.state[b][key])


@needs_gpu
def test_stochastic_rounding_cannot_be_forced_on_cuda():
    p = torch.randn(10, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    p.grad = torch.randn_like(p)
    opt = optim.AdamW([p], stochastic_rounding=True)
    with llmkernels.use_backend("cuda"), pytest.raises(llmkernels.BackendError, match="cuda"):
        opt.step()


@needs_gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("make,kw", [(optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
                                     (optim.SGD, dict(lr=1e-2, momentum=0.9)),
                                     (optim.AdamW8bit, dict(lr=1e-2, min_8bit_size=256))])
def test_clipping_folded_into_gpu_steps_is_the_cpu_kernels(make, kw, backend):
    """clip_grad_norm_(..., optimizer=) folds its factor into the step's gradient multiplier
    on the GPU paths as on the CPU: the CPU kernel's parameters, bit for bit (the norms are
    torch's on each device, so equal factors are checked first)."""
    torch.manual_seed(1)
    params = [torch.randn(s) for s in SIZES[:8]]
    grads = [[torch.randn(p.shape) for p in params] for _ in range(3)]
    runs = {}
    for device, path in (("cpu", "cpu"), ("cuda", backend)):
        ps = [p.clone().to(device).requires_grad_() for p in params]
        opt = make(ps, **kw)
        norms = []
        with llmkernels.use_backend(path):
            for gs in grads:
                for p, g in zip(ps, gs):
                    p.grad = g.to(device)
                norms.append(float(optim.clip_grad_norm_(ps, 0.5, optimizer=opt)))
                opt.step()
        runs[device] = ps, norms
    (a, na), (b, nb) = runs["cpu"], runs["cuda"]
    # float32 sums of squares in another order: 2.3e-6 apart on an H200 (2026-11-28)
    torch.testing.assert_close(na, nb, rtol=1e-5, atol=0)
    if na == nb:
        for pa, pb in zip(a, b):
            assert torch.equal(pa.detach(), pb.detach().cpu())
    else:  # the norms' last bits differ between devices: the factors too
        for pa, pb in zip(a, b):
            torch.testing.assert_close(pa.detach(), pb.detach().cpu(), rtol=1e-5, atol=1e-6)
