"""scaled_dot_product_attention on the GPU paths (Triton, CUDA) against the float64 reference
(DESIGN.md numerics rule), forward and backward. Without a GPU, Triton runs in its interpreter
at small shapes and the CUDA cases skip."""
from functools import partial

import pytest
import torch

import llmkernels
from llmkernels.ops import attention_gpu
from attention_utils import judge_call, make_qkv
from gpu_paths import DEVICE, ON_GPU, gpu_path, skip_unless_runs, force_splits  # noqa: F401

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def run_case(path, B, Hq, Hk, L, S, E, Ev, dtype, *, backward=True, layout="bhsd", **kw):
    q, k, v = make_qkv(B, Hq, Hk, L, S, E, Ev, dtype, layout, requires_grad=backward,
                       device=DEVICE)
    skip_unless_runs(path, q, k, v)
    if Hq != Hk:
        kw["enable_gqa"] = True
    out = llmkernels.scaled_dot_product_attention(q, k, v, backend=path, **kw)
    judge_call(out, q, k, v, dtype, backward, same_precision="sdpa" if ON_GPU else "math", **kw)


SHAPES = [(1, 1), (1, 37), (37, 1), (37, 53), (70, 45)]
if ON_GPU:
    SHAPES += [(128, 128), (255, 513), (1000, 1000)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L,S", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
def test_shapes_and_dtypes(gpu_path, dtype, L, S, causal):
    run_case(gpu_path, 2, 2, 2, L, S, 64, 64, dtype, is_causal=causal)


@pytest.mark.parametrize("E,Ev", [(32, 32), (64, 64), (128, 128), (256, 256), (40, 24), (96, 80), (32, 72)])
def test_head_dims(gpu_path, E, Ev):
    run_case(gpu_path, 1, 2, 2, 40, 50, E, Ev, torch.bfloat16, is_causal=True)


def test_float32_large_head_dim(gpu_path):
    """float32 keeps twice the bytes of the 16-bit dtypes in shared memory: the largest head
    dim's tiles must still fit (an H100 has 227 KiB a block)."""
    run_case(gpu_path, 1, 2, 1, 70, 90, 256, 256, torch.float32, is_causal=True)


@pytest.mark.parametrize("Hq,Hk", [(4, 2), (6, 1)])
def test_gqa_mqa(gpu_path, Hq, Hk):
    run_case(gpu_path, 2, Hq, Hk, 33, 47, 64, 64, torch.float16, is_causal=True)


@pytest.mark.parametrize("window,causal", [((0, 0), False), ((5, None), True), ((None, 7), False),
                                           ((16, 4), False), ((80, 0), True),
                                           ((2**63 - 1, 2**63 - 1), False)])
def test_sliding_window(gpu_path, window, causal):
    run_case(gpu_path, 1, 2, 1, 60, 75, 64, 64, torch.bfloat16, is_causal=causal,
             window_size=window)


@pytest.mark.parametrize("window,causal", [((None, 2**31 - 1), False), ((2**31 - 1, None), False),
                                           ((2**31 - 1, None), True), ((2**31 - 60, 2**31 - 2), False)])
def test_windows_near_int32s_end_are_unbounded(gpu_path, window, causal):
    """A side just under 2^31 (a "no window" sentinel): the Triton band arithmetic is int32
    there and wrapped (every output row zero, or dK/dV wrong)."""
    run_case(gpu_path, 1, 2, 1, 37, 53, 32, 32, torch.float32, is_causal=causal,
             window_size=window)


@pytest.mark.parametrize("where,L,splits", [("query_row", 70, None), ("first_key_block", 70, None),
                                            ("query_row", 1, None), ("first_key_block", 1, None),
                                            ("first_key_block", 1, 3), ("last_keys", 1, 3)])
def test_nan_inputs_give_nan_where_the_reference_does(gpu_path, force_splits, where, L, splits):
    """NaN scores were dropped: CUDA's forward turned a key block of all-NaN scores into zero
    probabilities (finite outputs that ignore those keys, or a zero row), and both GPU paths
    wrote lse = -inf for a NaN row, which the backward reads as "no visible key" (zero
    gradients where the reference has NaN)."""
    q, k, v = make_qkv(1, 2, 2, L, 130, 64, 64, torch.bfloat16, device=DEVICE)
    skip_unless_runs(gpu_path, q, k, v)
    if splits and gpu_path == "cuda":
        pytest.skip("flash-decoding splits are the Triton path's")
    if splits:  # a NaN in one split's partial result: the combine must keep it
        force_splits(splits)
    if where == "query_row":
        q[0, 0, L // 2] = float("nan")
    elif where == "first_key_block":
        k[0, 0, :64] = float("nan")
    else:
        k[0, 0, 120:] = float("nan")
    grads = []
    for attend, dtype in ((partial(llmkernels.scaled_dot_product_attention, backend=gpu_path),
                           q.dtype),
                          (torch.nn.functional.scaled_dot_product_attention, torch.float64)):
        qkv = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out = attend(*qkv)
        grads.append((out,) + torch.autograd.grad(out, qkv, torch.ones_like(out)))
    for name, got, want in zip(("out", "dq", "dk", "dv"), *grads):
        assert want.isnan().any(), name
        assert torch.equal(got.isnan(), want.isnan()), name


@pytest.mark.parametrize("softcap", [0.5, 20.0])
def test_softcap(gpu_path, softcap):
    run_case(gpu_path, 1, 2, 2, 45, 50, 64, 64, torch.bfloat16, is_causal=True, softcap=softcap,
             scale=0.3)


def test_float32_softcap_near_linear(gpu_path):
    """softcap 1e4: scores / softcap near 0, where 1 - 2 / (e^2u + 1) cancels (an absolute
    error ~1e-7, which softcap multiplies): the kernels take a polynomial there."""
    run_case(gpu_path, 1, 2, 2, 45, 50, 64, 64, torch.float32, is_causal=True, softcap=1e4,
             scale=0.3)


def test_token_major_layout(gpu_path):
    run_case(gpu_path, 2, 4, 2, 40, 40, 64, 64, torch.bfloat16, layout="bshd", is_causal=True,
             window_size=(20, 0))


def test_decode_shaped_calls(gpu_path, force_splits):
    """Few queries over many keys: GQA heads packed in one tile, keys split (flash-decoding)."""
    for splits in (None, 3):
        force_splits(splits)
        run_case(gpu_path, 2, 8, 2, 1, 150, 64, 64, torch.bfloat16, backward=False)
        run_case(gpu_path, 1, 4, 1, 3, 90, 64, 64, torch.float32, backward=False, is_causal=True)


def test_fully_masked_rows_are_zero(gpu_path):
    q, k, v = make_qkv(1, 2, 2, 30, 10, 64, 64, torch.float32, device=DEVICE)
    skip_unless_runs(gpu_path, q, k, v)
    # window (0, 0) with 30 queries over 10 keys: queries 10.. see no key.
    out = llmkernels.scaled_dot_product_attention(q, k, v, window_size=(0, 0), backend=gpu_path)
    assert torch.isfinite(out).all()
    assert out[:, :, 10:].abs().max().item() == 0.0


def test_empty_inputs(gpu_path):
    q, k, v = make_qkv(0, 2, 2, 5, 7, 64, 64, torch.float16, device=DEVICE)
    skip_unless_runs(gpu_path, q, k, v)
    assert llmkernels.scaled_dot_product_attention(q, k, v, backend=gpu_path).shape == (0, 2, 5, 64)


def test_selection_on_gpu_tensors():
    q, k, v = make_qkv(1, 2, 2, 8, 8, 64, 64, torch.bfloat16, device=DEVICE)
    d = llmkernels.explain(llmkernels.scaled_dot_product_attention, q, k, v)
    if ON_GPU:
        assert d.backend in ("cuda", "triton"), str(d)
    else:
        assert d.backend == "cpu", str(d)
    mask = torch.ones(8, 8, dtype=torch.bool, device=DEVICE)
    d = llmkernels.explain(llmkernels.scaled_dot_product_attention, q, k, v, mask)
    if ON_GPU:  # the CUDA path refuses masks, Triton's kernels take them
        assert d.backend == "triton" and "attn_mask is not fused on the CUDA path" in str(d)


def test_triton_cannot_be_forced_on_cpu_without_interpreter(monkeypatch):
    if ON_GPU:
        pytest.skip("CPU tensors only")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = make_qkv(1, 1, 1, 4, 4, 16, 16, torch.float32)
    with pytest.raises(llmkernels.BackendError, match="TRITON_INTERPRET"):
        llmkernels.scaled_dot_product_attention(q, k, v, backend="triton")


def test_cuda_cannot_be_forced_on_cpu_tensors():
    q, k, v = make_qkv(1, 1, 1, 4, 4, 64, 64, torch.bfloat16)
    with pytest.raises(llmkernels.BackendError):
        llmkernels.scaled_dot_product_attention(q, k, v, backend="cuda")


@pytest.mark.parametrize("kind", ["prefill", "decode", "varlen"])
def test_triton_launches_past_the_grid_y_limit(monkeypatch, kind):
    """More (sequence, head) pairs than a CUDA grid's y holds (65535, e.g. 4096 sequences x 16
    heads) go in several launches: here the limit is lowered to 3 and the results, forward and
    backward, must be those of one launch."""
    torch.manual_seed(0)
    if kind == "varlen":
        cu = torch.tensor([0, 3, 8, 9], dtype=torch.int32, device=DEVICE)
        q, k, v = (torch.randn(9, h, 32, device=DEVICE, requires_grad=True) for h in (4, 2, 2))
        skip_unless_runs("triton", q, k, v)

        def call():
            return llmkernels.attention_varlen(q, k, v, cu, cu, 5, 5, is_causal=True,
                                               backend="triton")
    else:
        L = 1 if kind == "decode" else 20
        q, k, v = make_qkv(3, 4, 2, L, 30, 32, 32, torch.float32, requires_grad=True,
                           device=DEVICE)
        skip_unless_runs("triton", q, k, v)

        def call():
            return llmkernels.scaled_dot_product_attention(q, k, v, enable_gqa=True,
                                                           backend="triton")

    def run():
        out = call()
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        return (out,) + grads
    whole = run()
    monkeypatch.setattr(attention_gpu.triton_kernels(), "MAX_GRID_Y", 3)
    for a, b in zip(run(), whole):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    if kind == "decode":  # key splits with several launches (partial rows once collided)
        monkeypatch.setattr(attention_gpu.triton_kernels(), "FORCE_SPLITS", 2)
        for a, b in zip(run(), whole):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
