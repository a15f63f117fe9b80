"""The Triton fused optimizer steps (kernels/optim.py) called through their launchers directly,
over several steps with fresh gradients, against:
  - an exact emulation of optim_impl.h's float32 operation sequence (each op rounded to float32
    from float64; the fused multiply-adds rounded once): bit-exact;
  - the compiled CPU kernel (llmkernels._C), when it is built: bit-exact;
  - adam_reference / sgd_reference (the specification, which does not fuse the multiply-adds),
    one step at a time from the kernel's state: 2 float32 ulps, 1 ulp of bfloat16 / float16
    (plus a floor of a few float32 ulps of the tensor's scale, for results that cancel).
Odd sizes and shapes, several tensors per launch, mixed dtypes, unaligned views, empty tensors.
Without a GPU they run in Triton's interpreter."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from llmkernels.kernels import optim as ko  # noqa: E402
from llmkernels.optim.adam import adam_reference  # noqa: E402
from llmkernels.optim.sgd import sgd_reference  # noqa: E402
from optim_utils import triton_fma_rounds_once  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1,), (255,), (257,), (4097,), (3, 5, 7), (33, 65)]
STEPS = 5
_MANT = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}
_EMIN = {torch.float32: -126, torch.bfloat16: -126, torch.float16: -14}


# ------------------------------------------------------------------------------ helpers

def _r(x):
    """Round a float64 tensor to float32 (and back to float64)."""
    return x.float().double()


def _fma(a, b, c):
    """float32 fma in float64: a * b is exact, the sum rounds once in float64 then to float32
    (double rounding differs from one rounding only when the float64 sum lands exactly on a
    float32 midpoint: about 2**-29 per operation)."""
    return _r(a * b + c)


def _f(x):
    """A Python float as the kernel sees it (float32), in float64."""
    return float(torch.tensor(x, dtype=torch.float32))


def _ulps(a, b, dtype):
    """|a - b| in units of the last place of dtype at max(|a|, |b|), elementwise."""
    a, b = a.double(), b.double()
    mag = torch.maximum(a.abs(), b.abs())
    _, e = torch.frexp(mag)
    e = torch.clamp(e - 1, min=_EMIN[dtype])
    ulp = torch.ldexp(torch.ones_like(mag), e - _MANT[dtype])
    return (a - b).abs() / ulp


def _assert_exact(got, want, what):
    assert got.dtype == want.dtype
    if not triton_fma_rounds_once():
        return
    got, want = got.reshape(-1), want.reshape(-1)
    bad = (got != want) & ~(torch.isnan(got) & torch.isnan(want))
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {got.numel()} elements differ, e.g. "
                           f"{got[bad][:4].tolist()} vs {want[bad][:4].tolist()}")


def _assert_close_to_spec(got, want, before, what):
    """One step from the same state: at most 1 ulp of the dtype (a few for float32) at each
    element, plus a floor of a few float32 ulps of the tensor's largest value before or after
    the step (the reference rounds the multiply-adds that the kernels fuse: where a result
    cancels to near zero, its float32 error is relative to the operands, not to the result)."""
    if got.numel() == 0:
        return
    max_ulps = 2 if got.dtype == torch.float32 else 1
    u = _ulps(got.float(), want.float(), got.dtype)
    scale = torch.maximum(want.float().abs().max(), before.float().abs().nan_to_num().max())
    floor = 8 * 2.0 ** -23 * scale.double()
    err = (got.double() - want.double()).abs()
    bad = (u > max_ulps) & (err > floor)
    assert not bad.any(), (f"{what}: {int(bad.sum())} elements off by up to {u[bad].max().item()} "
                           f"ulps, {err[bad].max().item():.3g} (floor {floor.item():.3g})")


def _rand(shape, dtype, kind="normal", scale=1.0):
    x = torch.randn(shape, device=DEVICE) if kind == "normal" else torch.rand(shape, device=DEVICE)
    return (x * scale).to(dtype)




def _native():
    try:
        from llmkernels import backends
        from llmkernels.optim import _fused
        mod = backends.native_module()
        if mod is None or DEVICE != "cpu":
            return None
        return mod, backends, _fused
    except Exception:  # noqa: BLE001 - the extension is optional here
        return None


# ------------------------------------------------------------------------------ Adam

def _adam_emulate(p, g, m, v, vmax, *, h, step_size, bc2):
    """optim_impl.h's adam_loop, op by op, in float32 (via float64)."""
    pf, gf, mf, vf = (t.double() for t in (p, g, m, v))
    gf = _r(_r(gf * _f(h["inv_grad_scale"])) * (-1.0 if h["maximize"] else 1.0))
    if h["decoupled"]:
        pf = _r(pf * _f(h["decay"]))
    elif h["weight_decay"] != 0.0:  # no L2 term at all without weight decay, as torch
        gf = _fma(pf, _f(h["weight_decay"]), gf)
    mf = _fma(_f(h["one_minus_beta1"]), _r(gf - mf), mf)
    vf = _r(vf * _f(h["beta2"]))
    vf = _r(vf + _r(_r(_f(h["one_minus_beta2"]) * gf) * gf))
    vd = vf
    if h["amsgrad"]:
        vm = vmax.double()
        vd = torch.where(vm < vf, vf, vm)
        vmax.copy_(vd)
    denom = _r(_r(_r(vd.sqrt()) / _f(bc2)) + _f(h["eps"]))
    pf = _r(pf + _r(-_f(step_size) * _r(mf / denom)))
    p.copy_(pf)
    m.copy_(mf)
    v.copy_(vf)


