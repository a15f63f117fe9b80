"""capturable=True (optim/_capturable.py): step counts, bias corrections, a tensor learning rate,
GradScaler's scale and inf flag and a pending clipping factor stay on the parameters' device,
and the Triton kernels read their floats from a device table: the same update as the host
path's, with nothing read back to the host, so that a CUDA graph can capture the step.

Without a GPU the Triton kernels run in the interpreter on CPU tensors (the device path is
taken there too when Triton is forced); the CUDA graph capture itself runs on a GPU."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

import llmkernels  # noqa: E402
from llmkernels import optim  # noqa: E402
from llmkernels.optim import _capturable  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZES = [(257,), (33, 65), (4,), (1,)]
STEPS = 4


def _data(dtype=torch.float32, sizes=SIZES, steps=STEPS, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g).to(dtype) for s in sizes]
    grads = [[torch.randn(s, generator=g).to(dtype) for s in sizes] for _ in range(steps)]
    return params, grads


def _run(make, params, grads, backend, *, between=None, step_kw=None, device=DEVICE, **kw):
    """Copies of params on device optimized by make(copies, **kw) over grads with backend
    forced; between(i, opt) runs before step i."""
    ps = [p.detach().clone().to(device).requires_grad_() for p in params]
    opt = make(ps, **kw)
    with llmkernels.use_backend(backend):
        for i, gs in enumerate(grads):
            for p, g in zip(ps, gs):
                p.grad = g.to(device)
            if between is not None:
                between(i, opt)
            opt.step(**(step_kw or {}))
    return ps, opt


def _close(a, b, dtype):
    # The device table's float64 pow may differ from Python's in the last bit, which can
    # move a float32 correction by an ulp.
    tol = dict(rtol=1e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-6)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.detach().float(), y.detach().float(), **tol)


@pytest.fixture
def device_launches(monkeypatch):
    """Counts the capturable steps that took the device path."""
    calls = []
    real = _capturable.advance
    monkeypatch.setattr(_capturable, "advance",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.fixture
def reference_device_path(monkeypatch):
    """The capturable reference path (PyTorch ops with device scalars, which serves CUDA
    tensors when Triton is missing) taken for these tensors wherever they are."""
    monkeypatch.setattr(_capturable, "device_path", lambda *a, **k: "reference")


ADAM_CASES = [
    (optim.AdamW, dict(weight_decay=0.1)),
    (optim.AdamW, dict(weight_decay=0.1, amsgrad=True)),
    (optim.AdamW, dict(maximize=True)),
    (optim.Adam, dict(weight_decay=0.1)),
    (optim.Adam, dict(amsgrad=True, maximize=True)),
]


@pytest.mark.parametrize("make,kw", ADAM_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_capturable_matches_the_host_path(make, kw, dtype, device_launches):
    params, grads = _data(dtype)
    a, opt_a = _run(make, params, grads, "triton", lr=1e-2, **kw)
    b, opt_b = _run(make, params, grads, "triton", lr=1e-2, capturable=True, **kw)
    assert len(device_launches) == STEPS
    _close(a, b, dtype)
    for pa, pb in zip(a, b):
        for key in opt_a.state[pa]:
            if key != "step":
                _close([opt_a.state[pa][key]], [opt_b.state[pb][key]], dtype)
        step = opt_b.state[pb]["step"]
        # torch's capturable layout: a float32 step on the parameter's device
        assert step.device == pb.device and step.dtype == torch.float32
        assert float(step) == STEPS


@pytest.mark.parametrize("make", [optim.AdamW, optim.AdamW8bit])
def test_mixed_dtypes_and_steps_read_their_own_table_rows(make, device_launches):
    """One group of float32 and bfloat16 parameters (several launches, each tensor's row
    given in the pointer table) whose step counts differ (a parameter without a gradient at
    first): every tensor reads its own row."""
    g = torch.Generator().manual_seed(5)
    specs = [((300,), torch.float32), ((257,), torch.bfloat16), ((5,), torch.float32),
             ((1000,), torch.bfloat16), ((2, 300), torch.float32)]
    # (on DEVICE: a GPU's Triton takes CUDA tensors; the interpreter, CPU ones)
    params = [torch.randn(s, generator=g).to(DEVICE, dt) for s, dt in specs]
    grads = [[torch.randn(s, generator=g).to(DEVICE, dt) for s, dt in specs]
             for _ in range(STEPS)]
    for i in range(2):  # the third parameter gets its first gradient at step 2
        grads[i][2] = None
    kw = dict(lr=1e-2, weight_decay=0.1)
    if make is optim.AdamW8bit:
        kw["min_8bit_size"] = 256
    results = []
    for capturable in (False, True):
        ps = [p.clone().requires_grad_() for p in params]
        opt = make(ps, capturable=capturable, **kw)
        with llmkernels.use_backend("triton"):
            for gs in grads:
                for p, gr in zip(ps, gs):
                    p.grad = gr
                opt.step()
        results.append((ps, opt))
    (a, opt_a), (b, opt_b) = results
    assert len(device_launches) == STEPS
    for (shape, dtype), pa, pb in zip(specs, a, b):
        _close([pa], [pb], dtype)
    assert [float(opt_b.state[p]["step"]) for p in b] == [STEPS, STEPS, STEPS - 2, STEPS, STEPS]


def test_capturable_adamw_follows_torch_with_a_tensor_lr_changed_in_place():
    """A graph replays with the lr tensor's new value: the step reads it on the device."""
    params, grads = _data()
    lr = torch.tensor(1e-2, device=DEVICE)
    values = [1e-2, 5e-3, 2e-3, 1e-3]

    def schedule(i, opt):
        lr.fill_(values[i])
    a, _ = _run(optim.AdamW, params, grads, "triton", lr=lr, capturable=True,
                weight_decay=0.1, between=schedule)
    # torch with the same float32 learning rates
    ts = [p.clone().to(DEVICE).requires_grad_() for p in params]
    ref = torch.optim.AdamW(ts, lr=1e-2, weight_decay=0.1, foreach=False)
    for i, gs in enumerate(grads):
        ref.param_groups[0]["lr"] = float(torch.tensor(values[i], dtype=torch.float32))
        for p, g in zip(ts, gs):
            p.grad = g.to(DEVICE)
        ref.step()
    _close(a, ts, torch.float32)


