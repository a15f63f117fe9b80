"""The fused CPU attention kernel against the float64 reference (DESIGN.md numerics rule),
forward and backward, over the feature grid: dtypes, head dims, odd lengths, causal,
GQA/MQA, sliding windows, softcap, bool/additive masks, non-contiguous inputs, every CPU tier."""
import pytest
import torch

import llmkernels
from attention_utils import judge_call, make_qkv

KERNEL_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def run_case(B, Hq, Hk, L, S, E, Ev, dtype, *, backward=True, layout="bhsd", mask_kind=None,
             **kw):
    q, k, v = make_qkv(B, Hq, Hk, L, S, E, Ev, dtype, layout, requires_grad=backward)
    if Hq != Hk:
        kw["enable_gqa"] = True
    if mask_kind == "bool":
        mask = torch.rand(L, S) > 0.3
        kw["attn_mask"] = mask
    elif mask_kind == "additive":
        kw["attn_mask"] = (torch.randn(B, 1, L, S) * 2).to(dtype)
    out = llmkernels.scaled_dot_product_attention(q, k, v, backend="cpu", **kw)
    judge_call(out, q, k, v, dtype, backward, **kw)


SHAPES = [  # (L, S): ones, primes, non-multiples of every tile size, L != S both ways
    (1, 1), (1, 131), (131, 1), (37, 53), (128, 128), (200, 97), (257, 300),
]


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("L,S", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
def test_shapes_and_dtypes(cpu_tier, dtype, L, S, causal):
    run_case(2, 3, 3, L, S, 40, 40, dtype, is_causal=causal)


@pytest.mark.parametrize("E,Ev", [(8, 8), (64, 64), (128, 128), (256, 256), (40, 24), (96, 200), (3, 5)])
def test_head_dims(cpu_tier, E, Ev):
    run_case(1, 2, 2, 70, 90, E, Ev, torch.float32, is_causal=True)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("Hq,Hk", [(4, 2), (6, 1), (8, 4)])
def test_gqa_mqa(cpu_tier, dtype, Hq, Hk):
    run_case(2, Hq, Hk, 65, 130, 32, 32, dtype, is_causal=True)


@pytest.mark.parametrize("window", [(0, 0), (5, None), (None, 7), (16, 16), (64, 0), (300, 300)])
@pytest.mark.parametrize("causal", [False, True])
def test_sliding_window(cpu_tier, window, causal):
    run_case(1, 2, 2, 150, 170, 32, 32, torch.float32, is_causal=causal, window_size=window)


@pytest.mark.parametrize("path", ["cpu", "reference"])
@pytest.mark.parametrize("window", [(None, 2**63 - 1), (2**63 - 1, 2**62), (2**42 + 1, None)])
def test_windows_past_any_sequence_are_unbounded(path, window):
    """A side near int64's end is no window at all: i + offset + side overflowed (the kernel
    gave zeros, the reference other numbers); every path clamps it as the CUDA band does."""
    q, k, v = make_qkv(1, 2, 2, 5, 7, 16, 16, torch.float32)
    whole = llmkernels.scaled_dot_product_attention(q, k, v, backend="reference")
    out = llmkernels.scaled_dot_product_attention(q, k, v, window_size=window, backend=path)
    torch.testing.assert_close(out, whole, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("softcap", [0.5, 20.0, 1e4])
def test_softcap(cpu_tier, dtype, softcap):
    # 1e4: scores / softcap near 0, where 1 - 2 / (e^2x + 1) cancels (the kernel's tanh had an
    # absolute error ~1e-7 there, 1600x torch's float32 error once multiplied by softcap)
    run_case(1, 3, 1, 90, 100, 64, 64, dtype, is_causal=True, softcap=softcap, scale=0.3)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
@pytest.mark.parametrize("causal", [False, True])
def test_masks(cpu_tier, dtype, mask_kind, causal):
    run_case(2, 2, 2, 67, 75, 32, 16, dtype, mask_kind=mask_kind, is_causal=causal)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_non_contiguous_bshd_layout(cpu_tier, dtype):
    run_case(2, 4, 2, 77, 77, 64, 64, dtype, layout="bshd", is_causal=True, window_size=(20, 0))


def test_everything_at_once(cpu_tier):
    run_case(2, 4, 2, 99, 140, 48, 40, torch.bfloat16, layout="bshd", mask_kind="additive",
             is_causal=True, window_size=(33, None), softcap=5.0, scale=0.2)


def test_batch_shapes_and_broadcasting():
    # 3-D and 5-D inputs, and a key/value batch broadcast against the query's
    q = torch.randn(5, 33, 16)
    k, v = torch.randn(5, 40, 16), torch.randn(5, 40, 8)
    out = llmkernels.scaled_dot_product_attention(q, k, v, backend="cpu")
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)

    q5 = torch.randn(2, 3, 4, 21, 16, requires_grad=True)
    k5 = torch.randn(1, 3, 4, 30, 16, requires_grad=True)
    v5 = torch.randn(2, 1, 4, 30, 16, requires_grad=True)
    out = llmkernels.scaled_dot_product_attention(q5, k5, v5, is_causal=True, backend="cpu")
    ref = torch.nn.functional.scaled_dot_product_attention(q5, k5, v5, is_causal=True)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    g = torch.randn_like(out)
    ours = torch.autograd.grad(out, (q5, k5, v5), g)
    theirs = torch.autograd.grad(ref, (q5, k5, v5), g)
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_matches_torch_sdpa_defaults():
    # Same semantics as SDPA for plain, causal (top-left aligned when L != S) and masked calls.
    q, k, v = make_qkv(2, 4, 4, 50, 80, 64, 64, torch.float32)
    mask = torch.rand(50, 80) > 0.5
    mask[:, 0] = True
    for kw in ({}, {"is_causal": True}, {"attn_mask": mask}, {"scale": 0.05}):
        out = llmkernels.scaled_dot_product_attention(q, k, v, **kw)
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, **kw)
        torch.testing.assert_close(out, ref, atol=3e-6, rtol=1e-5)


