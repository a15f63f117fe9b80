"""attention_with_kvcache on every path against the float64 reference: ragged cache lengths,
the in-place append, bottom-right bands, decode splits; and its bad-input errors."""
import pytest
import torch

import llmkernels
from attention_utils import judge
from gpu_paths import DEVICE, ON_GPU, force_splits, skip_unless_runs  # noqa: F401
from llmkernels.reference import attention_kvcache_reference

PATHS = ["cpu", "triton", "cuda", "reference"]


def run_kvcache(path, B, Lq, Lnew, Hq, Hk, S, E, dtype, cached, check_lengths=True, **kw):
    device = "cpu" if path == "cpu" else DEVICE
    if path == "cuda" and not ON_GPU:
        pytest.skip("CUDA kernels need a GPU")
    q = torch.randn(B, Lq, Hq, E, dtype=dtype, device=device)
    k_cache = torch.randn(B, S, Hk, E, dtype=dtype, device=device)
    v_cache = torch.randn(B, S, Hk, E, dtype=dtype, device=device)
    if path in ("triton", "cuda"):
        skip_unless_runs(path, q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2))
    lens = torch.tensor(cached, dtype=torch.int32, device=device)
    new = {}
    if Lnew:
        new = dict(k_new=torch.randn(B, Lnew, Hk, E, dtype=dtype, device=device),
                   v_new=torch.randn(B, Lnew, Hk, E, dtype=dtype, device=device))
    k_before, v_before = k_cache.clone(), v_cache.clone()
    out = llmkernels.attention_with_kvcache(q, k_cache, v_cache, lens, backend=path,
                                            check_lengths=check_lengths, **new, **kw)
    assert out.shape == (B, Lq, Hq, E)
    # The append: new tokens at cached[b] .., every other slot untouched.
    k_expect, v_expect = k_before.clone(), v_before.clone()
    for b, n in enumerate(cached):
        if Lnew:
            k_expect[b, n:n + Lnew] = new["k_new"][b]
            v_expect[b, n:n + Lnew] = new["v_new"][b]
    assert torch.equal(k_cache, k_expect) and torch.equal(v_cache, v_expect)
    total = [n + Lnew for n in cached]
    exact = attention_kvcache_reference(q.double(), k_cache.double(), v_cache.double(), total, **kw)
    same = attention_kvcache_reference(q, k_cache, v_cache, total, work_dtype=q.dtype, **kw)
    judge("out", out, same, exact, dtype)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_one_token_ragged(path, dtype):
    run_kvcache(path, 4, 1, 1, 8, 2, 80, 64, dtype, [0, 37, 79, 12])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("Lq,Hq,Hk,E,kw", [
    (1, 8, 2, 64, {}),
    (1, 4, 4, 40, dict(softcap=5.0)),
    (2, 6, 2, 128, dict(is_causal=True, window_size=(300, 0))),
    (4, 16, 2, 32, dict(is_causal=True))])
def test_ragged_decoding_takes_one_kernel_call(monkeypatch, dtype, Lq, Hq, Hk, E, kw):
    """Decode-shaped calls over caches of different lengths take one kernel call, which stops
    each sequence at its own length: slots past it hold NaN here, which would reach the
    output (an error) if read. Lengths around the kernel's key blocks and chunks (64, 512),
    a sequence with no cached keys, GQA, windows, softcap; against the reference."""
    import importlib
    kv = importlib.import_module("llmkernels.ops.attention_kvcache")
    calls = []
    real = kv._forward_cpu_views

    def counted(*args, **kwargs):
        calls.append(args[-1] if len(args) > 9 else kwargs.get("key_lens"))
        return real(*args, **kwargs)
    monkeypatch.setattr(kv, "_forward_cpu_views", counted)
    torch.manual_seed(Lq + Hq + E)
    cached, S = [0, 63, 1300, 64, 511, 5], 1310
    B = len(cached)
    q = torch.randn(B, Lq, Hq, E, dtype=dtype)
    k_cache = torch.randn(B, S, Hk, E, dtype=dtype)
    v_cache = torch.randn(B, S, Hk, E, dtype=dtype)
    k_new = torch.randn(B, Lq, Hk, E, dtype=dtype)
    v_new = torch.randn(B, Lq, Hk, E, dtype=dtype)
    for b, n in enumerate(cached):
        k_cache[b, n:] = float("nan")
        v_cache[b, n:] = float("nan")
    lens = torch.tensor(cached, dtype=torch.int32)
    with torch.no_grad():
        out = llmkernels.attention_with_kvcache(q, k_cache, v_cache, lens, k_new=k_new,
                                                v_new=v_new, backend="cpu", **kw)
    total = [n + Lq for n in cached]
    assert calls == [total]
    exact = attention_kvcache_reference(q.double(), k_cache.double(), v_cache.double(), total,
                                        **kw)
    same = attention_kvcache_reference(q, k_cache, v_cache, total, work_dtype=q.dtype, **kw)
    judge("out", out, same, exact, dtype)


