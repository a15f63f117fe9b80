"""llmkernels.nn.MultiheadAttention and swap_attention against torch.nn.MultiheadAttention."""
import itertools
import warnings

import pytest
import torch

import llmkernels
import llmkernels.nn.attention as nn_attention
from llmkernels.nn import MultiheadAttention, swap_attention

E, H = 12, 3  # odd head count on purpose; head_dim 4

CONFIGS = [
    dict(),
    dict(batch_first=True),
    dict(bias=False),
    dict(kdim=5, vdim=7),
    dict(kdim=5, vdim=7, batch_first=True, bias=False),
    dict(add_bias_kv=True),
    dict(add_zero_attn=True, batch_first=True),
    dict(add_bias_kv=True, add_zero_attn=True, kdim=5, vdim=7),
]
# (N, L, S); N None = unbatched
SIZES = [(1, 1, 1), (3, 7, 33), (1, 33, 7), (None, 7, 33)]


def cfg_id(cfg):
    return ",".join(f"{k}={v}" for k, v in cfg.items()) or "default"


def make_pair(dtype=torch.float32, embed_dim=E, num_heads=H, **cfg):
    """torch's layer (biases randomized: torch inits them to 0) and ours with the same weights."""
    ref = torch.nn.MultiheadAttention(embed_dim, num_heads, dtype=dtype, **cfg)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "bias" in name:
                p.normal_(0.0, 0.5)
    return ref, MultiheadAttention.from_module(ref)


def shaped(N, T, dim, batch_first, dtype=torch.float32, requires_grad=False):
    shape = (T, dim) if N is None else ((N, T, dim) if batch_first else (T, N, dim))
    return torch.randn(shape, dtype=dtype, requires_grad=requires_grad)


def qkv(ref, N, L, S, dtype=torch.float32, requires_grad=False):
    bf = ref.batch_first
    return (shaped(N, L, ref.embed_dim, bf, dtype, requires_grad),
            shaped(N, S, ref.kdim, bf, dtype, requires_grad),
            shaped(N, S, ref.vdim, bf, dtype, requires_grad))


def assert_close(ours, theirs, rtol=1e-5):
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    err = (ours.double() - theirs.double()).abs().max().item() if ours.numel() else 0.0
    scale = max(1.0, theirs.double().abs().max().item() if theirs.numel() else 0.0)
    assert err <= rtol * scale, f"max abs error {err} > {rtol} * {scale}"


def bool_mask(shape, p=0.3):
    """torch convention (True = hidden), never hiding the first key so no row is empty."""
    m = torch.rand(shape) < p
    m[..., 0] = False
    return m


def float_mask(shape):
    m = torch.randn(shape)
    m[torch.rand(shape) < 0.2] = float("-inf")
    m[..., 0] = 0.5
    return m


def make_mask(kind, shape):
    return None if kind is None else (bool_mask(shape) if kind == "bool" else float_mask(shape))