def test_fully_masked_rows_give_zeros_not_nan(cpu_tier):
    q, k, v = make_qkv(1, 2, 2, 10, 12, 16, 16, torch.float32, requires_grad=True)
    mask = torch.rand(10, 12) > 0.5
    mask[3] = False  # row 3 sees nothing
    additive = torch.zeros(10, 12).masked_fill(~mask, float("-inf"))
    for m in (mask, additive):
        out = llmkernels.scaled_dot_product_attention(q, k, v, attn_mask=m, backend="cpu")
        assert torch.isfinite(out).all()
        assert (out[..., 3, :] == 0).all()
        ref = llmkernels.scaled_dot_product_attention(q, k, v, attn_mask=m, backend="reference")
        torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        assert all(torch.isfinite(g).all() for g in grads)
    # a diagonal band with more queries than keys leaves the last queries with none
    out = llmkernels.scaled_dot_product_attention(q, k[:, :, :5], v[:, :, :5], window_size=(0, 0),
                                                  backend="cpu")
    assert torch.isfinite(out).all() and (out[..., 5:, :] == 0).all()
    assert (out[..., :5, :] != 0).any()
    # no keys at all
    empty_k, empty_v = torch.randn(1, 2, 0, 16), torch.randn(1, 2, 0, 16)
    out = llmkernels.scaled_dot_product_attention(q.detach(), empty_k, empty_v, backend="cpu")
    assert out.shape == (1, 2, 10, 16) and (out == 0).all()


def test_empty_queries():
    q, k, v = torch.randn(2, 3, 0, 16), torch.randn(2, 3, 5, 16), torch.randn(2, 3, 5, 16)
    out = llmkernels.scaled_dot_product_attention(q, k, v, backend="cpu")
    assert out.shape == (2, 3, 0, 16)


def test_thread_counts_agree():
    q, k, v = make_qkv(1, 3, 3, 300, 300, 64, 64, torch.float32, requires_grad=True)
    results = []
    before = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out = llmkernels.scaled_dot_product_attention(q, k, v, is_causal=True, backend="cpu")
            results.append((out, *torch.autograd.grad(out.sum(), (q, k, v))))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", [None, "reference"])
def test_dropout_follows_torch_manual_seed(backend):
    q, k, v = make_qkv(1, 2, 2, 40, 40, 16, 16, torch.float32)
    torch.manual_seed(1)
    a = llmkernels.scaled_dot_product_attention(q, k, v, dropout_p=0.5, backend=backend)
    torch.manual_seed(1)
    b = llmkernels.scaled_dot_product_attention(q, k, v, dropout_p=0.5, backend=backend)
    c = llmkernels.scaled_dot_product_attention(q, k, v, backend=backend)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    decision = llmkernels.explain(llmkernels.scaled_dot_product_attention, q, k, v, dropout_p=0.5)
    assert decision.backend == "cpu" and "dropout fused" in decision.detail