def _adam_hyper(lr, betas, eps, wd, decoupled, amsgrad, maximize, inv_grad_scale):
    b1, b2 = betas
    return dict(lr=lr, beta1=b1, beta2=b2, eps=eps, weight_decay=wd, decoupled=decoupled,
                amsgrad=amsgrad, maximize=maximize, inv_grad_scale=inv_grad_scale,
                decay=1.0 - lr * wd, one_minus_beta1=1.0 - b1, one_minus_beta2=1.0 - b2)


def _adam_state(shapes, dtypes):
    ps = [_rand(s, d) for s, d in zip(shapes, dtypes)]
    ms = [_rand(s, d, scale=0.1) for s, d in zip(shapes, dtypes)]
    vs = [_rand(s, d, "uniform", 0.01) for s, d in zip(shapes, dtypes)]
    vmax = [(v.float() * 1.5).to(v.dtype) for v in vs]
    return [ps, ms, vs, vmax]


def _clone(state):
    return [[t.clone() for t in ts] for ts in state]


def _run_adam(shapes, dtypes, h, *, steps=STEPS, views=None, native=False):
    """STEPS steps of the kernel, the emulation and the reference from the same start."""
    n = len(shapes)
    kern = _adam_state(shapes, dtypes)
    if views is not None:  # each tensor as an unaligned view (storage offset 1) of a bigger one
        kern = [[views(t) for t in ts] for ts in kern]
    emu, nat = _clone(kern), _clone(kern)
    lr, b1, b2 = h["lr"], h["beta1"], h["beta2"]
    for step in range(1, steps + 1):
        ref, before = _clone(kern), _clone(kern)  # the reference steps from the kernel's state
        gs = [_rand(s, d, scale=0.5) for s, d in zip(shapes, dtypes)]
        if views is not None:
            gs = [views(g) for g in gs]
        step_sizes = [lr / (1.0 - b1 ** (step + i % 2)) for i in range(n)]  # per-tensor steps
        bc2s = [(1.0 - b2 ** (step + i % 2)) ** 0.5 for i in range(n)]
        ps, ms, vs, vmax = kern
        ko.adam_step(ps, gs, ms, vs, vmax if h["amsgrad"] else [None] * n, step_sizes, bc2s, **h)
        for i in range(n):
            e = [t[i] for t in emu]
            _adam_emulate(e[0], gs[i], e[1], e[2], e[3], h=h, step_size=step_sizes[i],
                          bc2=bc2s[i])
            r = [t[i] for t in ref]
            adam_reference(r[0], gs[i], r[1], r[2], r[3] if h["amsgrad"] else None,
                           step_size=step_sizes[i], bias_correction2_sqrt=bc2s[i],
                           **{k: v for k, v in h.items() if k not in
                              ("decay", "one_minus_beta1", "one_minus_beta2")})
        for j in range(4 if h["amsgrad"] else 3):
            for i in range(n):
                _assert_close_to_spec(kern[j][i], ref[j][i], before[j][i],
                                      f"step {step}: tensor {j} [{i}] {kern[j][i].dtype} vs "
                                      "adam_reference")
        if native:
            mod, backends, fused = native
            items = [(fused.flat(nat[0][i]), fused.flat(gs[i]), fused.flat(nat[1][i]),
                      fused.flat(nat[2][i]), fused.flat(nat[3][i]) if h["amsgrad"] else None,
                      step_sizes[i], bc2s[i], 0) for i in range(n)]
            mod.adam_step(backends.cpu_tier_code(), items, lr, b1, b2, h["eps"],
                          h["weight_decay"], h["decoupled"], h["amsgrad"], h["maximize"],
                          h["inv_grad_scale"], 1, h["decay"], h["one_minus_beta1"],
                          h["one_minus_beta2"], False)  # no stochastic rounding
    return kern, emu, nat


