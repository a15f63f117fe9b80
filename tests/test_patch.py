"""llmkernels.patch / unpatch on plain PyTorch models (nn.MultiheadAttention swapped, linears
quantized); the transformers side is tests/test_integration_transformers.py."""
import pytest
import torch
from torch import nn

import llmkernels
from llmkernels.nn import MultiheadAttention, QuantLinear


class Block(nn.Module):
    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 64), nn.GELU(), nn.Linear(64, dim))

    def forward(self, x):
        mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).triu(1)
        x = x + self.attn(x, x, x, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(x)


def model_and_input():
    torch.manual_seed(0)
    return nn.Sequential(Block(), Block()).eval(), torch.randn(2, 9, 32)


def test_patch_swaps_attention_and_keeps_outputs():
    model, x = model_and_input()
    expected = model(x)
    report = llmkernels.patch(model)
    assert sum(type(m) is MultiheadAttention for m in model.modules()) == 2
    assert len(report.attention) == 2 and "0.attn" in report.attention[0]
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    again = llmkernels.patch(model)  # already patched: nothing left to swap, no error
    assert again.attention == []


def test_patch_quantizes_and_unpatch_restores_torch_layers():
    model, x = model_and_input()
    report = llmkernels.patch(model, quantize="int8")
    assert len(report.quantize.replaced) == 4  # the MLPs; MHA's out_proj is a Linear subclass
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 4
    patched = model(x)
    back = llmkernels.unpatch(model)
    assert len(back.restored_linears) == 4 and len(back.attention) == 2
    assert all(type(m) is not MultiheadAttention for m in model.modules())
    assert sum(type(m) is nn.MultiheadAttention for m in model.modules()) == 2
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    torch.testing.assert_close(model(x), patched, rtol=1e-4, atol=1e-4)


def test_training_after_patch():
    model, x = model_and_input()
    llmkernels.patch(model)
    model.train()
    opt = llmkernels.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(10):
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_bad_configurations():
    with pytest.raises(ValueError, match="found no attention"):
        llmkernels.patch(nn.Sequential(nn.Linear(4, 4)))
    report = llmkernels.patch(nn.Sequential(nn.Linear(64, 4)), attention=False, quantize="int4",
                              group_size=32)
    assert len(report.quantize.replaced) == 1
    with pytest.raises(ValueError, match="quantize must be"):
        llmkernels.patch(model_and_input()[0], quantize="fp8")
    with pytest.raises(TypeError, match="nn.Module"):
        llmkernels.patch("model")
    with pytest.raises(ValueError, match="not patched"):
        llmkernels.unpatch(nn.Linear(2, 2))


def test_unpatch_undoes_only_what_patch_made():
    """A user's own llmkernels layers, there before patch, stay after unpatch."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.mine = MultiheadAttention(16, 2, batch_first=True)
            self.theirs = nn.MultiheadAttention(16, 2, batch_first=True)
            self.q = QuantLinear.from_linear(nn.Linear(16, 16), "int8")
            self.lin = nn.Linear(16, 16)

    net = Net()
    llmkernels.patch(net, quantize="int8")
    assert type(net.theirs) is MultiheadAttention and type(net.lin) is QuantLinear
    report = llmkernels.unpatch(net)
    assert type(net.mine) is MultiheadAttention and type(net.q) is QuantLinear
    assert type(net.theirs) is nn.MultiheadAttention and type(net.lin) is nn.Linear
    assert report.restored_linears == ["lin"]


def test_a_failed_quantize_leaves_a_model_unpatch_can_restore():
    """patch swaps the attention, then quantize_ raised for a NaN weight: nothing was recorded,
    so unpatch refused ("not patched") and the swapped layers stayed."""
    model = torch.nn.Sequential(torch.nn.MultiheadAttention(16, 4), torch.nn.Linear(16, 16))
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="holds NaN or Inf"):
        llmkernels.patch(model, quantize="int8")
    assert type(model[0]) is llmkernels.nn.MultiheadAttention
    llmkernels.unpatch(model)
    assert type(model[0]) is torch.nn.MultiheadAttention and type(model[1]) is torch.nn.Linear