class Spy:
    """Wraps the SDPA our layer calls, recording each call's dropout_p and is_causal."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = nn_attention.scaled_dot_product_attention

        def spy(*args, **kwargs):
            self.calls.append(kwargs)
            return real(*args, **kwargs)

        monkeypatch.setattr(nn_attention, "scaled_dot_product_attention", spy)


# ---------------------------------------------------------------- forward vs torch

@pytest.mark.parametrize("cfg", CONFIGS, ids=cfg_id)
@pytest.mark.parametrize("N,L,S", SIZES)
def test_matches_torch(cfg, N, L, S):
    ref, ours = make_pair(**cfg)
    q, k, v = qkv(ref, N, L, S)
    expected, _ = ref(q, k, v, need_weights=False)
    got, weights = ours(q, k, v, need_weights=False)
    assert weights is None
    assert_close(got, expected)


SELF_CFGS = [dict(), dict(batch_first=True), dict(bias=False, add_zero_attn=True)]


@pytest.mark.parametrize("cfg", SELF_CFGS, ids=cfg_id)
@pytest.mark.parametrize("N,L", [(1, 1), (3, 7), (None, 33)])
def test_self_attention_matches_torch(cfg, N, L):
    """query is key is value: the packed single-matmul projection."""
    ref, ours = make_pair(**cfg)
    x = shaped(N, L, E, ref.batch_first)
    assert_close(ours(x, x, x, need_weights=False)[0], ref(x, x, x, need_weights=False)[0])


def test_output_layout_is_contiguous():
    for bf in (False, True):
        ref, ours = make_pair(batch_first=bf)
        q, k, v = qkv(ref, 3, 7, 5)
        out = ours(q, k, v, need_weights=False)[0]
        assert out.is_contiguous() and out.shape == ref(q, k, v, need_weights=False)[0].shape


KINDS = [None, "bool", "float"]
MASK_CFGS = [dict(), dict(batch_first=True), dict(add_bias_kv=True, add_zero_attn=True, kdim=5)]


@pytest.mark.parametrize("cfg", MASK_CFGS, ids=cfg_id)
@pytest.mark.parametrize("N", [3, None])
@pytest.mark.parametrize("attn_kind,attn_dims,kpm_kind", [
    (a, d, k) for a, d, k in itertools.product(KINDS, [2, 3], KINDS) if not (a is None and d == 3)])
def test_masks_match_torch(cfg, N, attn_kind, attn_dims, kpm_kind):
    L, S = 7, 9
    ref, ours = make_pair(**cfg)
    q, k, v = qkv(ref, N, L, S)
    heads = H if N is None else N * H
    attn_mask = make_mask(attn_kind, (L, S) if attn_dims == 2 else (heads, L, S))
    kpm = make_mask(kpm_kind, (S,) if N is None else (N, S))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation warning for mixed mask types
        expected, _ = ref(q, k, v, key_padding_mask=kpm, attn_mask=attn_mask, need_weights=False)
        got, _ = ours(q, k, v, key_padding_mask=kpm, attn_mask=attn_mask, need_weights=False)
    assert torch.isfinite(expected).all()
    assert_close(got, expected)


@pytest.mark.parametrize("cfg", [dict(), dict(batch_first=True), dict(add_bias_kv=True)],
                         ids=cfg_id)
@pytest.mark.parametrize("with_kpm", [False, True])
@pytest.mark.parametrize("N,L", [(1, 1), (3, 7), (None, 33)])
def test_is_causal_hint_matches_torch(cfg, with_kpm, N, L):
    ref, ours = make_pair(**cfg)
    q, k, v = qkv(ref, N, L, L)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(L)
    kpm = float_mask((L,) if N is None else (N, L)) if with_kpm else None
    kw = dict(key_padding_mask=kpm, attn_mask=causal, is_causal=True, need_weights=False)
    assert_close(ours(q, k, v, **kw)[0], ref(q, k, v, **kw)[0])


@pytest.mark.parametrize("add_bias_kv", [False, True])
@pytest.mark.parametrize("with_kpm", [False, True])
def test_is_causal_without_mask_means_causal(add_bias_kv, with_kpm, monkeypatch):
    """An extension: torch requires attn_mask with is_causal; we take it as the causal mask."""
    ref, ours = make_pair(batch_first=True, add_bias_kv=add_bias_kv)
    q, k, v = qkv(ref, 3, 7, 7)
    kpm = bool_mask((3, 7)) if with_kpm else None
    causal = torch.ones(7, 7, dtype=torch.bool).triu(1)
    with pytest.raises(RuntimeError):
        ref(q, k, v, key_padding_mask=kpm, is_causal=True, need_weights=False)
    spy = Spy(monkeypatch)
    got, _ = ours(q, k, v, key_padding_mask=kpm, is_causal=True, need_weights=False)
    assert spy.calls[0]["is_causal"] is (not add_bias_kv)  # the kernel's flag when it is exact
    expected, _ = ref(q, k, v, key_padding_mask=kpm, attn_mask=causal, need_weights=False)
    assert_close(got, expected)


def test_fully_masked_rows_give_zeros():
    """A query that sees no key: zeros from us (torch's need_weights=True path gives NaN)."""
    ref, ours = make_pair(bias=False)
    q, k, v = qkv(ref, 2, 3, 4)
    attn_mask = torch.zeros(3, 4, dtype=torch.bool)
    attn_mask[1] = True
    got, _ = ours(q, k, v, attn_mask=attn_mask, need_weights=False)
    assert torch.equal(got[1], torch.zeros_like(got[1]))  # no bias: zeros stay zeros
    assert torch.isnan(ref(q, k, v, attn_mask=attn_mask)[0][1]).all()
    expected = ref(q, k, v, attn_mask=attn_mask, need_weights=False)[0]
    assert_close(got[[0, 2]], expected[[0, 2]])


def test_dropout_only_in_training(monkeypatch):
    ref, ours = make_pair(dropout=0.5, batch_first=True)
    q, k, v = qkv(ref, 3, 7, 9)
    spy = Spy(monkeypatch)
    ref.eval(), ours.eval()
    assert_close(ours(q, k, v, need_weights=False)[0], ref(q, k, v, need_weights=False)[0])
    ours.train()
    a = ours(q, k, v, need_weights=False)[0]
    b = ours(q, k, v, need_weights=False)[0]
    assert [c["dropout_p"] for c in spy.calls] == [0.0, 0.5, 0.5]
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("dtype,mask_dtype", [(torch.float32, torch.float64),
                                              (torch.bfloat16, torch.float32)])
def test_float_mask_of_other_dtype(dtype, mask_dtype):
    """Float masks are cast to the query dtype (also on the dropout/reference path)."""
    _, ours = make_pair(dtype=dtype, dropout=0.1)
    q, k, v = qkv(ours, 3, 7, 9, dtype=dtype)
    mask = float_mask((7, 9)).to(mask_dtype)
    for training in (False, True):
        ours.train(training)
        out, _ = ours(q, k, v, attn_mask=mask, key_padding_mask=bool_mask((3, 9)),
                      need_weights=False)
        assert out.dtype == dtype and torch.isfinite(out).all()


def test_bfloat16_error_within_twice_torchs():
    ref, ours = make_pair(dtype=torch.bfloat16, embed_dim=32, num_heads=2, batch_first=True)
    exact = torch.nn.MultiheadAttention(32, 2, batch_first=True, dtype=torch.float64)
    exact.load_state_dict({k: v.double() for k, v in ref.state_dict().items()})
    q, k, v = qkv(ref, 3, 33, 33, dtype=torch.bfloat16)
    attn_mask = bool_mask((33, 33))
    kw = dict(attn_mask=attn_mask, need_weights=False)
    truth = exact(q.double(), k.double(), v.double(), **kw)[0]
    theirs = ref(q, k, v, **kw)[0]
    got = ours(q, k, v, **kw)[0]
    assert got.dtype == torch.bfloat16
    err_ours = (got.double() - truth).abs().max().item()
    err_torch = (theirs.double() - truth).abs().max().item()
    assert err_ours <= 2 * err_torch + 1e-2, (err_ours, err_torch)


# ---------------------------------------------------------------- gradients

@pytest.mark.parametrize("cfg,mask", [
    (dict(), None),
    (dict(batch_first=True), "bool"),
    (dict(kdim=5, vdim=7, bias=False), "float"),
    (dict(add_bias_kv=True, add_zero_attn=True, batch_first=True), "bool"),
], ids=lambda x: cfg_id(x) if isinstance(x, dict) else str(x))
@pytest.mark.parametrize("N,L,S", [(3, 7, 33), (None, 7, 5)])
def test_gradients_match_torch(cfg, mask, N, L, S):
    ref, ours = make_pair(**cfg)
    q, k, v = qkv(ref, N, L, S, requires_grad=True)
    kpm = make_mask(mask, (S,) if N is None else (N, S))
    attn_mask = make_mask(mask, (L, S))
    kw = dict(key_padding_mask=kpm, attn_mask=attn_mask, need_weights=False)
    expected = ref(q, k, v, **kw)[0]
    grad = torch.randn_like(expected)
    ref_grads = torch.autograd.grad(expected, [q, k, v, *ref.parameters()], grad)
    got = ours(q, k, v, **kw)[0]
    our_grads = torch.autograd.grad(got, [q, k, v, *ours.parameters()], grad)
    assert_close(got, expected)
    names = ["query", "key", "value"] + [n for n, _ in ours.named_parameters()]
    assert names[3:] == [n for n, _ in ref.named_parameters()]
    for name, g_ours, g_ref in zip(names, our_grads, ref_grads):
        assert g_ours is not None, name
        assert_close(g_ours, g_ref, rtol=1e-4)


# ---------------------------------------------------------------- state_dict and from_module

@pytest.mark.parametrize("cfg", [dict(), dict(kdim=5, vdim=7, bias=False), dict(add_bias_kv=True)],
                         ids=cfg_id)
def test_state_dict_round_trip(cfg):
    ref, _ = make_pair(**cfg)
    ours = MultiheadAttention(E, H, **cfg)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)
    back = torch.nn.MultiheadAttention(E, H, **cfg)
    back.load_state_dict(ours.state_dict(), strict=True)
    q, k, v = qkv(ref, 3, 7, 9)
    expected = ref(q, k, v, need_weights=False)[0]
    assert_close(ours(q, k, v, need_weights=False)[0], expected)
    assert torch.equal(back(q, k, v, need_weights=False)[0], expected)