def test_float_mask_gradient():
    q, k, v = make_qkv(1, 2, 2, 20, 24, 16, 16, torch.float32, requires_grad=True)
    mask = torch.randn(20, 24, requires_grad=True)
    out = llmkernels.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    (gm,) = torch.autograd.grad(out.sum(), (mask,))
    ref_mask = mask.detach().double().requires_grad_()
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                                           attn_mask=ref_mask)
    (gr,) = torch.autograd.grad(ref.sum(), (ref_mask,))
    torch.testing.assert_close(gm.double(), gr, atol=1e-5, rtol=1e-4)


def test_gradcheck_reference_spec():
    """The reference path (the specification) has correct gradients, masks and extras included."""
    q, k, v = (torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.randn(5, 5, dtype=torch.float64, requires_grad=True)
    fn = lambda q, k, v, m: llmkernels.scaled_dot_product_attention(  # noqa: E731
        q, k, v, attn_mask=m, is_causal=True, window_size=(2, None), softcap=2.0)
    assert torch.autograd.gradcheck(fn, (q, k, v, mask))


@pytest.mark.filterwarnings("ignore:Input #")
def test_gradcheck_kernel_in_float32():
    """The kernel's backward by finite differences of its own forward (float32, loose eps)."""
    q, k, v = (torch.randn(1, 2, 9, 8, requires_grad=True) for _ in range(3))
    fn = lambda q, k, v: llmkernels.scaled_dot_product_attention(  # noqa: E731
        q, k, v, is_causal=True, softcap=3.0, backend="cpu")
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-2, atol=5e-3, rtol=5e-2)


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_extra_memory_grows_linearly_with_sequence_length(direction):
    """Never an L x S matrix: the kernel's workspace is linear in the sequence length."""
    from llmkernels._cview import cview
    from llmkernels.backends import cpu_tier_code, native_module
    fn = getattr(native_module(), f"attention_{direction}_workspace_bytes")
    sizes = []
    for n in (1024, 4096):
        q, k, v = (torch.empty(1, 2, n, 64) for _ in range(3))
        sizes.append(fn(cpu_tier_code(), cview(q), cview(k), cview(v), None, 2))
    assert sizes[1] <= 4.2 * sizes[0], sizes  # 4x the length: at most ~4x the memory, not 16x


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_workspace_is_bounded_for_large_batches(direction):
    """Heads are processed in rounds: 16x the batch does not mean 16x the workspace."""
    from llmkernels._cview import cview
    from llmkernels.backends import cpu_tier_code, native_module
    fn = getattr(native_module(), f"attention_{direction}_workspace_bytes")
    sizes = []
    for batch in (4, 64):
        q, k, v = (torch.empty(1, 1, 1024, 64).expand(batch, 16, 1024, 64) for _ in range(3))
        sizes.append(fn(cpu_tier_code(), cview(q), cview(k), cview(v), None, 2))
    assert sizes[1] <= 1.5 * sizes[0] + (40 << 20), sizes


@pytest.fixture
def one_head_per_round():
    from llmkernels.backends import native_module
    native_module().attention_set_round_bytes(1)
    try:
        yield
    finally:
        native_module().attention_set_round_bytes(0)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_many_rounds_of_heads(cpu_tier, dtype, one_head_per_round):
    """Large problems run batch x kv-head pairs in rounds; force one head per round."""
    run_case(3, 4, 2, 70, 90, 32, 24, dtype, is_causal=True, mask_kind="additive")


def _forward_workspace_bytes(B, Hq, Hk, L, S, D, dtype=torch.float32):
    from llmkernels._cview import cview
    from llmkernels.backends import cpu_tier_code, native_module
    q = torch.empty(1, 1, 1, D, dtype=dtype).expand(B, Hq, L, D)  # no memory
    k = torch.empty(1, 1, 1, D, dtype=dtype).expand(B, Hk, S, D)
    return native_module().attention_forward_workspace_bytes(cpu_tier_code(), cview(q), cview(k),
                                                             cview(k), None, 2)


@pytest.mark.parametrize("L,Hq", [(0, 8), (1, 8), (4, 32)])
def test_decode_workspace_for_empty_and_wide_calls(cpu_tier, L, Hq):
    """The decode schedule's workspace size: no query rows (L 0) once divided by zero in the
    native call (SIGFPE); many tiny heads keep the per-thread state bounded."""
    assert _forward_workspace_bytes(1, Hq, 8, L, 300, 64) >= 0
    assert _forward_workspace_bytes(1, 1024, 1024, 1, 300, 1) < 8 << 20


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("L", [5, 70, 130])
def test_keys_in_segments(cpu_tier, dtype, L, one_head_per_round):
    """Queries beyond the decode schedule against many keys pack the keys a segment at a time
    (here one tile: the budget is forced down) and carry each query tile's softmax state
    between segments."""
    assert _forward_workspace_bytes(1, 2, 1, L, 1500, 64) < 1500 * 128 * 4  # not all keys
    run_case(2, 4, 2, L, 700, 32, 24, dtype, is_causal=True, mask_kind="additive")
    run_case(1, 2, 1, L, 1500, 64, 64, dtype, window_size=(300, 40), softcap=5.0)
    run_case(1, 3, 3, L, 200, 40, 40, dtype, mask_kind="bool")


