"""quantize_ and QuantLinear inside whole models: shared and tied layers, torch's transformer
layers, casts back and forth, weights quantize_ cannot take, meta models, bad arguments."""
import numpy as np
import pytest
import torch
from torch import nn

import llmkernels
from llmkernels.nn import QuantLinear


def test_a_layer_under_two_names_is_quantized_once_and_stays_shared():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Linear(64, 64)
            self.dec = self.enc

        def forward(self, x):
            return self.dec(self.enc(x))

    net = Net()
    x = torch.randn(3, 64)
    report = llmkernels.quantize_(net, "int8")
    assert isinstance(net.enc, QuantLinear) and net.dec is net.enc
    assert [n for n, _, _ in report.replaced] == ["enc"] and report.shared == [("dec", "enc")]
    assert report.bytes_before == 64 * 64 * 4 + 64 * 4  # counted once
    assert "dec: the same layer as enc" in str(report)
    w = net.enc.dequantize()
    torch.testing.assert_close(net(x), (x @ w.T + net.enc.bias) @ w.T + net.enc.bias)


def test_tied_weights_stay_float_and_tied():
    """An output layer holding the input embedding's weight: quantizing it would untie them
    and keep the float copy, so it is listed as skipped."""
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.mid, self.head = nn.Embedding(50, 32), nn.Linear(32, 32), nn.Linear(32, 50)
            self.head.weight = self.emb.weight

    lm = LM()
    report = llmkernels.quantize_(lm, "int8")
    assert [n for n, _, _ in report.replaced] == ["mid"]
    assert [n for n, _ in report.skipped] == ["head"] and "emb" in report.skipped[0][1]
    assert type(lm.head) is nn.Linear and lm.head.weight is lm.emb.weight


