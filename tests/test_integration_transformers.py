"""llmkernels.patch on Hugging Face transformers models (tiny random Llama / Mistral / Gemma 2
built from configs: nothing is downloaded): logits, greedy generation through the KV-cache
kernel, training, quantized generation, torch.compile, unpatch and bad configurations."""
import importlib

import pytest
import torch

import llmkernels
from llmkernels.integrations import transformers as lt

transformers = pytest.importorskip("transformers")
from transformers import (GenerationConfig, LlamaConfig, LlamaForCausalLM,  # noqa: E402
                          MistralConfig, MistralForCausalLM)

VOCAB = 128


def tiny(cls=LlamaForCausalLM, config_cls=LlamaConfig, seed=0, **extra):
    torch.manual_seed(seed)
    cfg = config_cls(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     max_position_embeddings=256, attn_implementation="sdpa", **extra)
    return cls(cfg).eval()


def prompt(batch=1, length=11, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def greedy(model, ids, n=20):
    config = GenerationConfig(max_new_tokens=n, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        return model.generate(ids, generation_config=config)


@pytest.fixture
def kvcache_calls(monkeypatch):
    """Counts the decoding steps that reach the KV-cache kernel: (B, L, Hq, D) of each query,
    through attention_with_kvcache or, on the CPU, decode_step_cpu's direct call (which serves
    every plain CPU step: it is asserted not to hand any back)."""
    kv = importlib.import_module("llmkernels.ops.attention_kvcache")
    calls = []
    real, step = llmkernels.attention_with_kvcache, kv.decode_step_cpu

    def direct(q4, *a, **k):
        out = step(q4, *a, **k)
        assert out is not None or q4.device.type != "cpu", "a plain CPU step left the fast path"
        if out is not None:
            calls.append(q4.transpose(1, 2).shape)
        return out
    monkeypatch.setattr(llmkernels, "attention_with_kvcache",
                        lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    monkeypatch.setattr(kv, "decode_step_cpu", direct)
    return calls


def test_patched_logits_match_sdpa():
    model = tiny()
    ids = prompt(batch=2, length=37)
    with torch.no_grad():
        expected = model(ids).logits
        report = llmkernels.patch(model)
        got = model(ids).logits
    assert model.config._attn_implementation == "llmkernels"
    assert "'sdpa' -> 'llmkernels'" in str(report)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_padded_batch_matches_sdpa():
    """A left-padded batch: the mask comes from transformers (padding + causal)."""
    model = tiny()
    ids = prompt(batch=2, length=16)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        llmkernels.patch(model)
        got = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[0, 5:], expected[0, 5:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-5)


def test_greedy_generation_is_identical_and_decodes_through_the_kvcache_kernel(kvcache_calls):
    model = tiny()
    ids = prompt()
    expected = greedy(model, ids)
    llmkernels.patch(model)
    got = greedy(model, ids)
    assert torch.equal(got, expected)
    # every new token after the first: one call per layer, one query token each
    assert len(kvcache_calls) == 19 * model.config.num_hidden_layers
    assert all(shape[1] == 1 for shape in kvcache_calls)


def test_left_padded_batch_generation_is_identical():
    """Padded decoding steps carry a mask: they take the masked attention, not the KV-cache
    kernel, and still give SDPA's tokens."""
    model = tiny()
    ids = prompt(batch=2, length=12)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    config = GenerationConfig(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, generation_config=config)
        llmkernels.patch(model)
        got = model.generate(ids, attention_mask=mask, generation_config=config)
    assert torch.equal(got, expected)


def test_sliding_window_model_matches_sdpa():
    """Mistral with a window shorter than the sequence: transformers puts the window in the
    mask, prefill and decoding alike."""
    model = tiny(MistralForCausalLM, MistralConfig, sliding_window=8)
    ids = prompt(length=23)
    with torch.no_grad():
        expected_logits = model(ids).logits
    expected = greedy(model, ids)
    llmkernels.patch(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(greedy(model, ids), expected)


def test_softcap_model_matches_eager():
    """Gemma 2's soft-capped scores (SDPA cannot take them): ours against transformers' eager
    attention."""
    from transformers import Gemma2Config, Gemma2ForCausalLM
    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=16, max_position_embeddings=256, sliding_window=8,
                       attn_logit_softcapping=5.0, final_logit_softcapping=None,
                       attn_implementation="eager")
    model = Gemma2ForCausalLM(cfg).eval()
    ids = prompt(length=19)
    with torch.no_grad():
        expected = model(ids).logits
        llmkernels.patch(model)
        got = model(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_training_losses_match_over_20_steps():
    def losses(patched):
        model = tiny(seed=3).train()
        if patched:
            llmkernels.patch(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        out = []
        for step in range(20):
            ids = prompt(batch=2, length=24, seed=100 + step)
            loss = model(ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            out.append(loss.item())
        return out
    expected, got = losses(False), losses(True)
    assert expected[-1] < expected[0]  # it trains
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("scheme", ["int8", "int4", "w8a8"])
def test_quantized_generation_stays_close(scheme):
    model = tiny()
    ids = prompt(batch=1, length=16)
    with torch.no_grad():
        expected = model(ids).logits
    report = llmkernels.patch(model, quantize=scheme, group_size=32)
    names = [name for name, _, _ in report.quantize.replaced]
    assert "lm_head" in names and len(names) == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer
    with torch.no_grad():
        got = model(ids).logits
    cos = torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0)
    assert cos > (0.99 if scheme != "int4" else 0.95), cos
    agreement = (got.argmax(-1) == expected.argmax(-1)).float().mean().item()
    print(f"{scheme}: next-token agreement with float {agreement:.2f}, logit cosine {cos:.4f}")
    assert agreement >= 0.5
    assert greedy(model, ids).shape == (1, 16 + 20)


def test_tied_output_embedding_stays_float():
    model = tiny(tie_word_embeddings=True)
    report = llmkernels.patch(model, quantize="int8")
    assert "lm_head" not in [name for name, _, _ in report.quantize.replaced]
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_compile_fullgraph():
    model = tiny()
    ids = prompt(batch=2, length=16)
    with torch.no_grad():
        expected = model(ids).logits
    llmkernels.patch(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        got = compiled(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_compile_inductor_with_quantized_linears():
    """The default backend (inductor) over our attention and quant_matmul custom ops, for
    inference and a training step."""
    model = tiny()
    ids = prompt(batch=2, length=16)
    llmkernels.patch(model, quantize="int8")
    with torch.no_grad():
        expected = model(ids).logits
        got = torch.compile(model, fullgraph=True)(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    model.train()
    loss = torch.compile(model, fullgraph=True)(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and model.model.norm.weight.grad is not None


def test_unpatch_restores_sdpa_and_dequantizes():
    model = tiny()
    ids = prompt(length=12)
    llmkernels.patch(model, quantize="int8")
    with torch.no_grad():
        patched = model(ids).logits
    report = llmkernels.unpatch(model)
    assert model.config._attn_implementation == "sdpa"
    assert len(report.restored_linears) == 15
    assert not any(isinstance(m, llmkernels.nn.QuantLinear) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, patched, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="not patched"):
        llmkernels.unpatch(model)


def test_from_config_with_registered_name():
    name = lt.register()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    model = LlamaForCausalLM._from_config(cfg, attn_implementation=name).eval()
    assert model.config._attn_implementation == "llmkernels"
    with torch.no_grad():
        got = model(prompt()).logits
        model.set_attn_implementation("sdpa")
        torch.testing.assert_close(got, model(prompt()).logits, rtol=1e-5, atol=1e-5)


def test_bad_configurations():
    model = tiny()
    with pytest.raises(ValueError, match="quantize must be None or one of"):
        llmkernels.patch(model, quantize="int3")
    assert model.config._attn_implementation == "sdpa"  # nothing changed
    model._supports_attention_backend = False  # as models with their own attention code
    with pytest.raises(ValueError, match="attention registry"):
        llmkernels.patch(model)
    report = llmkernels.patch(model, attention=False, quantize="int8")
    assert report.attention == [] and report.quantize is not None


def test_position_bias_is_refused():
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(NotImplementedError, match="position_bias"):
        lt.attention_forward(torch.nn.Module(), q, q, q, None, position_bias=torch.zeros(1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_patched_model_follows_sdpa(dtype, kvcache_calls):
    """On a GPU (Triton kernels): logits close to SDPA's (float32 dots may run as TF32 on both
    sides), and generation decodes through the KV-cache kernel."""
    model = tiny().to("cuda", dtype)
    ids = prompt(batch=2, length=40).cuda()
    with torch.no_grad():
        expected = model(ids).logits.float()
        llmkernels.patch(model)
        got = model(ids).logits.float()
    tol = 2e-2 if dtype == torch.float32 else 1e-1
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    out = greedy(model, ids[:1], n=8)
    assert out.shape == (1, 48) and len(kvcache_calls) == 7 * model.config.num_hidden_layers


def test_whole_patched_model_pickled_runs_in_a_new_process(tmp_path):
    """torch.save of the whole patched model, torch.load in a process that never imported
    llmkernels: unpickling registers our attention with transformers again."""
    import subprocess
    import sys
    model = tiny()
    llmkernels.patch(model)
    ids = prompt()
    with torch.no_grad():
        expected = model(ids).logits
    torch.save({"model": model, "ids": ids, "expected": expected}, tmp_path / "m.pt")
    code = ("import torch; d = torch.load(r'%s', weights_only=False); m = d['model']\n"
            "with torch.no_grad(): out = m(d['ids']).logits\n"
            "torch.testing.assert_close(out, d['expected']); print('ok')" % (tmp_path / "m.pt"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


def _tiny_from(config_name: str, model_name: str, **fields):
    config_cls = getattr(transformers, config_name, None)
    if config_cls is None:
        pytest.skip(f"this transformers has no {config_name}")
    torch.manual_seed(0)
    return getattr(transformers, model_name)(config_cls(**fields)).eval()


def _gpt_oss():
    return _tiny_from("GptOssConfig", "GptOssForCausalLM", vocab_size=VOCAB, hidden_size=64,
                      intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, num_local_experts=4,
                      num_experts_per_tok=2, sliding_window=8)


def _deepseek_v32():
    return _tiny_from("DeepseekV32Config", "DeepseekV32ForCausalLM", vocab_size=VOCAB,
                      hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                      n_shared_experts=1, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
                      topk_group=1, kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=8,
                      v_head_dim=16, qk_nope_head_dim=16, index_topk=4, index_head_dim=16,
                      index_n_heads=2, first_k_dense_replace=1, max_position_embeddings=128)


@pytest.mark.parametrize("build,why", [(_gpt_oss, "sinks"), (_deepseek_v32, "top-k keys")])
def test_attention_that_is_not_sdpas_is_refused_with_nothing_changed(build, why):
    """Attention sinks (GPT-OSS) and indexer-picked sparse keys (DeepSeek-V3.2): patch used to
    accept them; the sparse model then ran dense attention (its logits differed from sdpa's
    from the fifth token on), the sinks model raised at every forward."""
    model = build()
    before = model.config._attn_implementation
    with pytest.raises(ValueError, match=why):
        llmkernels.patch(model, quantize="int8")
    assert model.config._attn_implementation == before
    assert not any(isinstance(m, llmkernels.nn.QuantLinear) for m in model.modules())


@pytest.mark.parametrize("key", ["indices", "block_indices", "sinks", "s_aux", "topk_mask"])
def test_attention_function_refuses_tensor_inputs_it_would_not_read(key):
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(NotImplementedError, match=key):
        lt.attention_forward(torch.nn.Module(), q, q, q, None, **{key: torch.zeros(1, 3, 2)})


def test_attention_function_reads_past_position_inputs():
    """Positions and packed-sequence offsets: the mask already holds what they imply
    (token_type_ids, which collators pass along, mean nothing to attention)."""
    q = torch.randn(1, 2, 3, 8)
    expected, _ = lt.attention_forward(torch.nn.Module(), q, q, q, None)
    got, _ = lt.attention_forward(torch.nn.Module(), q, q, q, None,
                                  position_ids=torch.arange(3)[None],
                                  cache_position=torch.arange(3), use_cache=True,
                                  cu_seq_lens_q=torch.tensor([0, 3]), max_length_q=3,
                                  token_type_ids=torch.zeros(1, 3, dtype=torch.long))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_output_attentions_warns_that_none_come_back():
    q = torch.randn(1, 2, 3, 8)
    with pytest.warns(UserWarning, match="attention weights"):
        lt.attention_forward(torch.nn.Module(), q, q, q, None, output_attentions=True)


def test_unpatch_gives_each_submodel_its_own_implementation_back():
    """A composite model (vision tower eager, language model sdpa): unpatch used to set the
    top-level name everywhere, so the vision tower came back as sdpa."""
    cfg_cls = getattr(transformers, "LlavaConfig", None)
    if cfg_cls is None:
        pytest.skip("this transformers has no Llava")
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=1, num_attention_heads=2,
                                           image_size=16, patch_size=8, projection_dim=32)
    text = LlamaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=128, vocab_size=120)
    cfg = cfg_cls(vision_config=vision, text_config=text, image_token_index=110,
                  vision_feature_layer=-1, image_seq_length=4)
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration._from_config(
        cfg, attn_implementation={"": "sdpa", "text_config": "sdpa", "vision_config": "eager"})

    def names(m):
        return (m.config._attn_implementation, m.config.text_config._attn_implementation,
                m.config.vision_config._attn_implementation)
    assert names(model) == ("sdpa", "sdpa", "eager")
    llmkernels.patch(model)
    assert names(model) == ("llmkernels",) * 3
    llmkernels.unpatch(model)
    assert names(model) == ("sdpa", "sdpa", "eager")


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_save_pretrained_of_a_quantized_model_loads_back(scheme, tmp_path):
    """save_pretrained used to fail inside huggingface_hub ('dict' object has no attribute
    'device'): QuantLinear's format record was a dict, which safetensors cannot hold."""
    safetensors = pytest.importorskip("safetensors.torch")
    model = tiny()
    llmkernels.quantize_(model, scheme, group_size=32)
    model.save_pretrained(tmp_path)
    loaded = {}
    for f in sorted(tmp_path.glob("*.safetensors")):
        loaded.update(safetensors.load_file(f))
    fresh = tiny(seed=5)
    llmkernels.quantize_(fresh, scheme, group_size=32)
    fresh.load_state_dict(loaded, strict=False)  # (save_pretrained may drop tied copies)
    ids = prompt()
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_quantize_leaves_what_the_model_keeps_in_float32():
    """T5 keeps 'wo' in float32 and its feed-forward reads wo.weight: quantizing it made every
    forward raise AttributeError."""
    model = _tiny_from("T5Config", "T5ForConditionalGeneration", vocab_size=VOCAB, d_model=64,
                       d_kv=16, d_ff=128, num_layers=1, num_decoder_layers=1, num_heads=4)
    report = llmkernels.quantize_(model, "int8")
    kept = {name for name, why in report.skipped if "_keep_in_fp32_modules" in why}
    assert kept and all(name.endswith(".wo") for name in kept)
    assert any(name.endswith(".wi") for name, _, _ in report.replaced)
    ids = prompt(length=6)
    with torch.no_grad():
        out = model(input_ids=ids, decoder_input_ids=ids).logits
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("scheme", ["int8", "int4", "w8a8"])
def test_quantize_takes_gpt2s_conv1d_projections(scheme):
    """GPT-2's projections are transformers' Conv1D (x @ W + b, W stored (in, out)): they
    stayed float, so quantize_(gpt2) quantized nothing (its lm_head is tied)."""
    def gpt2():
        return _tiny_from("GPT2Config", "GPT2LMHeadModel", vocab_size=VOCAB, n_embd=128,
                          n_layer=1, n_head=4, n_positions=64).eval()
    model = gpt2()
    ids = prompt(batch=2, length=9)
    with torch.no_grad():
        expected = model(ids).logits
    convs = {name: m for name, m in model.named_modules() if type(m).__name__ == "Conv1D"}
    report = llmkernels.quantize_(model, scheme, group_size=64)
    assert sorted(name for name, _, _ in report.replaced) == sorted(convs)
    assert [name for name, _ in report.skipped] == ["lm_head"]  # tied to the embedding
    for name, conv in convs.items():  # the same weight as an nn.Linear holding W^T
        linear = torch.nn.Linear(conv.nx, conv.nf)
        with torch.no_grad():
            linear.weight.copy_(conv.weight.t())
            linear.bias.copy_(conv.bias)
        twin = llmkernels.nn.QuantLinear.from_linear(linear, scheme, 64)
        layer = model.get_submodule(name)
        assert torch.equal(layer.qdata, twin.qdata) and torch.equal(layer.bias, twin.bias)
        x = torch.randn(3, conv.nx)
        torch.testing.assert_close(layer(x), conv(x), rtol=0.1, atol=0.1 if scheme == "int4" else 0.02)
    with torch.no_grad():
        got = model(ids).logits
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9
    fresh = gpt2()
    llmkernels.quantize_(fresh, scheme, group_size=64)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, got, rtol=0, atol=0)


def test_unpatch_gives_gpt2_its_conv1d_projections_back():
    """unpatch rebuilt GPT-2's quantized Conv1D projections as nn.Linear holding W^T: another
    module type, and a state_dict a fresh GPT-2 refused (c_attn.weight (192, 64), not (64, 192);
    the square attn.c_proj loaded silently transposed)."""
    model = _tiny_from("GPT2Config", "GPT2LMHeadModel", vocab_size=VOCAB, n_embd=64, n_layer=1,
                       n_head=4, n_positions=64)
    before = {k: v.shape for k, v in model.state_dict().items()}
    kinds = {name: type(m) for name, m in model.named_modules()}
    llmkernels.patch(model, attention=False, quantize="int8")
    ids = prompt(length=7)
    with torch.no_grad():
        quantized = model(ids).logits
    llmkernels.unpatch(model)
    assert {name: type(m) for name, m in model.named_modules()} == kinds
    assert {k: v.shape for k, v in model.state_dict().items()} == before
    with torch.no_grad():  # the dequantized weights: the quantized model's outputs
        torch.testing.assert_close(model(ids).logits, quantized, rtol=1e-5, atol=1e-5)


def test_quantize_asks_filter_fn_about_conv1d_too():
    gpt2 = _tiny_from("GPT2Config", "GPT2LMHeadModel", vocab_size=VOCAB, n_embd=64, n_layer=1,
                      n_head=4, n_positions=64)
    asked = []
    report = llmkernels.quantize_(gpt2, "int8",
                                  filter_fn=lambda m, name: asked.append(name) or "mlp" in name)
    assert {"transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc"} <= set(asked)
    assert sorted(n for n, _, _ in report.replaced) == ["transformer.h.0.mlp.c_fc",
                                                         "transformer.h.0.mlp.c_proj"]


def test_quantize_lists_a_conv1d_it_does_not_know():
    """A module named Conv1D outside transformers (its forward unknown) stays float, listed."""
    Conv1D = type("Conv1D", (torch.nn.Module,), {})
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), Conv1D())
    model[1].nf, model[1].weight = 64, torch.nn.Parameter(torch.zeros(64, 64))
    report = llmkernels.quantize_(model, "int8")
    assert [name for name, _, _ in report.replaced] == ["0"]
    assert [name for name, why in report.skipped if "not transformers'" in why] == ["1"]


def test_quantize_lists_weight_matrices_it_does_not_take():
    """Mixtral's stacked experts stayed float without a word."""
    mixtral = _tiny_from("MixtralConfig", "MixtralForCausalLM", vocab_size=VOCAB,
                         hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, num_local_experts=4)
    held = [m for m in mixtral.modules() if not isinstance(m, torch.nn.Linear)
            and any(p.dim() == 3 for p in m.parameters(recurse=False))]
    report = llmkernels.quantize_(mixtral, "int8")
    stacked = [name for name, why in report.skipped if "stacked" in why]
    assert len(stacked) == len(held)
    vit = _tiny_from("ViTConfig", "ViTModel", hidden_size=32, num_hidden_layers=1,
                     num_attention_heads=2, intermediate_size=64, image_size=16, patch_size=8)
    report = llmkernels.quantize_(vit, "int8")  # its (1, n, d) position embeddings: no experts
    assert not [name for name, why in report.skipped if "stacked" in why]


def test_explain_on_a_patched_model_says_how_to_ask():
    model = tiny()
    llmkernels.patch(model)
    for module in (model, model.model.layers[0].self_attn):
        with pytest.raises(TypeError, match="scaled_dot_product_attention, q, k, v"):
            llmkernels.explain(module, torch.randn(1, 5, 64))
    with pytest.raises(TypeError, match="does not run llmkernels ops"):  # not attention
        llmkernels.explain(model.model.layers[0].mlp, torch.randn(1, 5, 64))