def _check_adam(kern, emu, nat, amsgrad, native):
    names = ["param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"][:4 if amsgrad else 3]
    for j, name in enumerate(names):
        for i, (k, e) in enumerate(zip(kern[j], emu[j])):
            _assert_exact(k, e, f"{name}[{i}] {k.dtype} vs emulation")
            if native:
                _assert_exact(k, nat[j][i], f"{name}[{i}] {k.dtype} vs CPU kernel")


ADAM_FLAGS = [  # decoupled, amsgrad, maximize, weight_decay, inv_grad_scale
    (True, False, False, 0.1, 1.0),
    (True, True, False, 0.01, 1.0),
    (False, False, False, 0.0, 1.0),
    (False, True, True, 0.05, 1.0 / 1024.0),
    (False, False, False, 0.1, 0.37),
    (True, False, True, 0.0, 1.0),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("flags", ADAM_FLAGS, ids=lambda f: "dec%d-ams%d-max%d-wd%g-s%.3g" % f)
def test_adam(dtype, flags):
    decoupled, amsgrad, maximize, wd, inv = flags
    h = _adam_hyper(1e-2, (0.9, 0.999), 1e-8, wd, decoupled, amsgrad, maximize, inv)
    native = _native()
    try:
        out = _run_adam(SHAPES, [dtype] * len(SHAPES), h, native=native)
    except (TypeError, RuntimeError):  # the installed CPU kernel's binding differs: without it
        native = None
        out = _run_adam(SHAPES, [dtype] * len(SHAPES), h)
    _check_adam(*out, amsgrad, native)


def test_adam_mixed_dtypes_chunks_and_views(monkeypatch):
    """Mixed dtypes (one launch per dtype), groups split at MAX_TENSORS (several launches, a
    3-level binary search), unaligned views (the masked-alignment variant), an empty tensor."""
    monkeypatch.setattr(ko, "MAX_TENSORS", 5)
    shapes = [(7,), (1,), (0,), (1500,), (2,), (300,), (2049,), (13,), (1,), (999,), (4,), (65,)]
    dtypes = [DTYPES[i % 3] for i in range(len(shapes))]
    h = _adam_hyper(3e-3, (0.8, 0.99), 1e-6, 0.02, True, True, False, 1.0)
    _check_adam(*_run_adam(shapes, dtypes, h, steps=2), True, None)

    def unaligned(t):
        big = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        v = big[1:].view(t.shape)
        v.copy_(t)
        return v

    _check_adam(*_run_adam([(1025,), (3,), (31, 3)], [torch.bfloat16] * 3, h, steps=2,
                           views=unaligned), True, None)


def test_adam_many_tensors():
    """37 small tensors in one launch (6-level binary search)."""
    shapes = [(1 + 37 * i % 50,) for i in range(37)]
    h = _adam_hyper(1e-3, (0.9, 0.999), 1e-8, 0.0, False, False, False, 1.0)
    _check_adam(*_run_adam(shapes, [torch.float32] * 37, h, steps=2), False, None)


# ------------------------------------------------------------------------------ SGD

def _sgd_emulate(p, g, buf, first, *, h):
    pf = p.double()
    d = _r(_r(g.double() * _f(h["inv_grad_scale"])) * (-1.0 if h["maximize"] else 1.0))
    if h["weight_decay"] != 0.0:
        d = _fma(pf, _f(h["weight_decay"]), d)
    if h["momentum"] != 0.0:
        mom = _f(h["momentum"])
        b = d if first else _fma(d, _f(h["one_minus_dampening"]), _r(buf.double() * mom))
        buf.copy_(b)
        d = _fma(b, mom, d) if h["nesterov"] else b
    p.copy_(_fma(d, -_f(h["lr"]), pf))


def _sgd_hyper(lr, momentum, dampening, wd, nesterov, maximize, inv_grad_scale):
    return dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=wd,
                nesterov=nesterov, maximize=maximize, inv_grad_scale=inv_grad_scale,
                one_minus_dampening=1.0 - dampening)