def test_ragged_calls_the_kernel_cannot_take_in_one_go_run_per_sequence(monkeypatch):
    """Many queries a kv head (a prompt's chunk; here 40 rows a kv head) keep one call a
    sequence."""
    import importlib
    kv = importlib.import_module("llmkernels.ops.attention_kvcache")
    calls = []
    real = kv.cpu_forward
    monkeypatch.setattr(kv, "cpu_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    run_kvcache("cpu", 3, 5, 5, 16, 2, 64, 32, torch.float32, [10, 0, 59], is_causal=True)
    assert len(calls) == 3


@pytest.mark.parametrize("path", PATHS)
def test_chunked_prefill_causal(path):
    # several new tokens per sequence: causal, aligned so that the last query sees every key
    run_kvcache(path, 3, 5, 5, 4, 4, 64, 32, torch.float32, [10, 0, 59], is_causal=True)


@pytest.mark.parametrize("path", PATHS)
def test_sliding_window_without_append(path):
    run_kvcache(path, 2, 2, 0, 4, 1, 70, 64, torch.float16, [70, 33], is_causal=True,
                window_size=(16, 0), softcap=10.0)


@pytest.mark.parametrize("path", PATHS)
def test_window_sides_near_int32s_end_are_unbounded(path):
    """A "no window" sentinel of 2^31 - 1: the Triton band arithmetic is int32 there and
    wrapped (wrong rows)."""
    run_kvcache(path, 2, 1, 0, 4, 2, 48, 16, torch.float32, [40, 17],
                window_size=(2**31 - 1, 2**31 - 1))


def test_flash_decoding_splits(force_splits):
    for splits in (2, 5):
        force_splits(splits)
        run_kvcache("triton", 3, 1, 1, 8, 2, 150, 64, torch.bfloat16, [149, 3, 100])


@pytest.mark.parametrize("path", ["triton", "cuda", "cpu"])
def test_unchecked_lengths_same_result(path):
    """check_lengths=False (no device sync, CUDA-graph capturable) computes the same."""
    run_kvcache(path, 3, 1, 2, 4, 2, 60, 64, torch.bfloat16, [0, 30, 58], check_lengths=False)


def test_unchecked_bad_lengths_stay_in_bounds():
    q = torch.randn(2, 1, 2, 16, device=DEVICE)
    kc, vc = torch.randn(2, 8, 2, 16, device=DEVICE), torch.randn(2, 8, 2, 16, device=DEVICE)
    lens = torch.tensor([100, -5], dtype=torch.int32, device=DEVICE)
    new = dict(k_new=torch.randn(2, 1, 2, 16, device=DEVICE), v_new=torch.randn(2, 1, 2, 16, device=DEVICE))
    out = llmkernels.attention_with_kvcache(q, kc, vc, lens, check_lengths=False,
                                            backend="triton", **new)
    assert out.shape == (2, 1, 2, 16) and torch.isfinite(out).all()


@pytest.mark.parametrize("path", ["cpu", "reference"])
def test_unchecked_bad_lengths_leave_the_cache_intact_where_lengths_are_read(path):
    """The CPU and reference paths read the lengths anyway: check_lengths=False there still
    raises before k_new / v_new are written (they went into a clamped slot, then it raised)."""
    q = torch.randn(2, 1, 1, 4)
    kc, vc = torch.zeros(2, 8, 1, 4), torch.zeros(2, 8, 1, 4)
    new = torch.ones(2, 1, 1, 4)
    with pytest.raises(ValueError, match="outside the cache"):
        llmkernels.attention_with_kvcache(q, kc, vc, torch.tensor([8, 0], dtype=torch.int32),
                                          k_new=new, v_new=new, check_lengths=False,
                                          backend=path)
    assert kc.abs().max() == 0 and vc.abs().max() == 0


def test_same_length_batch_on_cpu_uses_one_call():
    run_kvcache("cpu", 3, 1, 1, 4, 2, 40, 32, torch.float32, [20, 20, 20], is_causal=True)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cached", [[0, 0], [48, 48], [30]])
def test_append_at_one_length(path, cached):
    """Sequences of one length append with slice copies (the indexed write serves ragged
    ones): at the cache's start, up to its last slot, batch 1."""
    run_kvcache(path, len(cached), 2, 2, 4, 2, 50, 32, torch.bfloat16, cached, is_causal=True)


def test_int_cache_seqlens():
    q = torch.randn(2, 1, 2, 16)
    kc, vc = torch.randn(2, 8, 2, 16), torch.randn(2, 8, 2, 16)
    out = llmkernels.attention_with_kvcache(q, kc, vc, 5)
    ref = attention_kvcache_reference(q, kc, vc, [5, 5])
    torch.testing.assert_close(out, ref)
    kn, vn = torch.randn(2, 1, 2, 16), torch.randn(2, 1, 2, 16)
    k_before = kc.clone()
    out = llmkernels.attention_with_kvcache(q, kc, vc, 5, k_new=kn, v_new=vn)
    assert torch.equal(kc[:, 5:6], kn) and torch.equal(vc[:, 5:6], vn)
    assert torch.equal(kc[:, :5], k_before[:, :5]) and torch.equal(kc[:, 6:], k_before[:, 6:])
    torch.testing.assert_close(out, attention_kvcache_reference(q, kc, vc, [6, 6]))


class TestBadInput:
    def args(self, **over):
        a = dict(q=torch.randn(2, 1, 4, 16), k_cache=torch.randn(2, 10, 2, 16),
                 v_cache=torch.randn(2, 10, 2, 16),
                 cache_seqlens=torch.tensor([3, 9], dtype=torch.int32),
                 k_new=torch.randn(2, 1, 2, 16), v_new=torch.randn(2, 1, 2, 16))
        a.update(over)
        return a

    def test_caches_past_int32_slots_are_refused(self):
        """An append at slot 2**31 raised torch's int32 conversion error from inside the call
        (the kernels' lengths and positions are int32)."""
        cache = torch.zeros(2, 1, 2, 16).expand(2, 2**31 + 2, 2, 16)  # no memory
        with pytest.raises(ValueError, match="slots per sequence"):
            llmkernels.attention_with_kvcache(torch.randn(2, 1, 4, 16), cache, cache, 2**31)

    @pytest.mark.parametrize("over,err,match", [
        (dict(cache_seqlens=torch.tensor([3, 10], dtype=torch.int32)), ValueError,
         "outside the cache"),
        (dict(cache_seqlens=torch.tensor([-1, 2], dtype=torch.int32)), ValueError,
         "outside the cache"),
        (dict(cache_seqlens=torch.tensor([3.0, 2.0])), TypeError, "int32"),
        (dict(cache_seqlens=torch.tensor([3], dtype=torch.int32)), ValueError, "shape \\(2,\\)"),
        (dict(v_new=None), ValueError, "both k_new and v_new"),
        (dict(k_new=torch.randn(2, 1, 3, 16)), ValueError, "k_new must be"),
        (dict(k_new=torch.randn(2, 2, 2, 16)), ValueError, "tokens"),
        (dict(q=torch.randn(2, 1, 4, 16, dtype=torch.float16)), TypeError, "share a dtype"),
        (dict(q=torch.randn(2, 1, 3, 16)), ValueError, "multiple"),
        (dict(q=torch.randn(1, 4, 16)), ValueError, "4 dims"),
        (dict(q=torch.randn(2, 1, 4, 16, requires_grad=True)), ValueError, "no backward"),
        (dict(window_size=(1, 2, 3)), ValueError, "window_size"),
    ])
    def test_errors_leave_the_cache_alone(self, over, err, match):
        a = self.args(**over)
        k_before = a["k_cache"].clone()
        with pytest.raises(err, match=match):
            llmkernels.attention_with_kvcache(**a)
        assert torch.equal(a["k_cache"], k_before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("Hq,Hk", [(4, 4), (8, 2)])
@pytest.mark.parametrize("scale,softcap", [(None, None), (0.3, None), (None, 5.0)])
def test_decode_step_cpu_is_attention_with_kvcache(dtype, Hq, Hk, scale, softcap):
    """transformers' decoding steps call the CPU kernel directly (decode_step_cpu): the same
    numbers as attention_with_kvcache over the whole cache."""
    from llmkernels.ops.attention_kvcache import decode_step_cpu
    torch.manual_seed(0)
    B, S, D = 2, 37, 64
    q4 = torch.randn(B, Hq, 1, D, dtype=dtype)
    k4 = torch.randn(B, Hk, S, D, dtype=dtype)
    v4 = torch.randn(B, Hk, S, D, dtype=dtype)
    with torch.no_grad():
        got = decode_step_cpu(q4, k4, v4, scale, softcap)
        want = llmkernels.attention_with_kvcache(q4.transpose(1, 2), k4.transpose(1, 2),
                                                 v4.transpose(1, 2), S, scale=scale,
                                                 softcap=softcap, backend="cpu")
    assert got is not None and got.shape == want.shape == (B, 1, Hq, D)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_decode_step_cpu_hands_back_what_it_does_not_serve():
    from llmkernels.ops.attention_kvcache import decode_step_cpu
    q4, k4, v4 = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16)
    with torch.no_grad():
        assert decode_step_cpu(q4, k4, v4) is not None
        assert decode_step_cpu(torch.randn(1, 4, 2, 16), k4, v4) is None  # two query tokens
        assert decode_step_cpu(q4.double(), k4.double(), v4.double()) is None
        assert decode_step_cpu(q4.half(), k4, v4) is None  # mixed dtypes: the op's error
        assert decode_step_cpu(q4, k4[:, :, :0], v4[:, :, :0]) is None  # no keys
        assert decode_step_cpu(torch._neg_view(q4), k4, v4) is None
        assert decode_step_cpu(torch.randn(1, 3, 1, 16), k4, v4) is None  # 3 heads over 2
        assert decode_step_cpu(q4.to("meta"), k4.to("meta"), v4.to("meta")) is None
        with llmkernels.use_backend("reference"):
            assert decode_step_cpu(q4, k4, v4) is None
    assert decode_step_cpu(q4.clone().requires_grad_(), k4, v4) is None
    with torch.no_grad(), pytest.raises(ValueError, match="scale must be finite"):
        decode_step_cpu(q4, k4, v4, float("inf"))
    bad = k4.clone()
    bad[0, 0, 3, 0] = float("nan")
    with torch.no_grad(), pytest.raises(ValueError, match="attention_with_kvcache: .*NaN"):
        decode_step_cpu(q4, bad, v4)


def _general_path_counter(monkeypatch):
    """Counts the calls that reach attention_with_kvcache's general path (_KVCall)."""
    import importlib
    kv = importlib.import_module("llmkernels.ops.attention_kvcache")
    taken = []
    real = kv._KVCall

    def counted(*args, **kwargs):
        taken.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(kv, "_KVCall", counted)
    return taken


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,Hq,Hk", [(1, 12, 4), (3, 4, 4)])
@pytest.mark.parametrize("lengths", ["int", "int32", "int64", "ragged int32", "ragged int64"])
@pytest.mark.parametrize("n_new", [0, 1, 3])
def test_eager_decoding_steps_skip_the_general_path(monkeypatch, dtype, B, Hq, Hk, lengths,
                                                    n_new):
    """Plain eager CPU decoding steps (one query token a sequence, no window) go to the
    kernel from _cpu_eager, the caches seen through strided views: the same numbers and the
    same append as the general path (backend="cpu"), which they skip."""
    torch.manual_seed(n_new + B)
    D, S, cached = 64, 40, 21
    q = torch.randn(B, 1, Hq, D, dtype=dtype)
    # caches inside a larger buffer (as a preallocated one sliced per layer): strided views
    k_cache = torch.randn(B, S, Hk + 1, D, dtype=dtype)[:, :, 1:]
    v_cache = torch.randn(B, S, Hk + 1, D, dtype=dtype)[:, :, 1:]
    ragged = torch.tensor([cached, 0, S - 3][:B])  # (B = 1: one length)
    lens = {"int": cached, "int32": torch.full((B,), cached, dtype=torch.int32),
            "int64": torch.full((B,), cached, dtype=torch.int64),
            "ragged int32": ragged.int(), "ragged int64": ragged}[lengths]
    new = {}
    if n_new:
        new = dict(k_new=torch.randn(B, n_new, Hk, D, dtype=dtype),
                   v_new=torch.randn(B, n_new, Hk, D, dtype=dtype))
    k2, v2 = k_cache.clone(), v_cache.clone()
    for kw in (dict(), dict(is_causal=True), dict(scale=0.3, softcap=4.0)):
        k_cache.copy_(k2), v_cache.copy_(v2)
        k_want, v_want = k2.clone(), v2.clone()
        with torch.no_grad():
            want = llmkernels.attention_with_kvcache(q, k_want, v_want, lens, backend="cpu",
                                                     **new, **kw)
            taken = _general_path_counter(monkeypatch)
            got = llmkernels.attention_with_kvcache(q, k_cache, v_cache, lens, **new, **kw)
            monkeypatch.undo()
        assert not taken, "the general path ran"
        assert got.shape == want.shape == (B, 1, Hq, D) and got.dtype == dtype
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert torch.equal(k_cache, k_want) and torch.equal(v_cache, v_want)


def test_eager_decoding_leaves_other_calls_to_the_general_path(monkeypatch):
    torch.manual_seed(0)
    q, kc, vc = torch.randn(2, 1, 4, 16), torch.randn(2, 10, 2, 16), torch.randn(2, 10, 2, 16)
    kn, vn = torch.randn(2, 1, 2, 16), torch.randn(2, 1, 2, 16)
    same = torch.tensor([3, 3], dtype=torch.int32)
    cases = {
        "ragged, 40 query heads a kv head": lambda: llmkernels.attention_with_kvcache(
            torch.randn(2, 1, 80, 16), kc, vc, torch.tensor([3, 5], dtype=torch.int32)),
        "window": lambda: llmkernels.attention_with_kvcache(q, kc, vc, same, window_size=(2, 0)),
        "unchecked lengths": lambda: llmkernels.attention_with_kvcache(q, kc, vc, same,
                                                                       check_lengths=False),
        "two query tokens": lambda: llmkernels.attention_with_kvcache(
            torch.randn(2, 2, 4, 16), kc, vc, same, is_causal=True),
        "forced": lambda: llmkernels.attention_with_kvcache(q, kc, vc, same, backend="cpu"),
        "negated q": lambda: llmkernels.attention_with_kvcache(torch._neg_view(q), kc, vc, same),
        "no keys": lambda: llmkernels.attention_with_kvcache(q, kc, vc, 0),
        "float64": lambda: llmkernels.attention_with_kvcache(q.double(), kc.double(),
                                                             vc.double(), same),
    }
    for name, call in cases.items():
        taken = _general_path_counter(monkeypatch)
        with torch.no_grad():
            call()
        monkeypatch.undo()
        assert taken, f"{name}: the fast path took a call it must leave"
    # a negated view is read as its values
    with torch.no_grad():
        torch.testing.assert_close(
            llmkernels.attention_with_kvcache(torch._neg_view(q), kc, vc, same),
            llmkernels.attention_with_kvcache(-q, kc, vc, same), rtol=0, atol=0)
    # the general path's errors, the caches untouched
    k_before = kc.clone()
    for lens, err, match in ((9, ValueError, "outside the cache"),
                             (-1, ValueError, "outside the cache"),
                             (torch.tensor([3, 9]), ValueError, "sequence 1 holds 9"),
                             (torch.tensor([-1, 3]), ValueError, "sequence 0 holds -1"),
                             (torch.tensor([3.0, 3.0]), TypeError, "int32")):
        with pytest.raises(err, match=match):
            llmkernels.attention_with_kvcache(q, kc, vc, lens, k_new=torch.randn(2, 2, 2, 16),
                                              v_new=torch.randn(2, 2, 2, 16))
        assert torch.equal(kc, k_before)
    with pytest.raises(ValueError, match="no backward"):
        llmkernels.attention_with_kvcache(q.clone().requires_grad_(), kc, vc, same)
    with pytest.raises(ValueError, match="k_new must be"):
        llmkernels.attention_with_kvcache(q, kc, vc, same, k_new=torch.randn(2, 1, 3, 16),
                                          v_new=vn)
    assert torch.equal(kc, k_before)
    out = llmkernels.attention_with_kvcache(q, kc, vc, same, k_new=kn, v_new=vn)
    assert torch.equal(kc[:, 3:4], kn)
    torch.testing.assert_close(out, attention_kvcache_reference(q, kc, vc, [4, 4]))
