"""llmkernels.explain(optimizer.step): which path each param group's step takes, and why the
others do not; it must say what the step then does."""
import pytest
import torch

import llmkernels
from llmkernels import optim
from llmkernels.optim import _fused

pytestmark = pytest.mark.skipif(llmkernels.backends.native_module() is None,
                                reason="compiled extension not available")


def _routes(monkeypatch):
    """The paths the steps' route() calls return, in order."""
    taken = []
    real = _fused.route

    def recording(*args, **kwargs):
        path, views = real(*args, **kwargs)
        taken.append(path)
        return path, views
    monkeypatch.setattr(_fused, "route", recording)
    return taken


def _params(dtype, contiguous=True):
    torch.manual_seed(0)
    ps = [torch.randn(64, 80, dtype=dtype), torch.randn(300, dtype=dtype)]
    if not contiguous:
        ps = [torch.randn(80, 64, dtype=dtype).t(), torch.randn(600, dtype=dtype)[::2]]
    return [p.requires_grad_() for p in ps]


MAKERS = [lambda ps: optim.AdamW(ps, lr=1e-3), lambda ps: optim.Adam(ps, lr=1e-3, amsgrad=True),
          lambda ps: optim.SGD(ps, lr=1e-2, momentum=0.9),
          lambda ps: optim.AdamW8bit(ps, lr=1e-3, min_8bit_size=1000)]


@pytest.mark.parametrize("make", MAKERS)
@pytest.mark.parametrize("dtype,contiguous,want", [(torch.bfloat16, True, "cpu"),
                                                   (torch.float32, False, "reference"),
                                                   (torch.float64, True, "reference")])
def test_explain_says_what_the_step_does(monkeypatch, make, dtype, contiguous, want):
    ps = _params(dtype, contiguous)
    opt = make(ps)
    before = llmkernels.explain(opt.step)
    assert all("no gradients yet" in d.detail for d in before)
    for p in ps:
        p.grad = torch.randn_like(p)
    decisions = llmkernels.explain(opt.step)
    taken = _routes(monkeypatch)
    opt.step()
    assert [d.backend for d in decisions] == taken == [d.backend for d in before]
    assert set(taken) == {want}
    text = str(decisions)
    if want == "reference":
        why = "is not contiguous" if not contiguous else "torch.float64"
        assert all(why in d.rejected["cpu"] for d in decisions), text
    else:
        assert "reference" in decisions[0].rejected and not decisions[0].detail


def test_explain_adamw8bit_tells_its_two_kinds_of_state_apart():
    ps = _params(torch.float32)  # 5120 values: 8-bit state; 300: float32 moments
    decisions = llmkernels.explain(optim.AdamW8bit(ps).step)
    assert len(decisions) == 2
    assert "min_8bit_size" in decisions[0].op and "(8-bit state)" in decisions[1].op


def test_explain_step_follows_a_forced_backend_and_refuses_what_cannot_serve():
    opt = optim.AdamW(_params(torch.float32))
    with llmkernels.use_backend("reference"):
        (decision,) = llmkernels.explain(opt.step)
    assert decision.backend == "reference" and decision.forced == "reference"
    assert decision.rejected["cpu"] == "another path was forced"
    with llmkernels.use_backend("cuda"), pytest.raises(llmkernels.BackendError, match="cuda"):
        llmkernels.explain(opt.step)


def test_explain_refuses_other_optimizers():
    with pytest.raises(TypeError, match="not an llmkernels op"):
        llmkernels.explain(torch.optim.AdamW(_params(torch.float32)).step)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("sr", [False, True])
def test_explain_on_cuda_tensors(monkeypatch, sr):
    """CUDA tensors: Triton first, the CUDA kernels only when forced (and never with stochastic
    rounding), the CPU kernel not at all; explain says so, and the step takes that path."""
    ps = [p.detach().cuda().requires_grad_() for p in _params(torch.bfloat16)]
    for p in ps:
        p.grad = torch.randn_like(p)
    opt = optim.AdamW(ps, stochastic_rounding=sr)
    (decision,) = llmkernels.explain(opt.step)
    taken = _routes(monkeypatch)
    opt.step()
    assert [decision.backend] == taken
    assert "cuda tensors" in decision.rejected["cpu"]
    if llmkernels.backends.triton_unavailable("optim") is None:
        assert decision.backend == "triton"
        if hasattr(llmkernels.backends.native_module(), "adam_step_cuda"):
            why = "stochastic rounding" if sr else "Triton serves"
            assert why in decision.rejected["cuda"]
