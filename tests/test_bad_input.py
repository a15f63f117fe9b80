"""Bad input raises a clear Python exception naming the argument; never a crash or NaN."""
import pytest
import torch

import llmkernels
from llmkernels import BackendError

sdpa = llmkernels.scaled_dot_product_attention


def qkv(L=8, S=8, E=16, Ev=16, H=2, Hk=None, dtype=torch.float32):
    Hk = H if Hk is None else Hk
    return (torch.randn(1, H, L, E, dtype=dtype), torch.randn(1, Hk, S, E, dtype=dtype),
            torch.randn(1, Hk, S, Ev, dtype=dtype))


@pytest.mark.parametrize("case, exc, words", [
    (lambda q, k, v: sdpa(q.long(), k, v), TypeError, "query"),
    (lambda q, k, v: sdpa(q, k.half(), v), TypeError, "dtype"),
    (lambda q, k, v: sdpa(q.numpy(), k, v), TypeError, "query"),
    (lambda q, k, v: sdpa(q[0, 0, 0], k, v), ValueError, "query"),
    (lambda q, k, v: sdpa(q, k[..., :8], v), ValueError, "head dim"),
    (lambda q, k, v: sdpa(q, k, v[..., :5, :]), ValueError, "sequence length"),
    (lambda q, k, v: sdpa(q, k[:, :1].expand(1, 3, 8, 16).clone(), v), ValueError, "broadcast"),
    (lambda q, k, v: sdpa(q.expand(1, 2, 8, 16).repeat(1, 3, 1, 1), k[:, :1].repeat(1, 4, 1, 1),
                          v[:, :1].repeat(1, 4, 1, 1), enable_gqa=True), ValueError, "multiple"),
    (lambda q, k, v: sdpa(q, k, v, attn_mask=torch.ones(3, 3, dtype=torch.bool)), ValueError, "attn_mask"),
    (lambda q, k, v: sdpa(q, k, v, attn_mask=torch.ones(8, 8, dtype=torch.int32)), TypeError, "attn_mask"),
    (lambda q, k, v: sdpa(q, k, v, dropout_p=1.5), ValueError, "dropout_p"),
    (lambda q, k, v: sdpa(q, k, v, scale=float("nan")), ValueError, "scale"),
    (lambda q, k, v: sdpa(q, k, v, softcap=-1.0), ValueError, "softcap"),
    # float32 kernels: a softcap of 1e-46 became 0 there (no cap); 3e38 overflowed into a
    # "holds NaN/Inf" error about finite inputs
    (lambda q, k, v: sdpa(q, k, v, softcap=1e-46), ValueError, "softcap must be a positive "
                                                                "number from 1.2e-38"),
    (lambda q, k, v: sdpa(q, k, v, softcap=3e38), ValueError, "softcap .* float32"),
    (lambda q, k, v: sdpa(q, k, v, scale=3e38), ValueError, "scale must be finite and within"),
    (lambda q, k, v: sdpa(q, k, v, softcap="x"), TypeError, "softcap must be a number"),
    (lambda q, k, v: sdpa(q, k, v, window_size=(3,)), ValueError, "window_size"),
    (lambda q, k, v: sdpa(q, k, v, window_size=(-5, 2)), ValueError, "window_size"),
    (lambda q, k, v: sdpa(q, k, v, backend="fast"), ValueError, "backend"),
    (lambda q, k, v: sdpa(q, k, v, backend="cuda"), BackendError, "cuda"),
    (lambda q, k, v: sdpa(q.double(), k.double(), v.double(), backend="triton"), BackendError,
     "triton"),
    (lambda q, k, v: sdpa(q, k, v, dropout_p=0.1, backend="triton"), BackendError, "dropout"),
    (lambda q, k, v: sdpa(q.double(), k.double(), v.double(), backend="cpu"), BackendError, "float64"),
    (lambda q, k, v: sdpa(q.to("meta"), k, v), ValueError, "device"),
])
def test_bad_arguments(case, exc, words):
    q, k, v = qkv()
    with pytest.raises(exc, match=words):
        case(q, k, v)


