"""AdamW8bit: state memory, per-step state error against float32 AdamW, kernel against
reference, convergence of a small language model, resume, bad input."""
import copy

import pytest
import torch

import llmkernels
from llmkernels.optim import AdamW8bit
from llmkernels.optim.adam8bit import dequantize_moments


def _blocks(t):
    return torch.nn.functional.pad(t, (0, (-t.numel()) % 256)).view(-1, 256)


def test_state_memory_is_a_quarter():
    ps = [torch.randn(4096, 1024, requires_grad=True), torch.randn(1000, requires_grad=True)]
    opt = AdamW8bit(ps)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    full = sum(2 * p.numel() * 4 for p in ps)  # AdamW: two float32 moments
    assert opt.state_bytes() <= 0.27 * full
    assert "exp_avg" in opt.state[ps[1]]  # small tensors keep float32 moments


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_state_error_is_bounded(backend):
    torch.manual_seed(0)
    p = torch.randn(50_000, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    a, b = AdamW8bit([p], lr=1e-3), torch.optim.AdamW([q], lr=1e-3)
    with llmkernels.use_backend(backend):
        for _ in range(50):
            g = torch.randn_like(p) * torch.exp(torch.randn_like(p))  # decades of magnitudes
            p.grad, q.grad = g.clone(), g.clone()
            a.step()
            b.step()
    m8, v8 = dequantize_moments(a.state[p])
    m, v = b.state[q]["exp_avg"], b.state[q]["exp_avg_sq"]
    # measured: 2.9% (m) and 3.0% (v) of the block's absmax after 50 steps (both paths)
    assert (_blocks(m8 - m).abs().amax(1) / _blocks(m).abs().amax(1)).max() <= 0.06
    assert (_blocks(v8 - v).abs().amax(1) / _blocks(v).abs().amax(1)).max() <= 0.05
    assert ((p - q).abs().max() / q.abs().max()).item() <= 1e-3


def test_kernel_matches_reference():
    torch.manual_seed(1)
    p = torch.randn(10_000, dtype=torch.bfloat16, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    a, b = AdamW8bit([p], lr=1e-3, weight_decay=0.1), AdamW8bit([q], lr=1e-3, weight_decay=0.1)
    for _ in range(3):
        g = torch.randn_like(p)
        p.grad, q.grad = g.clone(), g.clone()
        a.step()
        with llmkernels.use_backend("reference"):
            b.step()
    assert (p.float() - q.float()).abs().max().item() <= 2 ** -7 * q.float().abs().max().item()


def test_small_transformer_language_model_converges_like_adamw():
    """A 2-layer causal transformer language model on a fixed synthetic task (each token is
    (3 * previous + 1) mod V, with 10% noise tokens): 500 steps of AdamW8bit end within 2%
    of float32 AdamW's loss (mean of the last 25 steps)."""
    V, D, L, B = 64, 64, 32, 16

    class LM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(V, D)
            self.pos = torch.nn.Parameter(torch.randn(L, D) * 0.02)
            layer = torch.nn.TransformerEncoderLayer(D, 4, 4 * D, dropout=0.0, batch_first=True)
            self.blocks = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = torch.nn.Linear(D, V)

        def forward(self, x):
            mask = torch.nn.Transformer.generate_square_subsequent_mask(x.shape[1])
            return self.head(self.blocks(self.embed(x) + self.pos[:x.shape[1]], mask=mask,
                                         is_causal=True))

    def batch(gen):
        x = torch.empty(B, L, dtype=torch.long)
        x[:, 0] = torch.randint(0, V, (B,), generator=gen)
        for t in range(1, L):
            x[:, t] = (3 * x[:, t - 1] + 1) % V
        noise = torch.rand(B, L, generator=gen) < 0.1
        return torch.where(noise, torch.randint(0, V, (B, L), generator=gen), x)

    def train(make_opt):
        torch.manual_seed(0)
        net = LM()
        opt = make_opt(net.parameters())
        gen = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(500):
            x = batch(gen)
            logits = net(x[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), x[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return sum(losses[-25:]) / 25

    ref = train(lambda ps: torch.optim.AdamW(ps, lr=3e-3))
    ours = train(lambda ps: AdamW8bit(ps, lr=3e-3, min_8bit_size=4096))
    assert ours <= ref * 1.02 + 1e-3, (ours, ref)


def test_resume_is_bit_exact():
    torch.manual_seed(2)
    p = torch.randn(20_000, requires_grad=True)
    opt = AdamW8bit([p])
    for _ in range(3):
        p.grad = torch.randn_like(p)
        opt.step()
    snap_p, snap_s = p.detach().clone(), copy.deepcopy(opt.state_dict())
    grads = [torch.randn_like(p) for _ in range(3)]
    for g in grads:
        p.grad = g.clone()
        opt.step()
    q = snap_p.clone().requires_grad_()
    opt2 = AdamW8bit([q])
    opt2.load_state_dict(snap_s)
    for g in grads:
        q.grad = g.clone()
        opt2.step()
    assert torch.equal(p, q)


@pytest.mark.parametrize("kw,match", [(dict(lr=-1.0), "learning rate"),
                                      (dict(betas=(0.9, 1.0)), "beta"),
                                      (dict(min_8bit_size=0), "min_8bit_size")])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        AdamW8bit([torch.randn(3, requires_grad=True)], **kw)


def test_bf16_parameters_resume_bit_exact():
    p = torch.randn(8192, dtype=torch.bfloat16, requires_grad=True)
    opt = AdamW8bit([p])
    p.grad = torch.randn_like(p)
    opt.step()
    opt2 = AdamW8bit([p.detach().clone().requires_grad_()])
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    st = opt2.state[opt2.param_groups[0]["params"][0]]
    assert st["exp_avg_codes"].dtype == torch.int8 and st["exp_avg_scales"].dtype == torch.float32
    assert torch.equal(st["exp_avg_scales"], opt.state[p]["exp_avg_scales"])


def test_small_bf16_tensors_keep_float32_moments_on_the_kernel():
    torch.manual_seed(3)
    p = torch.randn(1000, dtype=torch.bfloat16, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    a, b = AdamW8bit([p], lr=1e-2), AdamW8bit([q], lr=1e-2)
    for _ in range(5):
        g = torch.randn_like(p)
        p.grad, q.grad = g.clone(), g.clone()
        a.step()
        with llmkernels.use_backend("reference"):
            b.step()
    assert a.state[p]["exp_avg"].dtype == torch.float32
    assert (p.float() - q.float()).abs().max().item() <= 2 ** -7 * q.float().abs().max().item()
    torch.testing.assert_close(a.state[p]["exp_avg_sq"], b.state[q]["exp_avg_sq"], rtol=1e-5,
                               atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_cpu_tier_gives_the_same_bits(dtype):
    """The per-tier builds of the 8-bit loop (AVX-512 and AVX2 intrinsics, the scalar loop
    elsewhere and for vector tails; float16 converted by F16C where the tier has it) compute
    the same update: what makes a checkpoint continue identically on another CPU, or on the
    GPU kernels."""
    tiers = llmkernels.backends.supported_cpu_tiers()
    if len(tiers) < 2:
        pytest.skip("one CPU tier here")
    torch.manual_seed(4)
    base = torch.randn(3003).to(dtype)  # a last block of 187 values: vector tails
    grads = [(torch.randn(3003) * torch.exp(torch.randn(3003))).to(dtype) for _ in range(3)]
    results = []
    for tier in tiers:
        p = base.clone().requires_grad_()
        opt = AdamW8bit([p], lr=1e-2, min_8bit_size=256)
        with llmkernels.use_cpu_tier(tier):
            for g in grads:
                p.grad = g.clone()
                opt.step()
        results.append((p.detach(), opt.state[p]["exp_avg_codes"], opt.state[p]["exp_avg_sq_codes"],
                        opt.state[p]["exp_avg_scales"], opt.state[p]["exp_avg_sq_scales"]))
    for tier, got in zip(tiers[1:], results[1:]):
        for a, b in zip(results[0], got):
            assert torch.equal(a, b), tier


def test_sqrt_codes_are_exact():
    """sqrt_codes (the kernels' sqrt_code): the integer nearest sqrt(y), halves up, including
    at and next to every half-way point (c + 1/2)^2."""
    from llmkernels.optim.adam8bit import sqrt_codes
    c = torch.arange(0, 256, dtype=torch.float64)
    mid = (c + 0.5) ** 2
    y = torch.cat([mid, torch.nextafter(mid.float(), torch.tensor(0.0)).double(),
                   torch.nextafter(mid.float(), torch.tensor(1e9)).double(),
                   torch.rand(100_000, dtype=torch.float64) * 65025, torch.tensor([0.0, 0.2, 0.25])])
    got = sqrt_codes(y.float(), 255)
    want = torch.floor(torch.sqrt(y.float().double()) + 0.5).clamp(max=255).to(torch.int32)
    assert torch.equal(got, want)
    assert sqrt_codes(torch.tensor([float("nan")]), 255).item() == 0


def _bf16_step_on_every_tier(make, base, grad):
    """The parameter bits after one tiny step (lr 1e-40: values barely move) from base on each
    CPU tier; every tier's must be the first's."""
    tiers = llmkernels.backends.supported_cpu_tiers()
    if len(tiers) < 2:
        pytest.skip("one CPU tier here")
    results = []
    for tier in tiers:
        p = base.clone().requires_grad_()
        opt = make([p], lr=1e-40, weight_decay=0.0)
        with llmkernels.use_cpu_tier(tier):
            p.grad = grad.clone()
            opt.step()
        results.append(p.detach().view(torch.int16))
    for tier, got in zip(tiers[1:], results[1:]):
        assert torch.equal(results[0], got), tier
    return results[0]


def test_every_cpu_tier_rounds_denormal_bf16_parameters_alike():
    """bfloat16 parameters whose updated float32 values are denormal: the AVX512-BF16 tier's
    conversion instruction flushes those, so such vectors must take the rounding path that
    keeps them (as every other tier's conversion does)."""
    base = torch.full((4096,), 3e-39).to(torch.bfloat16)
    base[::7] = 0.0
    base[::11] = 1.0
    got = _bf16_step_on_every_tier(AdamW8bit, base, torch.full((4096,), 1e-30).to(torch.bfloat16))
    assert (got[1:7] != 0).all()  # still denormal, not flushed


@pytest.mark.parametrize("make", [AdamW8bit, llmkernels.optim.AdamW])
@pytest.mark.parametrize("where", [5, 21, 4096 + 7, 4096 + 17])
def test_every_cpu_tier_keeps_a_lone_denormal_bf16_parameter(make, where):
    """One denormal among normal bfloat16 parameters, in the first or the second vector of a
    pair the AVX512-BF16 tier converts together (5, 21), in the lone vector after the pairs
    (4096 + 7) or in the scalar tail (4096 + 17): every tier keeps it, as above."""
    base = torch.ones(4096 + 16 + 3).to(torch.bfloat16)
    base[where] = 3e-39
    got = _bf16_step_on_every_tier(make, base, torch.full(base.shape, 1e-30).to(torch.bfloat16))
    assert got[where] != 0  # still denormal, not flushed


def test_every_cpu_tier_codes_non_finite_moments_alike():
    """NaN and infinite gradients (a step GradScaler would skip) still give the same codes and
    parameters on every tier: the vector code paths map NaN to code 0 through conversions and
    packs whose results must match the scalar code's explicit tests."""
    tiers = llmkernels.backends.supported_cpu_tiers()
    if len(tiers) < 2:
        pytest.skip("one CPU tier here")
    torch.manual_seed(7)
    base = torch.randn(4096)
    g = torch.randn(4096)
    g[5], g[300], g[700] = float("nan"), float("inf"), -float("inf")
    g[1000:1256] = 0
    g2 = torch.randn(4096)
    results = []
    for tier in tiers:
        p = base.clone().requires_grad_()
        opt = AdamW8bit([p])
        with llmkernels.use_cpu_tier(tier):
            for grad in (g, g2):
                p.grad = grad.clone()
                opt.step()
        st = opt.state[p]
        results.append((st["exp_avg_codes"], st["exp_avg_sq_codes"], p.detach().view(torch.int32)))
    for tier, got in zip(tiers[1:], results[1:]):
        for a, b in zip(results[0], got):
            assert torch.equal(a, b), tier


@pytest.mark.parametrize("tier", llmkernels.backends.supported_cpu_tiers())
def test_every_tier_encodes_like_the_reference(tier):
    """One step from zero state: the kernel's moments are then exactly m = (1 - beta1) g and
    v = ((1 - beta2) g) g, so its codes and scales must equal the reference quantizer's (each
    tier estimates square roots its own way, AVX-512 with a 14-bit reciprocal square root;
    the exact correction must make them all agree)."""
    from llmkernels.optim.adam8bit import _quantize_moments
    torch.manual_seed(5)
    n = 64 * 256 + 77
    g = torch.randn(n) * torch.exp(3 * torch.randn(n))
    g[256:512] = 0  # a zero block
    # blocks of tiny moments: 1 / absmax * 127^2 would overflow float32 (normal and denormal
    # values); the max of each still gets code 127
    g[512:768] = torch.randn(256) * 1e-36
    g[768:1024] = torch.randn(256) * 1e-42
    p = torch.zeros(n, requires_grad=True)
    opt = AdamW8bit([p], lr=1e-3, betas=(0.9, 0.999))
    p.grad = g.clone()
    with llmkernels.use_cpu_tier(tier):
        opt.step()
    m = g * (1.0 - 0.9)
    v = (g * (1.0 - 0.999)) * g
    st = opt.state[p]
    ref = {k: torch.zeros_like(st[k]) for k in ("exp_avg_codes", "exp_avg_sq_codes",
                                                "exp_avg_scales", "exp_avg_sq_scales")}
    _quantize_moments(ref, m, v)
    for key, want in ref.items():
        assert torch.equal(st[key], want), key
    assert st["exp_avg_codes"][512:1024].view(2, 256).abs().amax(1).tolist() == [127, 127]


def test_version1_checkpoints_are_converted():
    """A checkpoint of the cube-map format (param groups without codes_version) loads into
    the square-map format: the same moments within a code's width."""
    torch.manual_seed(6)
    p = torch.randn(4096, requires_grad=True)
    opt = AdamW8bit([p])
    p.grad = torch.randn_like(p)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    st = sd["state"][0]
    m = _blocks(torch.randn(4096) * torch.exp(torch.randn(4096)))
    scale = m.abs().amax(1)
    old = torch.floor((m.abs() / scale[:, None]) ** (1 / 3) * 127 + 0.5) * torch.sign(m)
    st["exp_avg_codes"] = old.reshape(-1).to(torch.int8)
    st["exp_avg_scales"] = scale
    del sd["param_groups"][0]["codes_version"]
    opt2 = AdamW8bit([p.detach().clone().requires_grad_()])
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["codes_version"] == 2
    m_old = scale[:, None] * (old / 127) ** 3
    m_new, _ = dequantize_moments(opt2.state[opt2.param_groups[0]["params"][0]])
    # one step of the square map near the top: 2/127 of the scale
    assert ((_blocks(m_new) - m_old).abs().amax(1) / scale).max() <= 1 / 127 + 1e-6
    sd["param_groups"][0]["codes_version"] = 3
    with pytest.raises(ValueError, match="codes_version"):
        AdamW8bit([p.detach().clone().requires_grad_()]).load_state_dict(sd)


def test_loading_never_casts_the_8bit_state_to_the_parameters_dtype(monkeypatch):
    """torch's load_state_dict casts every state tensor to its parameter's dtype, all at once:
    uint8 codes as float32 took 4x the 8-bit state (1 GiB for a 134M-parameter model) before
    being dropped. Only the step goes through torch's cast now; the state loads the same."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, 128))
    opt = AdamW8bit([p])
    p.grad = torch.randn_like(p)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    cast = []
    real = torch.optim.Optimizer._process_value_according_to_param_policy

    def spy(param, value, param_id, param_groups, key=None):
        cast.append(key)
        return real(param, value, param_id, param_groups, key)
    monkeypatch.setattr(torch.optim.Optimizer, "_process_value_according_to_param_policy",
                        staticmethod(spy))
    fresh = AdamW8bit([torch.nn.Parameter(p.detach().clone())])
    fresh.load_state_dict(saved)
    assert cast == ["step"]
    for key, value in opt.state[p].items():
        got = fresh.state[fresh.param_groups[0]["params"][0]][key]
        assert got.dtype == value.dtype and torch.equal(got, value), key
        if key != "step":  # (torch's own cast keeps a CPU step as it is)
            assert got.data_ptr() != saved["state"][0][key].data_ptr()  # a copy