class _NoHostReads:
    """Tensor methods that read a value back to the host raise while active."""
    NAMES = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "numpy", "cpu")

    def __init__(self, monkeypatch):
        self.monkeypatch = monkeypatch

    def __enter__(self):
        for name in self.NAMES:
            def refuse(*args, _name=name, **kwargs):
                raise AssertionError(f"a capturable step called Tensor.{_name}")
            self.monkeypatch.setattr(torch.Tensor, name, refuse)

    def __exit__(self, *exc):
        self.monkeypatch.undo()


@pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="Triton forced on CPU tensors runs only in the interpreter")
@pytest.mark.parametrize("make", [optim.AdamW, optim.AdamW8bit])
def test_capturable_step_reads_nothing_back(make, monkeypatch):
    """No .item(), float(), bool() etc. of a tensor in the step (each one is a device sync,
    which a CUDA graph capture refuses): lr, GradScaler's tensors and a pending clipping
    factor included. The interpreter reads its arguments through numpy, so on the CPU the
    check wraps the optimizer's own code only (the kernel launches are let through)."""
    from llmkernels.kernels import optim as ko
    params, grads = _data(sizes=[(300,), (7,)], steps=3)
    ps = [p.clone().to(DEVICE).requires_grad_() for p in params]
    opt = make(ps, lr=torch.tensor(1e-2, device=DEVICE), weight_decay=0.1, capturable=True,
               **({"min_8bit_size": 256} if make is optim.AdamW8bit else {}))
    guard = _NoHostReads(monkeypatch)
    if DEVICE == "cpu":
        for name in ("adam_launch_table", "adam8bit_launch_table"):
            real = getattr(ko, name)

            def unguarded(*a, _real=real, **k):
                guard.__exit__()
                try:
                    return _real(*a, **k)
                finally:
                    guard.__enter__()
            monkeypatch.setattr(ko, name, unguarded)
    scale = torch.tensor(4.0, device=DEVICE)
    found = torch.tensor(0.0, device=DEVICE)
    with llmkernels.use_backend("triton"):
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = g.to(DEVICE) * 4.0
            with guard:
                optim.clip_grad_norm_(ps, 1e9, optimizer=opt)
                opt.step(grad_scale=scale, found_inf=found)
    assert float(opt.state[ps[0]]["step"]) == len(grads)


