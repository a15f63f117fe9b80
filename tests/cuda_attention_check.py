"""GPU check of the CUDA attention kernels against the reference, run by hand on a GPU machine:

    python tests/cuda_attention_check.py BUILD_DIR      (BUILD_DIR holds the built _C*.so)

Not collected by pytest (no test_ prefix). Calls the raw bindings (attention_forward_cuda /
attention_backward_cuda) with views, so it needs neither the package nor its ops layer.
`--dry` runs the script's own plumbing on the CPU with the reference standing in for the kernels.
"""
import importlib.util
import math
import os
import sys
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location(
    "ref_attention", os.path.join(HERE, "..", "python", "llmkernels", "reference", "attention.py"))
ref = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ref)

DRY = "--dry" in sys.argv
DEV = "cpu" if DRY else "cuda"
if not DRY:
    sys.path.insert(0, sys.argv[1])
    import _C  # noqa: E402

CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.int32: 7}


def cv(t):
    return None if t is None else (t.data_ptr(), CODES[t.dtype], tuple(t.shape), tuple(t.stride()))


def make(shape, dtype, noncontig):
    if noncontig:  # (B, L, H, D) storage seen as (B, H, L, D)
        b, h, l, d = shape
        return torch.randn(b, l, h, d, device=DEV).to(dtype).transpose(1, 2)
    return torch.randn(*shape, device=DEV).to(dtype)


def seq_rows(b, lens, packed):
    if packed:
        start = sum(lens[:b])
        return 0, slice(start, start + lens[b])
    return b, slice(0, lens[b])


def reference(q, k, v, dout, lens_q, lens_k, used_k, packed_q, packed_k, scale, softcap, left, right,
              diag, bottom_right, compute_dtype):
    """out, lse, dq, dk, dv of the whole layout, one sequence at a time."""
    out = torch.zeros(q.shape, dtype=torch.float32, device=DEV)
    lse = torch.full(q.shape[:3], float("-inf"), device=DEV)
    dq = torch.zeros(q.shape, dtype=torch.float32, device=DEV)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=DEV)
    dv = torch.zeros(k.shape, dtype=torch.float32, device=DEV)
    for b in range(len(lens_q)):
        qb_, qr = seq_rows(b, lens_q, packed_q)
        kb_, kr = seq_rows(b, lens_k, packed_k)
        lq = lens_q[b]
        lk = lens_k[b] if used_k is None else min(used_k[b], lens_k[b])
        kr = slice(kr.start, kr.start + lk)
        off = diag + (lk - lq if bottom_right else 0)
        qs = q[qb_, :, qr].to(compute_dtype).detach().requires_grad_()
        ks = k[kb_, :, kr].to(compute_dtype).detach().requires_grad_()
        vs = v[kb_, :, kr].to(compute_dtype).detach().requires_grad_()
        if lq == 0:
            continue
        if lk == 0:
            continue  # out 0, lse -inf, grads 0 (already)
        o, l = ref.attention_reference(qs, ks, vs, scale=scale, enable_gqa=True,
                                       window_size=(left, right),
                                       softcap=softcap if softcap > 0 else None,
                                       diag_offset=off, return_lse=True)
        (o * dout[qb_, :, qr].to(compute_dtype)).sum().backward()
        out[qb_, :, qr] = o.detach().float()
        lse[qb_, :, qr] = l.detach().float()
        dq[qb_, :, qr] = qs.grad.float()
        dk[kb_, :, kr] = ks.grad.float()
        dv[kb_, :, kr] = vs.grad.float()
    return out, lse, dq, dk, dv


def max_err(a, b):
    if a.numel() == 0:
        return 0.0
    return (a.float() - b.float()).abs().max().item()


FAILS = []


