"""attention_varlen on every path (cpu, triton, cuda, reference) against the float64 reference
over random ragged batches, forward and backward; and its bad-input errors."""
import pytest
import torch

import llmkernels
from attention_utils import grad_scale, judge
from gpu_paths import DEVICE, ON_GPU, skip_unless_runs
from llmkernels.reference import attention_varlen_reference

PATHS = ["cpu", "triton", "cuda", "reference"]


def ragged(lengths, H, E, dtype, device, requires_grad=True):
    t = torch.randn(sum(lengths), H, E, dtype=dtype, device=device)
    return t.requires_grad_(requires_grad)


def cu(lengths, device):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32,
                        device=device)


def run_varlen(path, len_q, len_k, Hq, Hk, E, Ev, dtype, backward=True, **kw):
    device = "cpu" if path == "cpu" else DEVICE
    if path == "cuda" and not ON_GPU:
        pytest.skip("CUDA kernels need a GPU")
    q = ragged(len_q, Hq, E, dtype, device, backward)
    k = ragged(len_k, Hk, E, dtype, device, backward)
    v = ragged(len_k, Hk, Ev, dtype, device, backward)
    if path in ("triton", "cuda"):
        skip_unless_runs(path, *(t.transpose(0, 1).unsqueeze(0) for t in (q, k, v)))
    cq, ck = cu(len_q, device), cu(len_k, device)
    out = llmkernels.attention_varlen(q, k, v, cq, ck, max(len_q), max(len_k), backend=path, **kw)
    assert out.shape == (sum(len_q), Hq, Ev)
    grad_out = torch.randn_like(out)
    results = []
    for cast in (torch.float64, dtype):
        leaves = [t.detach().to(cast).requires_grad_(backward) for t in (q, k, v)]
        # the same-precision baseline: the unfused math in the inputs' dtype, as on a GPU
        ref = attention_varlen_reference(*leaves, cq, ck, work_dtype=cast, **kw)
        grads = torch.autograd.grad(ref, leaves, grad_out.to(cast)) if backward else None
        results.append((ref.detach(), grads))
    (exact, exact_g), (same, same_g) = results
    judge("out", out, same, exact, dtype)
    if backward:
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
        for name, g, gs, ge in zip(("dq", "dk", "dv"), grads, same_g, exact_g):
            judge(name, g, gs, ge, dtype, scale=grad_scale(exact_g))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_random_ragged_batches(path, dtype, causal):
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, 40, (4,), generator=g).tolist() + [1, 0]
    perm = torch.randperm(len(lengths), generator=g).tolist()
    lengths = [lengths[i] for i in perm]
    run_varlen(path, lengths, lengths, 4, 2, 64, 64, dtype, is_causal=causal)


@pytest.mark.parametrize("path", PATHS)
def test_queries_and_keys_of_different_lengths(path):
    # cross-attention-like: each sequence has its own number of queries and keys (some none)
    run_varlen(path, [5, 17, 0, 9], [23, 3, 4, 0], 2, 2, 32, 48, torch.float32, is_causal=True,
               window_size=(6, None))


@pytest.mark.parametrize("path", ["cpu", "triton", "cuda"])
def test_softcap_and_window(path):
    run_varlen(path, [31, 12, 40], [31, 12, 40], 4, 1, 64, 64, torch.float16, softcap=5.0,
               window_size=(8, 8))


def test_explain_names_each_path():
    q = torch.randn(10, 2, 16)
    c = torch.tensor([0, 4, 10], dtype=torch.int32)
    d = llmkernels.explain(llmkernels.attention_varlen, q, q, q, c, c, 6, 6)
    assert d.backend == "cpu" and d.op == "attention_varlen"


class TestBadInput:
    def args(self, **over):
        q = torch.randn(10, 2, 16)
        a = dict(q=q, k=q, v=q, cu_seqlens_q=torch.tensor([0, 4, 10], dtype=torch.int32),
                 cu_seqlens_k=torch.tensor([0, 4, 10], dtype=torch.int32), max_seqlen_q=6,
                 max_seqlen_k=6)
        a.update(over)
        return a

    @pytest.mark.parametrize("over,err,match", [
        (dict(cu_seqlens_q=torch.tensor([0, 7, 4, 10], dtype=torch.int32)), ValueError,
         "non-decreasing"),
        (dict(cu_seqlens_q=torch.tensor([1, 4, 10], dtype=torch.int32)), ValueError, "start at 0"),
        (dict(cu_seqlens_k=torch.tensor([0, 4, 9], dtype=torch.int32)), ValueError, "ends at 9"),
        (dict(cu_seqlens_k=torch.tensor([0, 4.0, 10])), TypeError, "int32"),
        (dict(cu_seqlens_k=torch.tensor([0, 10], dtype=torch.int32)), ValueError, "entries"),
        (dict(max_seqlen_q=5), ValueError, "max_seqlen_q=5"),
        (dict(max_seqlen_k=6.0), TypeError, "max_seqlen_k"),
        (dict(q=torch.randn(10, 2, 16, dtype=torch.float16)), TypeError, "share a dtype"),
        (dict(k=torch.randn(10, 3, 16), v=torch.randn(10, 3, 16)), ValueError, "multiple"),
        (dict(q=torch.randn(2, 10, 2, 16)), ValueError, "total_tokens"),
        (dict(v=torch.randn(9, 2, 16)), ValueError, "v \\(tokens, heads\\)"),
        (dict(q=torch.randint(0, 3, (10, 2, 16))), TypeError, "float"),
    ])
    def test_errors(self, over, err, match):
        with pytest.raises(err, match=match):
            llmkernels.attention_varlen(**self.args(**over))

    def test_more_packed_rows_than_int32_offsets_hold_are_refused(self):
        """int64 cu_seqlens past 2**31 were cut to int32 (wrapped): the reference path then
        sliced with negative offsets and returned 2 rows for 2**31 + 1."""
        rows = 2**31 + 1
        q = torch.zeros(1, 1, 4, dtype=torch.float64).expand(rows, 1, 4)  # no memory
        cu = torch.tensor([0, 1, rows])
        with pytest.raises(ValueError, match="cu_seqlens_q indexes has 2147483649 rows"):
            llmkernels.attention_varlen(q, q, q, cu, cu, rows - 1, rows - 1)


def test_triton_grids_follow_the_packed_rows_not_max_seqlen(monkeypatch):
    """max_seqlen_q / _k may be any bound on the longest sequence; the Triton grids take at most
    the packed tensors' rows (2^40 made a grid past CUDA's 2^31 - 1 programs in x; a merely
    generous bound launched thousands of empty programs). The launches are recorded, not run."""
    from llmkernels.ops import attention_gpu
    c = cu([3, 5], DEVICE)
    q, k, v = (ragged([3, 5], 2, 32, torch.float32, DEVICE) for _ in range(3))
    skip_unless_runs("triton", q, k, v)
    kernels = attention_gpu.triton_kernels()
    grids = []

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                grids.append(tuple(grid({"BLOCK_M": 16, "BLOCK_N": 16}) if callable(grid) else grid))
            return launch
    for name in ("_fwd_tuned", "_decode_tuned", "_dkdv_tuned", "_dq_tuned", "_delta_kernel"):
        monkeypatch.setattr(kernels, name, Recorder())
    out = llmkernels.attention_varlen(q, k, v, c, c, 2**40, 2**40, backend="triton")
    out.sum().backward()
    assert grids and all(g[0] <= 1 for g in grids), grids  # 8 rows: one block of 16
