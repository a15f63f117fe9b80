"""Optimizer state that does not fit its parameters (a checkpoint of another model, a tampered
or strided tensor): a clear ValueError before the step changes anything (parameters, state,
step counts) on every path, and a refused checkpoint leaves the optimizer as it was. Before,
the Triton kernels wrote past the end of a short state tensor (user memory overwritten; heap
corruption through load_state_dict), the reference path updated parameters and then raised
torch's broadcast error, and the step counts moved on every failed attempt."""
import copy

import pytest
import torch

import llmkernels
from llmkernels import backends

O = llmkernels.optim
PATHS = ["reference"] + (["cpu"] if backends.native_module() is not None else []) + (
    ["triton"] if backends.triton_kernels_or_error("optim")[0] is not None else [])


def _stepped(make, n=3000, dtype=torch.float32):
    ps = [torch.nn.Parameter(torch.randn(n, dtype=dtype)) for _ in range(2)]
    opt = make(ps)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    for p in ps:
        p.grad = torch.randn_like(p)
    return ps, opt


def _snapshot(ps, opt):
    return ([p.detach().clone() for p in ps],
            [{k: v.clone() for k, v in opt.state[p].items()} for p in ps])


def _assert_unchanged(ps, opt, snap):
    params, states = snap
    for p, before in zip(ps, params):
        assert torch.equal(p.detach(), before)
    for p, before in zip(ps, states):
        for key, value in before.items():
            assert torch.equal(opt.state[p][key], value), key


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("make,key", [
    (lambda ps: O.AdamW(ps, lr=0.1), "exp_avg"),
    (lambda ps: O.Adam(ps, lr=0.1, amsgrad=True), "max_exp_avg_sq"),
    (lambda ps: O.SGD(ps, lr=0.1, momentum=0.9), "momentum_buffer"),
    (lambda ps: O.AdamW8bit(ps, lr=0.1, min_8bit_size=1 << 20), "exp_avg_sq"),
])
def test_a_short_state_tensor_is_refused_before_any_change(make, key, dtype, path):
    if dtype == torch.float64 and path != "reference":
        pytest.skip("float64 parameters take the reference path")
    with llmkernels.use_backend(path):
        ps, opt = _stepped(make, dtype=dtype)
        buf = torch.zeros(3100, dtype=opt.state[ps[1]][key].dtype)
        opt.state[ps[1]][key] = buf[:2900]  # the rest of buf stands for the user's memory
        snap = _snapshot(ps, opt)
        for _ in range(2):
            with pytest.raises(ValueError, match="a state tensor of parameter 1 holds 2900 "
                                                 "values, the parameter 3000"):
                opt.step()
        _assert_unchanged(ps, opt, snap)
        assert not buf[2900:].any()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("key", ["exp_avg_codes", "exp_avg_sq_codes", "exp_avg_scales",
                                 "exp_avg_sq_scales"])
def test_a_wrong_8bit_state_is_refused_before_any_change(key, path):
    with llmkernels.use_backend(path):
        ps, opt = _stepped(lambda ps: O.AdamW8bit(ps, lr=0.1, min_8bit_size=1))
        good = opt.state[ps[1]][key]
        buf = torch.zeros(good.numel() + 64, dtype=good.dtype)
        for bad, why in ((buf[:good.numel() - 1], f"{good.numel() - 1} "),
                         (buf[:2 * good.numel()].view(-1, 2)[:, 0], "not contiguous")):
            opt.state[ps[1]][key] = bad
            snap = _snapshot(ps, opt)
            with pytest.raises(ValueError, match=f"{key} of parameter 1 of its group .*{why}"):
                opt.step()
            _assert_unchanged(ps, opt, snap)
            assert not buf[good.numel():].any()


