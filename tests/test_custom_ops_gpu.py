"""The GPU paths' custom ops (llmkernels::attention_forward_gpu / attention_backward_gpu):
opcheck and torch.compile(fullgraph=True). Triton runs in its interpreter without a GPU."""
import pytest
import torch

import llmkernels
from gpu_paths import DEVICE, gpu_path, skip_unless_runs  # noqa: F401
from llmkernels.ops.attention_gpu import attention_backward_gpu, attention_forward_gpu


def _qkv(requires_grad, layout="bhsd"):
    def one(H, L):
        if layout == "bshd":  # token-major storage: outputs keep that layout
            t = torch.randn(2, L, H, 64, device=DEVICE, dtype=torch.bfloat16).transpose(1, 2)
        else:
            t = torch.randn(2, H, L, 64, device=DEVICE, dtype=torch.bfloat16)
        return t.requires_grad_(requires_grad)
    return one(4, 19), one(2, 23), one(2, 23)


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_opcheck_forward(gpu_path, requires_grad, layout):
    q, k, v = _qkv(requires_grad, layout)
    skip_unless_runs(gpu_path, q, k, v)
    args = (q, k, v, None, None, None, 19, 23, 0.125, 0.0, -1, 0, 0, False, gpu_path)
    torch.library.opcheck(attention_forward_gpu, args)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_opcheck_with_a_mask(kind):
    """Triton's forward and backward with an attn_mask view (broadcast over heads)."""
    q, k, v = _qkv(True)
    skip_unless_runs("triton", q, k, v)
    keep = torch.rand(2, 1, 19, 23, device=DEVICE) > 0.3
    mask = keep if kind == "bool" else torch.zeros(keep.shape, device=DEVICE).masked_fill(
        ~keep, float("-inf"))
    mask = mask.expand(2, 4, 19, 23)
    params = (None, None, None, 19, 23, 0.125, 0.0, -1, -1, 0, False, "triton", mask)
    torch.library.opcheck(attention_forward_gpu, (q, k, v, *params))
    out, lse = attention_forward_gpu(q.detach(), k.detach(), v.detach(), *params)
    torch.library.opcheck(attention_backward_gpu,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse,
                           *params))


def test_opcheck_backward(gpu_path):
    q, k, v = _qkv(False)
    skip_unless_runs(gpu_path, q, k, v)
    params = (None, None, None, 19, 23, 0.125, 0.0, -1, 0, 0, False, gpu_path)
    out, lse = attention_forward_gpu(q, k, v, *params)
    torch.library.opcheck(attention_backward_gpu,
                          (torch.randn_like(out), q, k, v, out, lse, *params))


def test_compile_fullgraph_triton():
    torch._dynamo.reset()

    def block(q, k, v):
        return llmkernels.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True,
                                                       backend="triton").float().sum(-1)

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    q, k, v = _qkv(True)
    out_c = compiled(q, k, v)
    out_e = block(q, k, v)
    torch.testing.assert_close(out_c, out_e)
    g_c = torch.autograd.grad(out_c.sum(), (q, k, v))
    g_e = torch.autograd.grad(out_e.sum(), (q, k, v))
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b)
