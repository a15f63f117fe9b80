"""Stochastic rounding of bfloat16 parameters in the Triton optimizer kernels
(kernels/optim.py, _sr_bf16): bit for bit the CPU kernel's (optim_impl.h, sr_bf16 with
sr_bits' stream), for Adam, AdamW and SGD over several steps. Without a GPU both run here
(Triton in its interpreter); on a GPU the Triton side runs there."""
import pytest
import torch

from llmkernels import backends, optim
from optim_utils import run_steps

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

MAKERS = {
    "AdamW": lambda ps, **kw: optim.AdamW(ps, lr=1e-3, weight_decay=0.1, **kw),
    "Adam": lambda ps, **kw: optim.Adam(ps, lr=1e-3, weight_decay=0.01, **kw),
    "SGD-momentum": lambda ps, **kw: optim.SGD(ps, lr=1e-2, momentum=0.9, **kw),
    "SGD": lambda ps, **kw: optim.SGD(ps, lr=1e-2, **kw),
}


@pytest.mark.skipif(backends.native_module() is None, reason="needs the compiled CPU kernel")
@pytest.mark.parametrize("name", list(MAKERS))
def test_triton_stochastic_rounding_matches_the_cpu_kernel(name, monkeypatch):
    from llmkernels.kernels import optim as ko
    launches = []
    for fn in ("adam_launch", "sgd_launch"):  # full steps and planned ones (optim/_plan.py)
        real = getattr(ko, fn)
        monkeypatch.setattr(ko, fn, lambda *a, _real=real, **k: launches.append(k.get("sr_keys"))
                            or _real(*a, **k))
    torch.manual_seed(0)
    # several tensors per launch, a ragged tail, more than one program per tensor
    sizes = [(3000,), (257,), (33, 65), (1,)]
    params = [torch.randn(s).to(torch.bfloat16) for s in sizes]
    steps = [[(torch.randn(s) * 1e-2).to(torch.bfloat16) for s in sizes] for _ in range(3)]
    kw = dict(stochastic_rounding=True, seed=3)
    a, _ = run_steps(MAKERS[name], kw, params, steps, "cpu", "cpu")
    b, _ = run_steps(MAKERS[name], kw, params, steps, DEVICE, "triton")
    assert len(launches) == len(steps)  # Triton served every step,
    assert all(k is not None for k in launches)  # with keys
    for pa, pb in zip(a, b):
        assert torch.equal(pa.detach().view(torch.int16), pb.detach().cpu().view(torch.int16))
    # and not round to nearest: the same steps without the option differ
    c, _ = run_steps(MAKERS[name], {}, params, steps, DEVICE, "triton")
    assert any(not torch.equal(pa.detach(), pc.detach().cpu()) for pa, pc in zip(a, c))


def test_keys_need_bfloat16_parameters():
    from llmkernels.kernels import optim as ko
    p = torch.zeros(8, device=DEVICE)
    with pytest.raises(ValueError, match="bfloat16"):
        ko.sgd_step([p], [p.clone()], [None], [False], lr=0.1, momentum=0.0, dampening=0.0,
                    weight_decay=0.0, nesterov=False, maximize=False, inv_grad_scale=1.0,
                    one_minus_dampening=1.0, sr_keys=[1])