@pytest.mark.parametrize("make", [optim.AdamW, optim.AdamW8bit])
def test_grad_scaler_tensors_and_skipped_steps(make):
    """grad_scale divides the gradients on the device; a step with found_inf set changes no
    parameter or state and takes its step count back."""
    params, grads = _data(sizes=[(600,), (9,)])
    kw = dict(lr=1e-2, weight_decay=0.1)
    if make is optim.AdamW8bit:
        kw["min_8bit_size"] = 256
    a, opt_a = _run(make, params, grads, "triton", **kw)
    scale = torch.tensor(8.0, device=DEVICE)
    skipped = []

    def scaled(i, opt):
        for p in opt.param_groups[0]["params"]:
            p.grad = p.grad * 8.0
        if i == 2:  # an extra step with inf gradients, which must change nothing
            before = [p.detach().clone() for p in opt.param_groups[0]["params"]]
            state = {k: v.clone() for k, v in opt.state[opt.param_groups[0]["params"][0]].items()}
            opt.step(grad_scale=scale, found_inf=torch.tensor(1.0, device=DEVICE))
            after = opt.param_groups[0]["params"]
            assert all(torch.equal(x, y.detach()) for x, y in zip(before, after))
            for k, v in opt.state[after[0]].items():
                assert torch.equal(v, state[k]), k
            skipped.append(i)
    b, opt_b = _run(make, params, grads, "triton", capturable=True, between=scaled,
                    step_kw=dict(grad_scale=scale, found_inf=torch.tensor(0.0, device=DEVICE)),
                    **kw)
    assert skipped == [2]
    _close(a, b, torch.float32)
    assert float(opt_b.state[b[0]]["step"]) == len(grads)


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_capturable_adamw8bit_matches_the_host_path(maximize, dtype, device_launches):
    params, grads = _data(dtype, sizes=[(700,), (2 * 256 * 4 + 3,), (33, 65), (100,)])
    kw = dict(lr=1e-2, weight_decay=0.1, maximize=maximize, min_8bit_size=256)
    a, opt_a = _run(optim.AdamW8bit, params, grads, "triton", **kw)
    b, opt_b = _run(optim.AdamW8bit, params, grads, "triton", capturable=True, **kw)
    assert len(device_launches) == STEPS
    _close(a, b, dtype)
    for pa, pb in zip(a, b):
        for key, value in opt_a.state[pa].items():
            if key == "step":
                continue
            if value.dtype in (torch.int8, torch.uint8):  # a code may round the other way
                assert (value.int() - opt_b.state[pb][key].int()).abs().max() <= 1, key
            else:
                _close([value], [opt_b.state[pb][key]], torch.float32)


def test_capturable_stochastic_rounding_keys_match_the_host_path():
    """The keys of each tensor's random stream, computed on the device from the step tensor,
    are the host path's: the same bf16 parameters bit for bit (corrections equal here)."""
    params, grads = _data(torch.bfloat16)
    kw = dict(lr=1e-2, weight_decay=0.1, stochastic_rounding=True, seed=7)
    a, _ = _run(optim.AdamW, params, grads, "triton", **kw)
    b, _ = _run(optim.AdamW, params, grads, "triton", capturable=True, **kw)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_capturable_clipping_factor_stays_a_tensor():
    params, grads = _data()
    a, _ = _run(optim.AdamW, params, grads, "triton", lr=1e-2,
                between=lambda i, opt: optim.clip_grad_norm_(
                    opt.param_groups[0]["params"], 0.5, optimizer=opt))
    seen = []

    def clip(i, opt):
        optim.clip_grad_norm_(opt.param_groups[0]["params"], 0.5, optimizer=opt)
        seen.append(type(opt._llmk_pending_grad_multiplier))
    b, _ = _run(optim.AdamW, params, grads, "triton", lr=1e-2, capturable=True, between=clip)
    assert seen == [torch.Tensor] * STEPS
    _close(a, b, torch.float32)


@pytest.mark.parametrize("make", [optim.AdamW, optim.AdamW8bit])
def test_capturable_checkpoints_resume_and_move_to_torch(make):
    """A capturable optimizer's state_dict resumes bit-exactly in a new capturable optimizer,
    and its steps load into torch's AdamW (as tensors on the parameters' device)."""
    params, grads = _data(steps=5)
    kw = dict(lr=1e-2, weight_decay=0.1, capturable=True)
    if make is optim.AdamW8bit:
        kw["min_8bit_size"] = 256
    whole, _ = _run(make, params, grads, "triton", **kw)
    first, opt = _run(make, params, grads[:3], "triton", **kw)
    saved = opt.state_dict()
    ps = [p.detach().clone().requires_grad_() for p in first]
    resumed = make(ps, **kw)
    resumed.load_state_dict(saved)
    with llmkernels.use_backend("triton"):
        for gs in grads[3:]:
            for p, g in zip(ps, gs):
                p.grad = g.to(DEVICE)
            resumed.step()
    for x, y in zip(whole, ps):
        assert torch.equal(x, y)
    if make is optim.AdamW:
        ts = [p.detach().clone() for p in first]
        ref = torch.optim.AdamW(ts, lr=1e-2, weight_decay=0.1, capturable=DEVICE == "cuda")
        ref.load_state_dict(saved)
        assert float(ref.state[ts[0]]["step"]) == 3