def test_from_module_preserves_config_and_flags():
    ref = torch.nn.MultiheadAttention(E, H, dropout=0.25, kdim=5, vdim=7, add_bias_kv=True,
                                      add_zero_attn=True, batch_first=True, dtype=torch.float64)
    ref.eval()
    ref.out_proj.train()  # a per-submodule flag is kept too
    ref.q_proj_weight.requires_grad_(False)
    ours = MultiheadAttention.from_module(ref)
    assert isinstance(ours, torch.nn.MultiheadAttention) and type(ours) is MultiheadAttention
    for attr in ("embed_dim", "num_heads", "dropout", "kdim", "vdim", "batch_first",
                 "add_zero_attn", "head_dim", "_qkv_same_embed_dim"):
        assert getattr(ours, attr) == getattr(ref, attr), attr
    assert not ours.training and ours.out_proj.training
    for (name, p), (_, r) in zip(ours.named_parameters(), ref.named_parameters()):
        assert p.dtype == torch.float64 and p.device == r.device
        assert p.requires_grad == r.requires_grad, name
        assert torch.equal(p, r) and p.data_ptr() != r.data_ptr(), name
    with torch.no_grad():  # independent copies: changing the original leaves ours alone
        ref.out_proj.weight.zero_()
    assert ours.out_proj.weight.abs().sum() > 0