def test_a_refused_8bit_checkpoint_leaves_the_optimizer_as_it_was():
    ps, opt = _stepped(lambda ps: O.AdamW8bit(ps, lr=0.1, min_8bit_size=1))
    saved = opt.state_dict()
    bad = opt.state_dict()
    bad["state"][1] = dict(bad["state"][1])
    bad["state"][1]["exp_avg_codes"] = bad["state"][1]["exp_avg_codes"][:-1].clone()
    snap = _snapshot(ps, opt)
    groups = opt.param_groups
    with pytest.raises(ValueError, match="exp_avg_codes of parameter 1"):
        opt.load_state_dict(bad)
    assert opt.param_groups is groups
    _assert_unchanged(ps, opt, snap)
    # a torch.optim.AdamW checkpoint of another model's sizes: refused the same way
    other = torch.optim.AdamW([torch.nn.Parameter(torch.randn(3000)),
                               torch.nn.Parameter(torch.randn(2999))], lr=0.1)
    for p in other.param_groups[0]["params"]:
        p.grad = torch.randn_like(p)
    other.step()
    with pytest.raises(ValueError, match="exp_avg holds 2999 values, its parameter 3000"):
        opt.load_state_dict(other.state_dict())
    _assert_unchanged(ps, opt, snap)
    opt.load_state_dict(saved)  # and a good one still loads
    opt.step()


def test_strided_8bit_codes_from_a_checkpoint_are_made_contiguous():
    """Codes saved column-major (right values, other strides) were read as if contiguous: 507
    of 512 parameters came out wrong after one step, with no error."""
    ps, opt = _stepped(lambda ps: O.AdamW8bit(ps, lr=0.1, min_8bit_size=1), n=512)
    state = copy.deepcopy(opt.state_dict())  # (state_dict() shares the state's own dicts)
    twin_ps = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    twin = O.AdamW8bit(twin_ps, lr=0.1, min_8bit_size=1)
    for key in ("exp_avg_codes", "exp_avg_sq_codes"):
        codes = state["state"][0][key]
        strided = codes.view(2, 256).t().contiguous().t()  # same values, column-major
        assert not strided.is_contiguous() and torch.equal(strided, codes.view(2, 256))
        state["state"][0][key] = strided
    twin.load_state_dict(state)
    for p, q in zip(ps, twin_ps):
        q.grad = p.grad.clone()
    opt.step()
    twin.step()
    for p, q in zip(ps, twin_ps):
        assert torch.equal(p, q)


@pytest.mark.parametrize("make", [lambda ps: O.AdamW(ps, lr=0.1),
                                  lambda ps: O.AdamW8bit(ps, lr=0.1, min_8bit_size=1)])
def test_hyperparameters_edited_after_construction_are_checked_at_step(make):
    """AdamW8bit took eps = NaN (every parameter NaN) and malformed betas with bare Python
    errors; beta1 = 1 divided by zero after the step counts had moved."""
    for key, value, why in (("eps", float("nan"), "eps must be finite"),
                            ("betas", (1.0, 0.999), r"betas must be in \[0, 1\)"),
                            ("betas", (0.9,), "betas must be a pair"),
                            ("weight_decay", "0.1", "weight_decay must be a number")):
        ps, opt = _stepped(make)
        old = opt.param_groups[0][key]
        opt.param_groups[0][key] = value
        snap = _snapshot(ps, opt)
        with pytest.raises((ValueError, TypeError), match=why):
            opt.step()
        _assert_unchanged(ps, opt, snap)
        opt.param_groups[0][key] = old
        opt.step()


@pytest.mark.parametrize("make", [lambda ps: O.AdamW(ps, lr=1e-3),
                                  lambda ps: O.AdamW8bit(ps, lr=1e-3)])
def test_a_step_that_raises_on_the_planned_path_does_not_count(make):
    """After the first steps, a group's step takes its plan (_plan.py); AdamW8bit's moved the
    step counts before its kernels refused a bad value."""
    ps = [torch.nn.Parameter(torch.randn(5000)), torch.nn.Parameter(torch.randn(10))]
    opt = make(ps)
    for _ in range(3):
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
    opt.param_groups[0]["maximize"] = "yes"  # refused by the kernel call
    with pytest.raises(TypeError):
        opt.step()
    assert [float(opt.state[p]["step"]) for p in ps] == [3.0, 3.0]
