"""Step plans (llmkernels/optim/_plan.py): the fused optimizers keep their tensors' kernel views
from one step to the next and re-check them every step. Whatever changes between steps, a step
with plans must give the same bits as a step without them."""
import pytest
import torch

import llmkernels
from llmkernels.optim import _plan

OPTIMIZERS = {
    "adamw": lambda ps: llmkernels.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    "adam_amsgrad": lambda ps: llmkernels.optim.Adam(ps, lr=1e-2, amsgrad=True,
                                                     weight_decay=0.1),
    "sgd_momentum": lambda ps: llmkernels.optim.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True),
    "sgd": lambda ps: llmkernels.optim.SGD(ps, lr=1e-2),
    # 40x128 has 8-bit state, the others float32 moments (min_8bit_size)
    "adamw8bit": lambda ps: llmkernels.optim.AdamW8bit(ps, lr=1e-2, min_8bit_size=4096),
}
SHAPES = [(40, 128), (33,), (7, 5), (257,)]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # GPU: the Triton path either way


def make_pair(kind, dtype=torch.float32):
    torch.manual_seed(0)
    values = [torch.randn(s).to(DEVICE, dtype) for s in SHAPES]
    ours = [torch.nn.Parameter(v.clone()) for v in values]
    ref = [torch.nn.Parameter(v.clone()) for v in values]
    return ours, OPTIMIZERS[kind](ours), ref, OPTIMIZERS[kind](ref)


def set_grads(ours, ref, seed, skip=()):
    g = torch.Generator().manual_seed(seed)
    for i, (p, q) in enumerate(zip(ours, ref)):
        if i in skip:
            p.grad = q.grad = None
            continue
        grad = torch.randn(p.shape, generator=g).to(p.device, p.dtype)
        p.grad, q.grad = grad.clone(), grad.clone()  # new tensors every step, as backward does


@pytest.fixture(params=["auto", "triton"])
def backend(request):
    """The C++ kernels (the automatic choice for CPU tensors), or Triton's (forced; in its
    interpreter here, compiled on a GPU)."""
    if request.param == "triton":
        from llmkernels import backends
        why = backends.triton_unavailable("optim")
        if why is not None:
            pytest.skip(why)
        with llmkernels.use_backend("triton"):
            yield request.param
    else:
        yield request.param


def step_both(opt_ours, opt_ref, monkeypatch):
    opt_ours.step()
    with monkeypatch.context() as m:  # the reference: every step the full path
        m.setattr(_plan, "serve", lambda *args: None)
        opt_ref.step()


def assert_same(ours, opt_ours, ref, opt_ref):
    for p, q in zip(ours, ref):
        assert torch.equal(p, q)
        # .get: a read of opt.state[p] makes an entry (defaultdict), which the plan sees
        s, t = opt_ours.state.get(p, {}), opt_ref.state.get(q, {})
        assert s.keys() == t.keys()
        for key in s:
            if isinstance(s[key], torch.Tensor):
                assert torch.equal(s[key], t[key]), key


def hits(opt):
    plan = _plan.cached(opt, opt.param_groups[0])
    return 0 if plan is None else plan.hits


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_plan_serves_and_matches_full_steps(kind, backend, monkeypatch):
    ours, opt, ref, opt_ref = make_pair(kind)
    for step in range(4):
        set_grads(ours, ref, step)
        step_both(opt, opt_ref, monkeypatch)
        assert_same(ours, opt, ref, opt_ref)
    assert hits(opt) == 3  # every step after the first
    assert hits(opt_ref) == 0


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_changes_between_steps_take_the_full_path(kind, backend, monkeypatch):
    ours, opt, ref, opt_ref = make_pair(kind)

    def run(seed, skip=()):
        set_grads(ours, ref, seed, skip)
        step_both(opt, opt_ref, monkeypatch)
        assert_same(ours, opt, ref, opt_ref)

    run(0)
    run(1)
    # a parameter given new storage (as module.to() / param.data = ... do)
    for params in (ours, ref):
        params[0].data = params[0].data.clone()
    run(2)
    # a parameter without a gradient for one step
    run(3, skip=(1,))
    run(4)
    # a state tensor replaced by the user
    key = next(k for k, v in opt.state[ours[2]].items()
               if isinstance(v, torch.Tensor) and v.numel() > 1) if kind != "sgd" else None
    if key is not None:
        for o, params in ((opt, ours), (opt_ref, ref)):
            o.state[params[2]][key] = o.state[params[2]][key].clone()
        run(5)
    # a non-contiguous gradient: not a kernel view (the reference path; a forced Triton
    # path raises instead)
    if backend == "auto":
        set_grads(ours, ref, 6)
        g = torch.randn(SHAPES[0][::-1], device=DEVICE).t()
        ours[0].grad, ref[0].grad = g.clone(), g.clone()
        assert not ours[0].grad.is_contiguous()
        step_both(opt, opt_ref, monkeypatch)
        assert_same(ours, opt, ref, opt_ref)
    run(8)
    # a checkpoint loaded: plans dropped (they hold the old state), the next step equal
    opt.load_state_dict(opt.state_dict())
    opt_ref.load_state_dict(opt_ref.state_dict())
    assert not opt.__dict__.get("_llmk_plans")  # no tensor of the old state kept alive
    run(9)
    run(10)
    assert hits(opt) >= 1