def test_head_dim_too_large_for_the_kernel():
    q, k, v = qkv(E=300, Ev=300)
    with pytest.raises(BackendError, match="head dim 300"):
        sdpa(q, k, v, backend="cpu")
    # automatic selection serves it on the reference path and says why
    decision = llmkernels.explain(sdpa, q, k, v)
    assert decision.backend == "reference" and "head dim" in decision.rejected["cpu"]
    torch.testing.assert_close(sdpa(q, k, v), torch.nn.functional.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("where", ["query", "key", "value", "mask"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_raise(backend, where, bad):
    q, k, v = qkv()
    mask = torch.zeros(8, 8)
    target = {"query": q, "key": k, "value": v, "mask": mask}[where]
    if where == "mask" and bad == float("inf"):
        bad = float("nan")  # -inf is a legitimate additive mask value; +inf/NaN are not
    target[..., 3, 2] = bad
    with pytest.raises(ValueError, match="NaN"):
        sdpa(q, k, v, attn_mask=mask, backend=backend)


def test_env_backend_must_be_known(monkeypatch):
    monkeypatch.setenv("LLMKERNELS_BACKEND", "gpu")
    q, k, v = qkv()
    with pytest.raises(ValueError, match="LLMKERNELS_BACKEND"):
        sdpa(q, k, v)


def test_unknown_or_unsupported_tier():
    with pytest.raises(ValueError, match="tier"):
        with llmkernels.use_cpu_tier("sse9"):
            pass


def test_native_rechecks_memory_safety():
    """The extension itself rejects inconsistent views (a Python-side bug must not crash)."""
    from llmkernels._cview import cview
    from llmkernels.backends import native_module
    native = native_module()
    q, k, v = qkv()
    out = torch.empty(1, 2, 8, 16)
    lse = torch.empty(1, 2, 8)
    with pytest.raises(RuntimeError, match="workspace"):
        native.attention_forward(0, cview(q), cview(k), cview(v), None, cview(out), cview(lse),
                                 0, 0, 0.25, 0.0, -1, -1, 0, 1)
    with pytest.raises(RuntimeError, match="out must be"):
        native.attention_forward(0, cview(q), cview(k), cview(v), None, cview(out[..., :4]),
                                 cview(lse), 0, 0, 0.25, 0.0, -1, -1, 0, 1)
    with pytest.raises(RuntimeError, match="tier"):
        native.attention_forward(7, cview(q), cview(k), cview(v), None, cview(out), cview(lse),
                                 0, 0, 0.25, 0.0, -1, -1, 0, 1)


@pytest.mark.skipif(llmkernels.backends.native_module() is None, reason="needs the CPU kernels")
def test_native_checks_key_lengths():
    """Per-sequence key lengths are checked before any key is read: one per batch entry,
    inside the keys given, and only where the decode-shaped kernel serves the call."""
    from llmkernels._cview import cview
    from llmkernels.backends import native_module
    native = native_module()
    q, k, v = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 8, 16), torch.randn(2, 2, 8, 16)
    out, lse = torch.empty(2, 4, 1, 16), torch.empty(2, 4, 1)
    views = (cview(q), cview(k), cview(v), None)
    nbytes = native.attention_forward_workspace_bytes(0, *views, 1)
    ws = torch.empty(nbytes, dtype=torch.uint8)

    def call(lens, qv=q, o=out, ls=lse):
        return native.attention_forward(0, cview(qv), *views[1:], cview(o), cview(ls),
                                        ws.data_ptr(), nbytes, 0.25, 0.0, -1, -1, 7, 1, None,
                                        lens)
    for lens, match in (([3], "key_lens has 1 entries, the batch 2"),
                        ([3, 9], r"key_lens\[1\] = 9 is outside \[0, 8\]"),
                        ([-1, 3], r"key_lens\[0\] = -1 is outside")):
        with pytest.raises(RuntimeError, match=match):
            call(lens)
    assert call([0, 8]) == 0
    q5 = torch.randn(2, 4, 5, 16)  # five queries a head: the tiled kernel, no key_lens
    with pytest.raises(RuntimeError, match="key_lens needs a decode-shaped call"):
        call([3, 8], q5, torch.empty(2, 4, 5, 16), torch.empty(2, 4, 5))


@pytest.mark.skipif(llmkernels.backends.native_module() is None, reason="needs the CPU kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_native_kvcache_append(dtype):
    """The CPU KV append writes each sequence's new tokens at its own position (strided
    caches and tokens too, element by element), and checks everything before a write."""
    from llmkernels._cview import cview
    from llmkernels.backends import native_module
    native = native_module()
    cache = torch.randn(3, 10, 2, 16, dtype=dtype)
    new = torch.randn(3, 2, 2, 32, dtype=dtype)[..., ::2]  # last dim strided
    want = cache.clone()
    for b, n in enumerate([0, 5, 8]):
        want[b, n:n + 2] = new[b]
    got = cache.clone()
    native.kvcache_append(cview(got), cview(new), [0, 5, 8])
    assert torch.equal(got, want)
    wide = torch.randn(3, 10, 2, 32, dtype=dtype)
    strided = wide[..., ::2]  # a strided cache
    strided.copy_(cache)
    dense = new.contiguous()  # (held: a cview keeps no tensor alive)
    native.kvcache_append(cview(strided), cview(dense), [0, 5, 8])
    assert torch.equal(strided, want)
    before = cache.clone()
    other_dtype = new.double()
    for starts, args, match in (
            ([0, 5, 9], (cache, new), "sequence 2 holds 9 cached tokens; with 2 new ones"),
            ([-1, 0, 0], (cache, new), "sequence 0 holds -1"),
            ([0, 5], (cache, new), "starts has 2 entries, the batch 3"),
            ([0, 0, 0], (cache, other_dtype), "share a dtype"),
            ([0, 0, 0], (cache, new[:, :, :1]), r"\(B, n, H, E\)")):
        with pytest.raises(RuntimeError, match=match):
            native.kvcache_append(cview(args[0]), cview(args[1]), starts)
        assert torch.equal(cache, before)


@pytest.mark.skipif(llmkernels.backends.native_module() is None, reason="needs the CPU kernels")
def test_nan_errors_name_the_function_called():
    """attention_varlen and attention_with_kvcache run the CPU attention kernel, whose NaN/Inf
    error named scaled_dot_product_attention."""
    q = torch.randn(5, 2, 8)
    q[1, 0, 0] = float("nan")
    cu = torch.tensor([0, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match="^attention_varlen: 1 output row"):
        llmkernels.attention_varlen(q, torch.randn(5, 2, 8), torch.randn(5, 2, 8), cu, cu, 5, 5,
                                    backend="cpu")
    with pytest.raises(ValueError, match="^attention_with_kvcache: 2 output row"):
        llmkernels.attention_with_kvcache(torch.full((1, 1, 2, 8), float("nan")),
                                          torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8), 3,
                                          backend="cpu")