def case(name, dtype, D, lens_q, lens_k, Hq=4, Hk=4, used_k=None, packed_q=False, packed_k=False,
         left=-1, right=-1, diag=0, bottom_right=False, softcap=0.0, noncontig=False, grad=True):
    torch.manual_seed(hash(name) % 1000)
    nseq = len(lens_q)
    B = 1 if packed_q else nseq
    Bk = 1 if packed_k else nseq
    Lq = sum(lens_q) if packed_q else max(lens_q)
    Sk = sum(lens_k) if packed_k else max(lens_k)
    if not packed_q:
        assert all(x == Lq for x in lens_q)
    if not packed_k:
        assert all(x == Sk for x in lens_k)
    q = make((B, Hq, Lq, D), dtype, noncontig)
    k = make((Bk, Hk, Sk, D), dtype, noncontig)
    v = make((Bk, Hk, Sk, D), dtype, noncontig)
    dout = make((B, Hq, Lq, D), dtype, noncontig)
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32, device=DEV) if packed_q else None
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32, device=DEV) if packed_k else None
    used = torch.tensor(used_k, dtype=torch.int32, device=DEV) if used_k is not None else None
    scale = 1.0 / math.sqrt(D)
    max_q, max_k = max(lens_q + [0]), max(lens_k + [0])
    args = (q, k, v, dout, lens_q, lens_k, used_k, packed_q, packed_k, scale, softcap, left, right, diag,
            bottom_right)
    r_out, r_lse, r_dq, r_dk, r_dv = reference(*args, torch.float32)
    b_out, _, b_dq, b_dk, b_dv = reference(*args, dtype)  # same-precision PyTorch: the error bar

    out = torch.full_like(q, float("nan"))
    lse = torch.full((B, Hq, Lq), float("nan"), device=DEV)
    dq, dk, dv = (torch.full_like(t, float("nan")) for t in (q, k, v))
    delta = torch.empty((B, Hq, Lq), device=DEV)
    if DRY:
        out.copy_(r_out); lse.copy_(r_lse); dq.copy_(r_dq); dk.copy_(r_dk); dv.copy_(r_dv)
    else:
        stream = torch.cuda.current_stream().cuda_stream
        _C.attention_forward_cuda(cv(q), cv(k), cv(v), cv(out), cv(lse), cv(cu_q), cv(cu_k), cv(used),
                                  max_q, scale, softcap, left, right, diag, bottom_right, stream)
        if grad:
            _C.attention_backward_cuda(cv(q), cv(k), cv(v), cv(out), cv(dout), cv(lse), cv(delta), cv(dq),
                                       cv(dk), cv(dv), cv(cu_q), cv(cu_k), cv(used), max_q, max_k, scale,
                                       softcap, left, right, diag, bottom_right, stream)
        torch.cuda.synchronize()

    floor = 2e-3 if dtype == torch.float16 else 1.6e-2
    msgs, ok = [], True
    names = [("out", out, r_out, b_out)]
    if grad:
        names += [("dq", dq, r_dq, b_dq), ("dk", dk, r_dk, b_dk), ("dv", dv, r_dv, b_dv)]
    for nm, got, want, base in names:
        if torch.isnan(got).any():
            ok = False
            msgs.append(f"{nm}: {int(torch.isnan(got).sum())} NaN (unwritten?)")
            continue
        e, eb = max_err(got, want), max_err(base, want)
        good = e <= 2 * eb + floor * max(1.0, want.abs().max().item() if want.numel() else 1.0)
        ok &= good
        msgs.append(f"{nm} {e:.2e} (torch {eb:.2e}){'' if good else ' <-- FAIL'}")
    fin = torch.isfinite(r_lse)
    lse_ok = bool(torch.equal(torch.isfinite(lse), fin)) and not torch.isnan(lse).any()
    lerr = max_err(lse[fin], r_lse[fin]) if fin.any() else 0.0
    lse_ok &= lerr < 1e-2
    ok &= lse_ok
    msgs.append(f"lse {lerr:.2e}{'' if lse_ok else ' <-- FAIL (inf pattern or error)'}")
    print(f"{'ok  ' if ok else 'FAIL'} {name}: " + ", ".join(msgs), flush=True)
    if not ok:
        FAILS.append(name)


