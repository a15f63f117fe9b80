"""AdamW8bit's Triton kernel (kernels/optim.py, _adam8bit_kernel): bit for bit the CPU
kernel's update (csrc/cpu/optim_impl.h, adam8bit_loop): parameters, codes and block scales,
over several steps. Without a GPU both run here (Triton in its interpreter); on a GPU the
Triton side runs there and its results are compared with the CPU kernel's on copies."""
import pytest
import torch

from llmkernels import backends
from llmkernels.optim import AdamW8bit
from llmkernels.optim.adam8bit import dequantize_moments
from optim_utils import (assert_same_but_nan_payloads, non_finite_8bit_run, run_steps,
                         triton_fma_rounds_once)

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KW = dict(lr=1e-2, weight_decay=0.1, min_8bit_size=256)
STATE_KEYS = ("exp_avg_codes", "exp_avg_sq_codes", "exp_avg_scales", "exp_avg_sq_scales")


@pytest.mark.skipif(backends.native_module() is None, reason="needs the compiled CPU kernel")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("maximize", [False, True])
def test_triton_matches_the_cpu_kernel_bit_for_bit(dtype, maximize, monkeypatch):
    if not triton_fma_rounds_once():
        pytest.skip("this Triton interpreter's fma rounds twice (triton < 3.9): no bit-exact "
                    "comparison; test_triton_step_is_close_to_adamw still runs")
    from llmkernels.kernels import optim as ko
    launches = []
    real = ko.adam8bit_launch  # every step's launches, full or planned (optim/_plan.py)
    monkeypatch.setattr(ko, "adam8bit_launch", lambda *a, **k: launches.append(1) or real(*a, **k))
    # one block, a partial block, several programs with a ragged end, a 2-D tensor, and two
    # under min_8bit_size (float32 moments, also for 16-bit parameters: Triton's Adam kernel)
    sizes = [(256,), (700,), (8 * 256 * 2 + 300,), (33, 65), (100,), (7, 3)]
    params = [torch.randn(s).to(dtype) for s in sizes]
    # gradients spanning decades, and a zero block (its scale stays 0)
    steps = []
    for i in range(4):
        grads = [(torch.randn(s) * torch.exp(2 * torch.randn(s))).to(dtype) for s in sizes]
        grads[1].view(-1)[256:512] = 0
        # tiny moments (1 / absmax * 127^2 overflows float32); kept normal in bfloat16, whose
        # denormals triton 3.9's interpreter does not convert exactly
        tiny = (1 + torch.rand(256)) * torch.randn(256).sign() * 1e-36
        grads[2].view(-1)[512:768] = tiny.to(dtype)
        steps.append(grads)
    a, opt_a = run_steps(AdamW8bit, dict(KW, maximize=maximize), params, steps, "cpu", "cpu")
    b, opt_b = run_steps(AdamW8bit, dict(KW, maximize=maximize), params, steps, DEVICE, "triton")
    assert len(launches) == len(steps)  # the Triton kernel served every step
    for pa, pb in zip(a, b):
        assert torch.equal(pa.detach(), pb.detach().cpu())
        keys = STATE_KEYS if pa.numel() >= 256 else ("exp_avg", "exp_avg_sq")
        for key in keys:
            assert torch.equal(opt_a.state[pa][key], opt_b.state[pb][key].cpu()), key


@pytest.mark.skipif(backends.native_module() is None, reason="needs the compiled CPU kernel")
def test_triton_codes_non_finite_gradients_as_the_cpu_kernel():
    """A NaN and an infinity in two blocks' gradients: the same codes, scales (NaN where NaN:
    the GPU's float max would have dropped the NaN) and parameters as the CPU kernel."""
    if not triton_fma_rounds_once():
        pytest.skip("this Triton interpreter's fma rounds twice (triton < 3.9)")
    (a,), opt_a = non_finite_8bit_run("cpu", "cpu")
    (b,), opt_b = non_finite_8bit_run(DEVICE, "triton")
    assert opt_a.state[a]["exp_avg_scales"].isnan().any()
    assert_same_but_nan_payloads(a.detach(), b.detach())
    for key in STATE_KEYS:
        assert_same_but_nan_payloads(opt_a.state[a][key], opt_b.state[b][key])


def test_triton_step_is_close_to_adamw():
    torch.manual_seed(3)
    p = torch.randn(5000)
    steps = [[torch.randn(5000) * 1e-1] for _ in range(20)]
    (b,), opt = run_steps(AdamW8bit, KW, [p], steps, DEVICE, "triton")
    q = p.clone().requires_grad_()
    ref = torch.optim.AdamW([q], lr=1e-2, weight_decay=0.1)
    for (g,) in steps:
        q.grad = g
        ref.step()
    assert (b.detach().cpu() - q.detach()).abs().max() <= 2e-2 * q.detach().abs().max()
    m8, _ = dequantize_moments(opt.state[b])
    m = ref.state[q]["exp_avg"]
    assert (m8.cpu() - m).abs().max() <= 0.06 * m.abs().max()


def test_bad_state_is_refused():
    from llmkernels.kernels import optim as ko
    p = torch.zeros(300, device=DEVICE)
    codes = torch.zeros(300, dtype=torch.int8, device=DEVICE)
    scales = torch.zeros(2, device=DEVICE)
    with pytest.raises(ValueError, match="state tensor 0"):
        ko.adam8bit_step([p], [p.clone()], [codes], [codes.view(torch.uint8)], [scales],
                         [torch.zeros(1, device=DEVICE)], [1e-3], [1.0], beta2=0.999, eps=1e-8,
                         maximize=False, inv_grad_scale=1.0, decay=1.0, one_minus_beta1=0.1,
                         one_minus_beta2=0.001)
