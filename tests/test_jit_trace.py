"""torch.jit.trace records only what reaches the dispatcher. The CPU ops' fast paths call the
kernel straight from Python to write into a fresh tensor: traced that way, a graph would
replay the empty tensor (uninitialized memory) for any input. Every op must take its custom
op while tracing."""
import warnings

import pytest
import torch

import llmkernels

SCHEMES = ["int8", "int4", "w8a8"]


def trace_and_replay(fn, first, second):
    """fn traced on `first`, run on `second`: (the trace's output, fn's own output)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(fn, first, check_trace=False)
        return traced(*second), fn(*second)


def qkv(seed, B=1, H=2, L=7, S=7, D=16):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, L, D, generator=g), torch.randn(B, H, S, D, generator=g),
            torch.randn(B, H, S, D, generator=g))


def test_scaled_dot_product_attention():
    def fn(q, k, v):
        return llmkernels.scaled_dot_product_attention(q, k, v, is_causal=True)
    got, want = trace_and_replay(fn, qkv(0), qkv(1))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_attention_varlen():
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)

    def fn(q, k, v):
        return llmkernels.attention_varlen(q, k, v, cu, cu, 5, 5, is_causal=True)

    def inputs(seed):
        return tuple(t[0].transpose(0, 1).contiguous() for t in qkv(seed, L=8, S=8))
    got, want = trace_and_replay(fn, inputs(0), inputs(1))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_attention_with_kvcache():
    def fn(q, k_cache, v_cache):
        return llmkernels.attention_with_kvcache(q, k_cache, v_cache, 9)

    def inputs(seed):
        q, k, v = qkv(seed, B=2, L=1, S=12)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    got, want = trace_and_replay(fn, inputs(0), inputs(1))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_transformers_decoding_step():
    """A decoding step of the transformers integration (its direct call to the kernel)."""
    from llmkernels.integrations.transformers import attention_forward

    def fn(q, k, v):
        return attention_forward(torch.nn.Module(), q, k, v, None)[0]
    got, want = trace_and_replay(fn, qkv(0, H=4, L=1, S=12), qkv(1, H=4, L=1, S=12))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # the next step's cache is one longer: the trace follows it, as torch's SDPA's does
    got, want = trace_and_replay(fn, qkv(0, H=4, L=1, S=12), qkv(1, H=4, L=1, S=13))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_matmul_and_quant_linear(scheme, dtype):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 40).to(dtype)
    layer = llmkernels.nn.QuantLinear.from_linear(linear, scheme, group_size=32)
    qw = llmkernels.quantize_weight(linear.weight.detach().float(), scheme, 32)
    first, second = torch.randn(3, 64, dtype=dtype), torch.randn(3, 64, dtype=dtype)
    for fn in (layer, lambda x: llmkernels.quant_matmul(x, qw)):
        got, want = trace_and_replay(fn, (first,), (second,))
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_patched_transformer_encoder_passes_the_trace_check(quantize):
    """torch.jit.trace's own check (a second trace must give the same graph) passes, and the
    trace replays other inputs as the model computes them."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
    model = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    llmkernels.patch(model, quantize=quantize)
    first, second = torch.randn(2, 9, 64), torch.randn(2, 9, 64)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, (first,))
        torch.testing.assert_close(traced(second), model(second), rtol=0, atol=0)


@pytest.mark.parametrize("quantize", [None, "int4"])
def test_patched_transformers_model_passes_the_trace_check(quantize):
    transformers = pytest.importorskip("transformers")

    class Logits(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, ids):
            return self.model(ids, use_cache=False, return_dict=False)[0]

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        attn_implementation="sdpa", torchscript=True)
    model = transformers.LlamaForCausalLM(config).eval()
    llmkernels.patch(model, quantize=quantize)
    logits = Logits(model).eval()
    first, second = torch.randint(0, 100, (1, 11)), torch.randint(0, 100, (1, 11))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(logits, (first,))
        torch.testing.assert_close(traced(second), logits(second), rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (benchmarks/gpu_check.sh)")
def test_gpu_paths_are_traced():
    def fn(q, k, v):
        return llmkernels.scaled_dot_product_attention(q, k, v, is_causal=True)
    cuda = lambda ts: tuple(t.cuda().half() for t in ts)  # noqa: E731
    got, want = trace_and_replay(fn, cuda(qkv(0)), cuda(qkv(1)))
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)  # (split-K sums may reorder)
    qw = llmkernels.quantize_weight(torch.randn(40, 64), "int4", 32).to("cuda")
    x1, x2 = (torch.randn(3, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    got, want = trace_and_replay(lambda x: llmkernels.quant_matmul(x, qw), (x1,), (x2,))
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