f16, bf16 = torch.float16, torch.bfloat16
CASES = [
    dict(name="plain f16 D64 L127", dtype=f16, D=64, lens_q=[127, 127], lens_k=[127, 127]),
    dict(name="plain bf16 D128 L127", dtype=bf16, D=128, lens_q=[127, 127], lens_k=[127, 127]),
    dict(name="causal gqa bf16 D128 200x333", dtype=bf16, D=128, lens_q=[200] * 2, lens_k=[333] * 2,
         Hq=8, Hk=2, right=0),
    dict(name="causal bottom-right gqa f16 D128 65x300", dtype=f16, D=128, lens_q=[65], lens_k=[300], Hq=8,
         Hk=2, right=0, bottom_right=True),
    dict(name="window softcap bf16 D64 257x190", dtype=bf16, D=64, lens_q=[257], lens_k=[190], left=37,
         right=5, diag=-3, softcap=20.0),
    dict(name="window softcap f16 D128 257x190", dtype=f16, D=128, lens_q=[257], lens_k=[190], left=37,
         right=5, diag=-3, softcap=20.0, Hq=6, Hk=3),
    dict(name="varlen packed f16 D64", dtype=f16, D=64, lens_q=[1, 0, 130, 64], lens_k=[5, 7, 0, 200],
         packed_q=True, packed_k=True, Hq=4, Hk=2, right=0, bottom_right=True),
    dict(name="varlen packed bf16 D128 window", dtype=bf16, D=128, lens_q=[33, 100, 64],
         lens_k=[40, 100, 129], packed_q=True, packed_k=True, left=16, right=16),
    dict(name="seqused_k padded bf16 D128", dtype=bf16, D=128, lens_q=[50] * 3, lens_k=[100] * 3,
         used_k=[100, 33, 0], right=0, bottom_right=True, left=20),
    dict(name="packed k + seqused_k f16 D64", dtype=f16, D=64, lens_q=[20, 70], lens_k=[10, 80],
         packed_q=True, packed_k=True, used_k=[3, 80]),
    dict(name="noncontig causal softcap f16 D128 1000", dtype=f16, D=128, lens_q=[1000], lens_k=[1000],
         right=0, softcap=30.0, noncontig=True),
    dict(name="noncontig bf16 D64 gqa 300x517", dtype=bf16, D=64, lens_q=[300] * 2, lens_k=[517] * 2,
         Hq=4, Hk=1, noncontig=True, right=0, bottom_right=True),
    dict(name="decode bf16 D128 1x517", dtype=bf16, D=128, lens_q=[1] * 3, lens_k=[517] * 3, Hq=8, Hk=1,
         right=0, bottom_right=True),
    dict(name="empty queries f16 D64", dtype=f16, D=64, lens_q=[0, 0], lens_k=[10, 10]),
    dict(name="dead rows f16 D64 (diag -5)", dtype=f16, D=64, lens_q=[70], lens_k=[70], right=0, diag=-5),
    dict(name="no keys bf16 D128", dtype=bf16, D=128, lens_q=[9], lens_k=[0]),
]

for c in CASES:
    try:
        case(**c)
    except Exception:
        FAILS.append(c["name"])
        print(f"FAIL {c['name']}: exception", flush=True)
        traceback.print_exc()

print(f"{len(CASES) - len(FAILS)}/{len(CASES)} cases passed" + (f"; failed: {FAILS}" if FAILS else ""))

if not DRY and "--bench" in sys.argv:
    import torch.nn.functional as F
    B, H, L, D = 4, 16, 4096, 128
    q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = torch.empty_like(q)
    lse = torch.empty(B, H, L, device="cuda")
    dout = torch.randn_like(q)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    delta = torch.empty_like(lse)
    st = torch.cuda.current_stream().cuda_stream
    s = 1 / math.sqrt(D)

    def fwd():
        _C.attention_forward_cuda(cv(q), cv(k), cv(v), cv(out), cv(lse), None, None, None, L, s, 0.0, -1, 0,
                                  0, False, st)

    def bwd():
        _C.attention_backward_cuda(cv(q), cv(k), cv(v), cv(out), cv(dout), cv(lse), cv(delta), cv(dq), cv(dk),
                                   cv(dv), None, None, None, L, L, s, 0.0, -1, 0, 0, False, st)

    def timeit(fn, n=10):
        fn(); torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / n

    flops = 4 * B * H * L * L * D / 2  # causal
    tf, tb = timeit(fwd), timeit(bwd)
    ts = timeit(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    print(f"bench causal bf16 B{B} H{H} L{L} D{D}: fwd {tf*1e3:.2f} ms ({flops/tf/1e12:.0f} TFLOP/s), "
          f"bwd {tb*1e3:.2f} ms ({2.5*flops/tb/1e12:.0f} TFLOP/s), SDPA fwd {ts*1e3:.2f} ms")
sys.exit(1 if FAILS else 0)