def test_from_module_keeps_device():
    ref = torch.nn.MultiheadAttention(E, H, device="meta")
    ours = MultiheadAttention.from_module(ref)
    assert all(p.device.type == "meta" for p in ours.parameters())


def test_from_module_rejects_non_mha():
    with pytest.raises(TypeError, match="MultiheadAttention"):
        MultiheadAttention.from_module(torch.nn.Linear(4, 4))


# ---------------------------------------------------------------- need_weights=True

@pytest.mark.parametrize("average", [True, False])
@pytest.mark.parametrize("cfg", [dict(), dict(batch_first=True, kdim=5, vdim=7)], ids=cfg_id)
def test_need_weights_uses_torch(average, cfg, monkeypatch):
    ref, ours = make_pair(**cfg)
    q, k, v = qkv(ref, 3, 7, 9)
    attn_mask = bool_mask((7, 9))
    spy = Spy(monkeypatch)
    out, w = ours(q, k, v, attn_mask=attn_mask, average_attn_weights=average)
    out_ref, w_ref = ref(q, k, v, attn_mask=attn_mask, average_attn_weights=average)
    assert spy.calls == []
    assert torch.equal(out, out_ref) and torch.equal(w, w_ref)
    assert w.shape == ((3, 7, 9) if average else (3, H, 7, 9))


# ---------------------------------------------------------------- bad input