def test_the_cpu_kernel_takes_capturable_groups_with_host_reads():
    """CPU tensors on the C++ kernel: reading a CPU tensor is no device sync, so capturable
    groups take the host path there, with the same results."""
    if llmkernels.backends.native_module() is None:
        pytest.skip("needs the compiled CPU kernel")
    params, grads = _data()
    lr = torch.tensor(1e-2)
    a, _ = _run(optim.AdamW, params, grads, "cpu", lr=float(lr), weight_decay=0.1, device="cpu")
    ps = [p.clone().requires_grad_() for p in params]
    opt = optim.AdamW(ps, lr=lr, weight_decay=0.1, capturable=True)
    with llmkernels.use_backend("cpu"):
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = g
            opt.step()
    for x, y in zip(a, ps):
        assert torch.equal(x, y)


@pytest.mark.parametrize("make,kw", ADAM_CASES + [(optim.AdamW8bit, dict(min_8bit_size=256)),
                                                  (optim.AdamW8bit, dict(maximize=True))])
def test_the_capturable_reference_path_matches_the_host_path(make, kw, reference_device_path):
    params, grads = _data(sizes=[(700,), (33, 65), (4,)])
    kw = dict(dict(lr=1e-2, weight_decay=0.1), **kw)
    a, opt_a = _run(make, params, grads, "reference", **kw)
    scale = torch.tensor(2.0, device=DEVICE)

    def skip_one(i, opt):
        for p in opt.param_groups[0]["params"]:
            p.grad = p.grad * 2.0
        if i == 1:
            before = [p.detach().clone() for p in opt.param_groups[0]["params"]]
            opt.step(grad_scale=scale, found_inf=torch.tensor(1.0, device=DEVICE))
            assert all(torch.equal(x, y) for x, y in zip(before, opt.param_groups[0]["params"]))
    b, opt_b = _run(make, params, grads, "reference", capturable=True, between=skip_one,
                    step_kw=dict(grad_scale=scale, found_inf=torch.tensor(0.0, device=DEVICE)),
                    **kw)
    _close(a, b, torch.float32)
    assert float(opt_b.state[b[0]]["step"]) == STEPS


# ------------------------------------------------------------------------------ CUDA graphs

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(),
                               torch.nn.Linear(256, 64)).cuda()


@cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("make", [optim.AdamW, optim.AdamW8bit])
def test_a_cuda_graph_replays_the_step(make, backend):
    """Whole-iteration capture (forward, backward, step) after eager warm-up steps, as in
    torch's CUDA graph docs; replays with a new lr and new inputs follow the eager run."""
    kw = dict(weight_decay=0.1, capturable=True)
    if make is optim.AdamW8bit:
        kw["min_8bit_size"] = 1024
    x = torch.randn(32, 64, device="cuda")
    inputs = [torch.randn(32, 64, device="cuda") for _ in range(5)]
    lrs = [1e-3, 5e-4, 2e-4, 1e-4, 5e-5]

    def train(graphed: bool):
        model = _tiny_model()
        lr = torch.tensor(lrs[0], device="cuda")
        opt = make(model.parameters(), lr=lr, **kw)
        static_x = x.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm-up
                opt.zero_grad(set_to_none=True)
                model(static_x).square().mean().backward()
                opt.step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = None
        if graphed:
            graph = torch.cuda.CUDAGraph()
            opt.zero_grad(set_to_none=True)
            with torch.cuda.graph(graph):
                model(static_x).square().mean().backward()
                opt.step()
        for inp, value in zip(inputs, lrs):
            static_x.copy_(inp)
            lr.fill_(value)
            if graph is not None:
                graph.replay()
            else:
                opt.zero_grad(set_to_none=True)
                model(static_x).square().mean().backward()
                opt.step()
        torch.cuda.synchronize()
        return [p.detach().clone() for p in model.parameters()], opt
    with llmkernels.use_backend(backend):
        eager, _ = train(False)
        graphed, opt = train(True)
    for a, b in zip(eager, graphed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # 3 warm-up steps and 5 replays (a capture records the step without running it)
    step = opt.state[next(iter(opt.state))]["step"]
    assert step.is_cuda and float(step) == 3 + 5


@cuda
@pytest.mark.parametrize("make,kw", [(optim.AdamW, dict(weight_decay=0.1)),
                                     (optim.Adam, dict(amsgrad=True, maximize=True)),
                                     (optim.AdamW8bit, dict(min_8bit_size=256, maximize=True))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernels_take_capturable_steps_as_triton_does(make, kw, dtype):
    """The CUDA kernels read the same device table (rows by parameter; AdamW8bit's small
    tensors through the Adam kernel): bit for bit the Triton kernels' capturable steps (both
    are the C++ kernel's update), a skipped step included."""
    params, grads = _data(dtype, sizes=[(700,), (2 * 2048 + 3,), (33, 65), (100,)])
    kw = dict(dict(lr=1e-2), **kw)

    def skip_one(i, opt):
        if i == 1:
            opt.step(grad_scale=torch.tensor(2.0, device=DEVICE),
                     found_inf=torch.tensor(1.0, device=DEVICE))
    runs = {}
    for backend in ("triton", "cuda"):
        runs[backend] = _run(make, params, grads, backend, capturable=True, between=skip_one,
                             **kw)
    (a, opt_a), (b, opt_b) = runs["triton"], runs["cuda"]
    for pa, pb in zip(a, b):
        assert torch.equal(pa, pb)
        for key, value in opt_a.state[pa].items():
            assert torch.equal(value, opt_b.state[pb][key]), key


@cuda
@pytest.mark.parametrize("make", [optim.AdamW, optim.AdamW8bit, optim.SGD])
def test_capturing_a_host_step_raises_a_clear_error(make):
    p = torch.randn(300, device="cuda", requires_grad=True)
    p.grad = torch.randn_like(p)
    opt = make([p], lr=1e-3)
    opt.step()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="capturable|CUDA graph"):
        with torch.cuda.graph(graph):
            opt.step()


@cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("capturable", [False, True])
@pytest.mark.parametrize("make", [optim.AdamW, optim.AdamW8bit, optim.SGD])
def test_cuda_steps_do_not_synchronize(make, capturable, backend):
    """torch's sync debug mode raises on any operation that makes the host wait for the GPU:
    the Triton steps (tables through pinned memory) and the CUDA kernels' (tables as kernel
    parameters) have none, capturable or not; a capturable step's tensor lr and GradScaler
    tensors included."""
    if make is optim.SGD and capturable:
        pytest.skip("SGD has no capturable mode")
    ps = [torch.randn(s, device="cuda", requires_grad=True) for s in [(300,), (64, 65), (7,)]]
    kw = {"min_8bit_size": 256} if make is optim.AdamW8bit else {}
    kw["lr"] = torch.tensor(1e-3, device="cuda") if capturable else 1e-3
    opt = make(ps, capturable=True, **kw) if capturable else make(ps, **kw)
    step_kw = {}
    if capturable:
        step_kw = dict(grad_scale=torch.tensor(2.0, device="cuda"),
                       found_inf=torch.tensor(0.0, device="cuda"))
    for p in ps:
        p.grad = torch.randn_like(p)
    with llmkernels.use_backend(backend):
        opt.step(**step_kw)  # first step: states created, kernels compiled
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                for p in ps:
                    p.grad = torch.randn_like(p)
                opt.step(**step_kw)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_a_device_table_of_the_wrong_shape_is_refused():
    from llmkernels.kernels import optim as ko
    p = torch.randn(300, device=DEVICE)
    g, m, v = torch.randn_like(p), torch.zeros_like(p), torch.zeros_like(p)
    prepared = ko.adam_prepare([p], [g], [m], [v], [None], amsgrad=False, table_rows=[0])
    consts = dict(beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=True, amsgrad=False,
                  maximize=False, one_minus_beta1=0.1, one_minus_beta2=0.001, sr=False)
    for bad in (torch.zeros(1, 5, device=DEVICE), torch.zeros(1, 6, dtype=torch.float64,
                                                               device=DEVICE),
                torch.zeros(2, 12, device=DEVICE)[:, ::2], [[0.0] * 6]):
        with pytest.raises(ValueError, match="float32 table"):
            ko.adam_launch_table(prepared, None, bad, **consts)
    assert torch.equal(m, torch.zeros_like(p))  # nothing launched
