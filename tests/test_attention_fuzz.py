"""Property-based fuzzing of the fused CPU kernel against the float64 reference: random
shapes, strides (including a non-unit stride on the head dim), heads, masks and extras."""
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import llmkernels
from attention_utils import grad_scale, judge, reference_pair


def _strided(t: torch.Tensor, how: str) -> torch.Tensor:
    """The same values behind different strides."""
    if how == "bshd":
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if how == "every_other":  # a head dim with stride 2
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t


@st.composite
def attention_calls(draw):
    B = draw(st.integers(1, 2))
    Hk = draw(st.integers(1, 3))
    Hq = Hk * draw(st.sampled_from([1, 1, 2, 3]))
    L = draw(st.integers(1, 150))
    S = draw(st.integers(1, 150))
    E = draw(st.integers(1, 80))
    Ev = draw(st.sampled_from([E, draw(st.integers(1, 80))]))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    kw = {"is_causal": draw(st.booleans())}
    if Hq != Hk:
        kw["enable_gqa"] = True
    if draw(st.booleans()):
        kw["window_size"] = (draw(st.sampled_from([None, 0, 3, 40])), draw(st.sampled_from([None, 0, 5])))
    if draw(st.booleans()):
        kw["softcap"] = draw(st.sampled_from([1.0, 10.0]))
    mask = draw(st.sampled_from([None, "bool", "float"]))
    layout = draw(st.sampled_from(["bhsd", "bshd", "every_other"]))
    seed = draw(st.integers(0, 2**31 - 1))
    return B, Hq, Hk, L, S, E, Ev, dtype, kw, mask, layout, seed


# derandomize: the same examples every run, so CI cannot turn red by chance; widen locally
# with a larger max_examples (3 x 3000 random examples passed when this was written).
@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(attention_calls())
def test_kernel_matches_reference(call):
    B, Hq, Hk, L, S, E, Ev, dtype, kw, mask, layout, seed = call
    g = torch.Generator().manual_seed(seed)
    q = _strided(torch.randn(B, Hq, L, E, generator=g).to(dtype), layout).requires_grad_()
    k = _strided(torch.randn(B, Hk, S, E, generator=g).to(dtype), layout).requires_grad_()
    v = _strided(torch.randn(B, Hk, S, Ev, generator=g).to(dtype), layout).requires_grad_()
    if mask == "bool":
        kw["attn_mask"] = torch.rand(L, S, generator=g) > 0.25
    elif mask == "float":
        kw["attn_mask"] = torch.randn(B, 1, L, S, generator=g).to(dtype)
    out = llmkernels.scaled_dot_product_attention(q, k, v, backend="cpu", **kw)
    grad_out = torch.randn(out.shape, generator=g).to(dtype)
    (exact, exact_g), (same, same_g) = reference_pair(q, k, v, grad_out, **kw)
    # Rows with no visible key: zeros, never NaN (SDPA itself may give NaN there, so the
    # PyTorch baseline for the bound is the reference in the same dtype on those rows).
    same = torch.where(torch.isnan(same), torch.zeros_like(same), same)
    judge("out", out, same, exact, dtype)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    for name, got, base, ref in zip(("dq", "dk", "dv"), grads, same_g, exact_g):
        base = torch.where(torch.isnan(base), torch.zeros_like(base), base)
        judge(name, got, base, ref, dtype, scale=grad_scale(exact_g))