@pytest.mark.parametrize("padding_mask", [False, True])
def test_torch_transformer_encoder_runs_in_eval_mode(padding_mask):
    """nn.TransformerEncoderLayer's eval-mode fused path (and nn.TransformerEncoder's NestedTensor
    packing of padded batches) read linear1.weight / linear2.weight, which a QuantLinear has
    not: quantize_ keeps those layers on the path that calls their forward."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(64, 4, 128, batch_first=True)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    llmkernels.quantize_(enc, "int8")
    assert all(isinstance(m.linear1, QuantLinear) and isinstance(m.linear2, QuantLinear)
               for m in enc.layers)
    x = torch.randn(2, 5, 64)
    mask = torch.tensor([[False] * 5, [False] * 3 + [True] * 2]) if padding_mask else None
    with torch.no_grad():
        got = enc(x, src_key_padding_mask=mask)
    # The same layers with float weights that are the dequantized ones, on torch's slow path.
    ref = nn.TransformerEncoder(nn.TransformerEncoderLayer(64, 4, 128, batch_first=True), 2,
                                enable_nested_tensor=False).eval()
    for r, q in zip(ref.layers, enc.layers):
        state = {k: v for k, v in q.state_dict().items() if "linear" not in k}
        r.load_state_dict(state, strict=False)
        for name in ("linear1", "linear2"):
            getattr(r, name).weight.data.copy_(getattr(q, name).dequantize())
            getattr(r, name).bias.data.copy_(getattr(q, name).bias)
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            expected = ref(x, src_key_padding_mask=mask)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scheme", ["int8", "int4", "w8a8"])
def test_cast_there_and_back_follows_the_weight_dtype(scheme):
    """.half().float(): the layer's float dtype returns to float32 (its scales never changed
    dtype, so they could not tell), and unpatch rebuilds float32 layers."""
    model = nn.Sequential(nn.Linear(64, 32))
    llmkernels.patch(model, attention=False, quantize=scheme, group_size=32)
    q = model[0]
    model.to(torch.bfloat16)
    assert q.weight_dtype == torch.bfloat16
    model.float()
    assert q.weight_dtype == torch.float32 and q.dequantize().dtype == torch.float32
    assert '"weight_dtype": "float32"' in bytes(q.get_extra_state().tolist()).decode()
    model.to("cpu")  # a move without a cast keeps it
    assert q.weight_dtype == torch.float32
    llmkernels.unpatch(model)
    assert model[0].weight.dtype == torch.float32
    assert model(torch.randn(2, 64)).dtype == torch.float32


def test_nan_weight_names_the_layer_and_changes_nothing():
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    with torch.no_grad():
        model[2].weight[3, 4] = float("nan")
    with pytest.raises(ValueError, match=r"2\.weight holds NaN or Inf \(no layer was replaced\)"):
        llmkernels.quantize_(model, "int8")
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear


def test_empty_layers_stay_float():
    model = nn.Sequential(nn.Linear(0, 4), nn.Linear(4, 0), nn.Linear(32, 8))
    report = llmkernels.quantize_(model, "int4", group_size=32)
    assert [n for n, _, _ in report.replaced] == ["2"]
    assert [n for n, _ in report.skipped] == ["0", "1"]
    assert all("empty" in why for _, why in report.skipped)


def test_meta_model_becomes_frames_for_a_quantized_checkpoint():
    """Quantizing a model built on the meta device gives QuantLinear frames; a quantized
    state_dict then loads into them with assign=True."""
    torch.manual_seed(0)
    real = nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 8))
    llmkernels.quantize_(real, "int4", group_size=32)
    with torch.device("meta"):
        frame = nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 8))
    report = llmkernels.quantize_(frame, "int4", group_size=32)
    assert len(report.replaced) == 2 and frame[0].qdata.is_meta
    frame.load_state_dict(real.state_dict(), assign=True)
    x = torch.randn(3, 64)
    torch.testing.assert_close(frame(x), real(x))


@pytest.mark.parametrize("group_size", [32.0, 33, True, "32"])
def test_bad_int4_group_size_is_an_error(group_size):
    for call in (lambda: llmkernels.quantize_(nn.Sequential(nn.Linear(64, 8)), "int4",
                                              group_size=group_size),
                 lambda: llmkernels.quantize_weight(torch.randn(8, 64), "int4", group_size),
                 lambda: QuantLinear(64, 8, scheme="int4", group_size=group_size)):
        with pytest.raises(ValueError, match="group_size must be one of"):
            call()


def test_numpy_group_size_is_an_int():
    qw = llmkernels.quantize_weight(torch.randn(8, 64), "int4", np.int64(32))
    assert type(qw.group_size) is int and qw.group_size == 32


def test_quantized_weight_to_a_dtype_is_refused():
    qw = llmkernels.quantize_weight(torch.randn(8, 64), "int8")
    with pytest.raises(TypeError, match="takes a device"):
        qw.to(torch.bfloat16)
    assert qw.to("cpu").qdata.dtype == torch.int8


def test_int4_range_past_float32_is_an_error():
    w = torch.randn(4, 64)
    w[1, 3], w[1, 5] = 3e38, -3e38
    with pytest.raises(ValueError, match="max - min"):
        llmkernels.quantize_weight(w, "int4", 32)
    llmkernels.quantize_weight(w, "int8")  # symmetric: fine


def test_quantizing_again_lists_the_layers_already_quantized():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    llmkernels.quantize_(model, "int8")
    report = llmkernels.quantize_(model, "int4", group_size=32)
    assert report.replaced == []
    assert report.skipped == [("0", "already a QuantLinear (int8)"),
                              ("2", "already a QuantLinear (int8)")]


def test_format_record_is_a_tensor_and_old_dict_records_still_load():
    """The record is a uint8 tensor (safetensors keeps only tensors); checkpoints saved when it
    was a dict load as before; anything else is refused by name."""
    layer = llmkernels.nn.QuantLinear.from_linear(nn.Linear(64, 8), "int4", group_size=32)
    state = layer.state_dict()
    assert state["_extra_state"].dtype == torch.uint8
    fresh = llmkernels.nn.QuantLinear.from_linear(nn.Linear(64, 8), "int4", group_size=32)
    fresh.load_state_dict(state)
    x = torch.randn(3, 64)
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)
    state["_extra_state"] = {"scheme": "int4", "group_size": 32, "weight_dtype": "bfloat16"}
    fresh.load_state_dict(state, assign=True)
    assert fresh.weight_dtype == torch.bfloat16
    for name in ("bool", "int32", "load", 7):  # a record naming a non-float dtype: refused
        state["_extra_state"] = {"scheme": "int4", "group_size": 32, "weight_dtype": name}
        with pytest.raises(ValueError, match="expected a floating dtype"):
            fresh.load_state_dict(state, assign=True)
    state["_extra_state"] = torch.tensor([1, 2, 3], dtype=torch.uint8)
    with pytest.raises(ValueError, match="_extra_state"):
        fresh.load_state_dict(state)
    state["_extra_state"] = "int4"
    with pytest.raises(ValueError, match="_extra_state"):
        fresh.load_state_dict(state)


def test_format_record_has_one_size_and_lives_on_the_cpu():
    """torch.distributed.checkpoint loads into tensors of the saved size: a bf16 layer's record
    was one byte longer than a float32 one's. A state_dict taken under a meta device context
    made a meta record that could not load."""
    a = llmkernels.nn.QuantLinear.from_linear(nn.Linear(64, 8), "int8")
    b = llmkernels.nn.QuantLinear.from_linear(nn.Linear(64, 8), "int4", group_size=32)
    b.to(torch.bfloat16)
    with torch.device("meta"):
        records = [a.get_extra_state(), b.get_extra_state()]
    assert {r.shape for r in records} == {(128,)} and {r.device.type for r in records} == {"cpu"}
    fresh = llmkernels.nn.QuantLinear.from_linear(nn.Linear(64, 8), "int4", group_size=32)
    fresh.load_state_dict(b.state_dict(), assign=True)
    assert fresh.weight_dtype == torch.bfloat16


@pytest.mark.parametrize("scheme", ["int8", "int4", "w8a8"])
def test_a_bfloat16_checkpoint_into_a_float32_model_stays_float32(scheme):
    """As nn.Linear: loading copies into the layer's tensors (the bias stays float32), so the
    weight's dtype stays too; it took the record's bfloat16, and unpatch then left a bfloat16
    layer in a float32 model. assign=True takes the checkpoint's dtype, bias and weight."""
    saved = nn.Sequential(nn.Linear(64, 32)).to(torch.bfloat16)
    llmkernels.patch(saved, attention=False, quantize=scheme, group_size=32)
    models = [nn.Sequential(nn.Linear(64, 32)) for _ in range(2)]
    for model, assign in zip(models, (False, True)):
        llmkernels.patch(model, attention=False, quantize=scheme, group_size=32)
        model.load_state_dict(saved.state_dict(), assign=assign)
        dtype = torch.bfloat16 if assign else torch.float32
        assert model[0].weight_dtype == dtype and model[0].bias.dtype == dtype
        x = torch.randn(3, 64, dtype=dtype)
        quantized = model(x)
        llmkernels.unpatch(model)
        assert model[0].weight.dtype == dtype
        torch.testing.assert_close(model(x), quantized, rtol=2e-2, atol=2e-2)


def test_a_parametrized_bias_is_used():
    layer = llmkernels.nn.QuantLinear.from_linear(nn.Linear(64, 8), "int8")

    class Doubled(nn.Module):
        def forward(self, bias):
            return 2 * bias

    torch.nn.utils.parametrize.register_parametrization(layer, "bias", Doubled())
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), x @ layer.dequantize().t() + layer.bias)
    assert torch.equal(layer.bias, 2 * layer.parametrizations.bias.original)


def test_meta_layers_run_forward_on_meta():
    layer = llmkernels.nn.QuantLinear.from_linear(nn.Linear(64, 32, device="meta"), "int8")
    out = layer(torch.empty(3, 64, device="meta"))
    assert out.shape == (3, 32) and out.is_meta