def test_few_queries_against_long_keys_take_a_bounded_workspace():
    """A 64-query chunk against a 64K-key cache packed whole-length K and V in float32 for 2
    heads a thread (257 MiB on 2 threads, where SDPA takes 3 MiB): the keys now come in
    segments and the workspace stays near the 8 MiB round budget."""
    assert _forward_workspace_bytes(1, 32, 8, 64, 65536, 128, torch.float16) < 16 << 20
    # a prompt (queries as many as keys) still packs its keys once: no state to carry
    assert _forward_workspace_bytes(1, 8, 8, 4096, 4096, 64) > 8 << 20


@pytest.mark.parametrize("L", [1, 2, 4])
@pytest.mark.parametrize("S", [1, 70, 1500])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_decode_shaped_calls(cpu_tier, L, S, dtype):
    """A few queries against many keys take the streaming (flash-decoding) schedule; long
    key ranges are split across threads and merged."""
    run_case(1, 8, 2, L, S, 64, 48, dtype)
    run_case(2, 4, 1, L, S, 32, 32, dtype, mask_kind="additive", softcap=4.0,
             window_size=(None, 600))


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_decode_shaped_calls_in_head_groups(cpu_tier, dtype):
    """The streaming schedule takes several kv heads per item, key block by key block (up to
    256 KiB of K and V a block): wide heads make groups of 2-4, the last one shorter."""
    for layout in ("bhsd", "bshd"):
        run_case(1, 6, 3, 1, 700, 256, 256, dtype, layout=layout, backward=False)
        run_case(1, 10, 5, 2, 1300, 256, 200, dtype, layout=layout, backward=False,
                 mask_kind="additive", softcap=6.0)
        run_case(2, 8, 2, 1, 300, 36, 20, dtype, layout=layout, backward=False,
                 window_size=(100, None))


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("E,Ev", [(128, 128), (64, 96), (80, 48), (40, 40), (8, 16)])
def test_decode_reads_caches_in_place_or_through_tiles(cpu_tier, dtype, E, Ev):
    """The streaming schedule reads K and V rows in the cache where their head dims are whole
    pairs of vectors (float32: whole vectors; bf16 rows split into their even and odd elements,
    the query rows split the same way and the output rows joined back), through float32 tiles
    otherwise (head dims 40 and 8 of 16-bit caches, 80 on AVX-512; float32's 40 is five vectors
    on AVX2: P V takes two pairs and one vector). Query rows per kv head from 1 to 12 take
    blocks of 4, 2 and 1 rows."""
    for Hq, Hk, L in ((2, 2, 1), (6, 2, 1), (5, 1, 1), (8, 1, 1), (6, 2, 4)):
        run_case(1, Hq, Hk, L, 333, E, Ev, dtype, layout="bshd", backward=False)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_decode_reads_strided_head_dims_through_tiles(cpu_tier, dtype):
    q, k, v = make_qkv(1, 4, 2, 1, 300, 128, 128, dtype, "bshd")
    q, k, v = q[..., :64], k[..., ::2], v[..., 1::2]  # head dim 64, every other value
    out = llmkernels.scaled_dot_product_attention(q, k, v, backend="cpu", enable_gqa=True)
    judge_call(out, q, k, v, dtype, False, enable_gqa=True)


@pytest.mark.parametrize("threads", [1, 3, 16])
def test_decode_shaped_calls_under_thread_counts(threads):
    """How many kv heads an item takes and how many key chunks a head's keys split into follow
    the thread count (at least 4 items a thread where the keys allow); results stay right
    however the work is split, for short caches (one chunk) and long ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for S in (300, 2100):
            run_case(1, 16, 8, 1, S, 64, 64, torch.bfloat16, layout="bshd", backward=False)
            run_case(2, 6, 6, 1, S, 128, 128, torch.float32, layout="bshd", backward=False,
                     mask_kind="additive")
    finally:
        torch.set_num_threads(before)


def test_decode_shaped_calls_with_masks_and_windows(cpu_tier):
    run_case(1, 4, 4, 3, 1100, 32, 32, torch.float32, mask_kind="bool", window_size=(700, 5))
    run_case(1, 2, 2, 1, 1300, 64, 64, torch.bfloat16, is_causal=True)  # top-left: key 0 only