def _run_sgd(shapes, dtypes, h, *, steps=STEPS, native=None, late=()):
    """late: indices of tensors whose momentum buffer starts one step later (so that one call
    mixes first and later steps)."""
    n = len(shapes)
    use_mom = h["momentum"] != 0.0
    ps = [_rand(s, d) for s, d in zip(shapes, dtypes)]
    # Buffers start as NaN: a first step must not read them.
    bufs = [torch.full(s, float("nan"), dtype=d, device=DEVICE) for s, d in zip(shapes, dtypes)]
    kern = [ps, bufs]
    emu, nat = _clone(kern), _clone(kern)
    for step in range(1, steps + 1):
        ref, before = _clone(kern), _clone(kern)  # the reference steps from the kernel's state
        gs = [_rand(s, d) for s, d in zip(shapes, dtypes)]
        firsts = [use_mom and step == (2 if i in late else 1) for i in range(n)]
        ko.sgd_step(kern[0], gs, kern[1] if use_mom else [None] * n, firsts, **h)
        for i in range(n):
            _sgd_emulate(emu[0][i], gs[i], emu[1][i], firsts[i], h=h)
            sgd_reference(ref[0][i], gs[i], ref[1][i] if use_mom else None, firsts[i],
                          **{k: v for k, v in h.items() if k != "one_minus_dampening"})
        for j in range(2 if use_mom else 1):
            for i in range(n):
                _assert_close_to_spec(kern[j][i], ref[j][i], before[j][i],
                                      f"step {step}: tensor {j} [{i}] {kern[j][i].dtype} vs "
                                      "sgd_reference")
        if native:
            mod, backends, fused = native
            items = [(fused.flat(nat[0][i]), fused.flat(gs[i]),
                      fused.flat(nat[1][i]) if use_mom else None, firsts[i], 0)
                     for i in range(n)]
            mod.sgd_step(backends.cpu_tier_code(), items, h["lr"], h["momentum"],
                         h["dampening"], h["weight_decay"], h["nesterov"], h["maximize"],
                         h["inv_grad_scale"], 1, h["one_minus_dampening"], False)
    return kern, emu, nat


def _check_sgd(kern, emu, nat, use_mom, native):
    names = ["param", "momentum_buffer"][:2 if use_mom else 1]
    for j, name in enumerate(names):
        for i, (k, e) in enumerate(zip(kern[j], emu[j])):
            _assert_exact(k, e, f"{name}[{i}] {k.dtype} vs emulation")
            if native:
                _assert_exact(k, nat[j][i], f"{name}[{i}] {k.dtype} vs CPU kernel")
    if not use_mom:
        for b in kern[1]:
            assert torch.isnan(b.float()).all(), "a buffer was written without momentum"


SGD_FLAGS = [  # momentum, dampening, weight_decay, nesterov, maximize, inv_grad_scale
    (0.0, 0.0, 0.0, False, False, 1.0),
    (0.0, 0.0, 0.1, False, True, 0.5),
    (0.9, 0.0, 0.0, False, False, 1.0),
    (0.9, 0.1, 0.01, False, False, 0.37),
    (0.9, 0.0, 0.05, True, True, 1.0),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("flags", SGD_FLAGS, ids=lambda f: "m%g-d%g-wd%g-nest%d-max%d-s%.3g" % f)
def test_sgd(dtype, flags):
    mom, damp, wd, nesterov, maximize, inv = flags
    h = _sgd_hyper(0.05, mom, damp, wd, nesterov, maximize, inv)
    native = _native()
    late = (1, 4) if mom else ()
    try:
        out = _run_sgd(SHAPES, [dtype] * len(SHAPES), h, native=native, late=late)
    except (TypeError, RuntimeError):  # the installed CPU kernel's binding differs: without it
        native = None
        out = _run_sgd(SHAPES, [dtype] * len(SHAPES), h, late=late)
    _check_sgd(*out, mom != 0.0, native)


def test_sgd_mixed_dtypes_and_chunks(monkeypatch):
    monkeypatch.setattr(ko, "MAX_TENSORS", 3)
    shapes = [(5,), (0,), (1100,), (2,), (3, 3), (1,), (257,), (64,)]
    dtypes = [DTYPES[i % 3] for i in range(len(shapes))]
    h = _sgd_hyper(0.1, 0.5, 0.0, 0.01, True, False, 1.0)
    _check_sgd(*_run_sgd(shapes, dtypes, h, steps=3, late=(2, 3, 7)), True, None)


def test_empty_and_bad_input():
    ko.adam_step([], [], [], [], [], [], [], **_adam_hyper(1e-3, (0.9, 0.999), 1e-8, 0.0, True,
                                                            False, False, 1.0))
    ko.sgd_step([torch.empty(0, device=DEVICE)], [torch.empty(0, device=DEVICE)], [None],
                [False], **_sgd_hyper(0.1, 0.0, 0.0, 0.0, False, False, 1.0))
    p = torch.randn(4, 4, device=DEVICE)
    with pytest.raises(ValueError):
        ko.sgd_step([p], [torch.randn(4, 4, device=DEVICE).t()], [None], [False],
                    **_sgd_hyper(0.1, 0.0, 0.0, 0.0, False, False, 1.0))
    with pytest.raises(ValueError):
        ko.sgd_step([p], [torch.randn(4, 4, device=DEVICE).double()], [None], [False],
                    **_sgd_hyper(0.1, 0.0, 0.0, 0.0, False, False, 1.0))