@pytest.mark.parametrize("kind", ["adamw", "sgd_momentum", "adamw8bit"])
def test_forced_backend_is_followed_with_a_plan(kind, monkeypatch):
    ours, opt, ref, opt_ref = make_pair(kind)
    for step in range(2):
        set_grads(ours, ref, step)
        step_both(opt, opt_ref, monkeypatch)
    before = hits(opt)
    with llmkernels.use_backend("reference"):
        set_grads(ours, ref, 2)
        step_both(opt, opt_ref, monkeypatch)
    assert hits(opt) == before  # the reference path served, not the plan's kernel
    assert_same(ours, opt, ref, opt_ref)


def test_hyperparameter_changes_between_steps(backend, monkeypatch):
    """Settings are read every step; the ones that change the state keys (amsgrad, momentum)
    do not use a plan made for the others."""
    for kind, key, value in (("adamw", "amsgrad", True), ("sgd", "momentum", 0.5),
                             ("sgd_momentum", "lr", 0.5), ("adamw8bit", "weight_decay", 0.3)):
        ours, opt, ref, opt_ref = make_pair(kind)
        for step in range(4):
            if step == 2:
                for o in (opt, opt_ref):
                    o.param_groups[0][key] = value
            set_grads(ours, ref, step)
            step_both(opt, opt_ref, monkeypatch)
            assert_same(ours, opt, ref, opt_ref)


def test_bfloat16_parameters(backend, monkeypatch):
    ours, opt, ref, opt_ref = make_pair("adamw8bit", torch.bfloat16)
    for step in range(3):
        set_grads(ours, ref, step)
        step_both(opt, opt_ref, monkeypatch)
        assert_same(ours, opt, ref, opt_ref)
    assert hits(opt) == 2


@pytest.mark.parametrize("kind", ["adamw", "adamw8bit", "sgd_momentum"])
def test_two_param_groups(kind, monkeypatch):
    """The usual decay / no-decay split: each group's plan serves from the third step on (the
    first group's first plan saw only its own state)."""
    ours, opt, ref, opt_ref = make_pair(kind)
    for o, params in ((opt, ours), (opt_ref, ref)):
        o.param_groups.clear()
        o.state.clear()
        o.add_param_group({"params": params[:2]})
        o.add_param_group({"params": params[2:], "weight_decay": 0.0})
    for step in range(5):
        set_grads(ours, ref, step)
        step_both(opt, opt_ref, monkeypatch)
        assert_same(ours, opt, ref, opt_ref)
    for group in opt.param_groups:
        assert _plan.cached(opt, group).hits >= 2


def test_plans_back_off_when_they_never_serve(monkeypatch):
    """A group whose parameters get new storage every step builds few plans."""
    ours, opt, ref, opt_ref = make_pair("adamw")
    built = []
    real = _plan.Plan
    monkeypatch.setattr(_plan, "Plan", lambda *a: built.append(1) or real(*a))
    kept = []  # old storage kept alive: no address comes back
    for step in range(20):
        kept.append(ours[0].data)
        ours[0].data = ours[0].data.clone()
        set_grads(ours, ref, step)
        opt.step()
    assert len(built) == 3  # the first step's, then two more (see worth_building)
    assert _plan.cached(opt, opt.param_groups[0]).hits == 0