def _bad_cases():
    q, k, v = torch.randn(7, 3, E), torch.randn(9, 3, 5), torch.randn(9, 3, 7)
    return [
        ("embedding dim", ValueError, (torch.randn(7, 3, E + 1), k, v), {}),
        ("embedding dim", ValueError, (q, torch.randn(9, 3, E), v), {}),
        ("2-D .* 3-D", ValueError, (torch.randn(2, 7, 3, E), k, v), {}),
        ("same number of dims", ValueError, (q, k[:, 0], v), {}),
        ("batch sizes", ValueError, (q, k[:, :2], v[:, :2]), {}),
        ("positions", ValueError, (q, k, v[:8]), {}),
        ("attn_mask has shape", ValueError, (q, k, v), dict(attn_mask=torch.zeros(7, 8))),
        ("attn_mask has shape", ValueError, (q, k, v), dict(attn_mask=torch.zeros(H, 7, 9))),
        ("key_padding_mask has shape", ValueError, (q, k, v),
         dict(key_padding_mask=torch.zeros(9, 3))),
        ("bool or floating", TypeError, (q, k, v),
         dict(attn_mask=torch.zeros(7, 9, dtype=torch.int64))),
        ("weights are", TypeError, (q.double(), k.double(), v.double()), {}),
    ]


@pytest.mark.parametrize("match,exc,args,kwargs", _bad_cases())
def test_bad_input_raises(match, exc, args, kwargs):
    ref, ours = make_pair(kdim=5, vdim=7)
    with pytest.raises(exc, match=match):
        ours(*args, need_weights=False, **kwargs)
    with pytest.raises(Exception):  # torch rejects it as well
        ref(*args, need_weights=False, **kwargs)


# ---------------------------------------------------------------- swap_attention

def _encoder(batch_first, dropout=0.0):
    layer = torch.nn.TransformerEncoderLayer(E, 2, dim_feedforward=24, dropout=dropout,
                                             batch_first=batch_first)
    with warnings.catch_warnings():
        # "enable_nested_tensor is True, but ..." when batch_first=False
        warnings.simplefilter("ignore")
        return torch.nn.TransformerEncoder(layer, num_layers=2)


@pytest.mark.parametrize("batch_first", [False, True])
def test_swap_attention_encoder(batch_first, monkeypatch):
    model = _encoder(batch_first)
    x = shaped(3, 7, E, batch_first)
    model.train()
    before_train = model(x)
    model.eval()
    with torch.no_grad():
        before_eval = model(x)

    names = swap_attention(model)
    assert names == ["layers.0.self_attn", "layers.1.self_attn"]
    assert all(type(layer.self_attn) is MultiheadAttention for layer in model.layers)
    assert swap_attention(model) == []  # already ours

    spy = Spy(monkeypatch)
    model.train()
    assert_close(model(x), before_train)
    assert len(spy.calls) == 2
    model.eval()
    with torch.no_grad():  # torch's fused encoder-layer fast path would skip self_attn.forward
        assert_close(model(x), before_eval)
    assert len(spy.calls) == 4


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("causal", [False, True])
def test_swap_attention_encoder_masks_eval(causal, monkeypatch):
    """Eval with a padding mask (torch would pack a NestedTensor) and with a causal mask."""
    model = _encoder(batch_first=True).eval()
    x = shaped(3, 7, E, True)
    kpm = torch.zeros(3, 7, dtype=torch.bool)
    kpm[1, 5:] = True  # right padding, so torch's nested-tensor path applies before the swap
    kw = dict(mask=torch.nn.Transformer.generate_square_subsequent_mask(7), is_causal=True) \
        if causal else dict(src_key_padding_mask=kpm)
    with torch.no_grad():
        before = model(x, **kw)
        swap_attention(model)
        spy = Spy(monkeypatch)
        after = model(x, **kw)
    assert len(spy.calls) == 2
    keep = ~kpm.unsqueeze(-1).expand_as(x) if not causal else torch.ones_like(x, dtype=torch.bool)
    assert_close(after[keep], before[keep])  # padded positions: zeros before, values after


def test_swap_attention_transformer_names_and_output():
    model = torch.nn.Transformer(E, 2, num_encoder_layers=1, num_decoder_layers=2,
                                 dim_feedforward=16, dropout=0.0, batch_first=True)
    src, tgt = shaped(3, 9, E, True), shaped(3, 7, E, True)
    tgt_mask = torch.nn.Transformer.generate_square_subsequent_mask(7)
    before = model(src, tgt, tgt_mask=tgt_mask, tgt_is_causal=True)
    names = swap_attention(model)
    assert names == ["encoder.layers.0.self_attn", "decoder.layers.0.self_attn",
                     "decoder.layers.0.multihead_attn", "decoder.layers.1.self_attn",
                     "decoder.layers.1.multihead_attn"]
    assert_close(model(src, tgt, tgt_mask=tgt_mask, tgt_is_causal=True), before)


def test_swap_attention_shared_and_subclass_and_root():
    class Custom(torch.nn.MultiheadAttention):
        pass

    shared = torch.nn.MultiheadAttention(E, H)
    model = torch.nn.ModuleDict({"a": shared, "b": torch.nn.Sequential(shared), "c": Custom(E, H)})
    names = swap_attention(model)
    assert names == ["a", "b.0"]
    assert model["a"] is model["b"][0] and type(model["a"]) is MultiheadAttention
    assert type(model["c"]) is Custom
    with pytest.raises(ValueError, match="from_module"):
        swap_attention(torch.nn.MultiheadAttention(E, H))


def test_exports():
    assert llmkernels.nn.MultiheadAttention is MultiheadAttention
    assert set(llmkernels.nn.__all__) == {"MultiheadAttention", "swap_attention", "restore_attention",
                                         "QuantLinear"}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_float32_masks_keep_their_precision_with_16_bit_layers(dtype):
    """torch's layer adds a float32 mask at float32 precision; ours rounded it to the layer's
    dtype first (a -1e9 row became -inf: zeros instead of torch's uniform weights; a
    -1000 + noise bias lost its noise in bf16)."""
    torch.manual_seed(0)
    theirs = torch.nn.MultiheadAttention(16, 4, batch_first=True).to(dtype)
    ours = llmkernels.nn.MultiheadAttention.from_module(theirs)
    x = torch.randn(2, 5, 16).to(dtype)
    mask = -1000 + 2 * torch.randn(5, 5)
    mask[0, :] = -1e9
    expected = theirs(x, x, x, need_weights=False, attn_mask=mask)[0]
    got = ours(x, x, x, need_weights=False, attn_mask=mask)[0]
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)


def test_dropout_one_drops_every_weight_as_torchs_layer():
    torch.manual_seed(0)
    theirs = torch.nn.MultiheadAttention(16, 4, dropout=1.0, batch_first=True)
    ours = llmkernels.nn.MultiheadAttention.from_module(theirs).train()
    x = torch.randn(2, 5, 16)
    expected = theirs.train()(x, x, x, need_weights=False)[0]
    torch.testing.assert_close(ours(x, x, x, need_weights=False)[0], expected)
    assert llmkernels.explain(ours, x, x, x, need_weights=False).backend == "reference"


def test_a_mask_that_requires_grad_gets_its_gradient_from_the_kernel():
    """explain and forward agree (the CPU kernel computes the float mask's gradient), and the
    gradient is torch's layer's."""
    layer = llmkernels.nn.MultiheadAttention(16, 4, batch_first=True).eval()
    theirs = torch.nn.MultiheadAttention(16, 4, batch_first=True).eval()
    theirs.load_state_dict(layer.state_dict())
    x = torch.randn(2, 5, 16)
    mask = torch.randn(5, 5, requires_grad=True)
    decision = llmkernels.explain(layer, x, x, x, need_weights=False, attn_mask=mask)
    assert decision.backend == "cpu", str(decision)
    grads = []
    for m in (layer, theirs):
        out, _ = m(x, x, x, need_weights=False, attn_mask=mask)
        grads.append(torch.autograd.grad(out.square().sum(), mask)[0])
    assert_close(grads[0], grads[1], rtol=1e-4)


def test_torchscript_says_what_to_do_instead():
    """Scripting a patched model failed with "'Tensor' object has no attribute or method
    'forward'"; unpatched, it scripts."""
    model = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(16, 4), 1,
                                        enable_nested_tensor=False)
    llmkernels.patch(model)
    with pytest.raises(RuntimeError, match="unpatch"):
        torch.jit.script(model)
    llmkernels.unpatch(model)
    torch.jit.script(model)
