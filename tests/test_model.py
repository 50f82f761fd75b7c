"""align.model: the HF-native decoder (tiny configs, CPU)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

import align  # noqa: F401  (registers the Auto classes)
from align.convert import to_llama
from align.model import DecoderConfig, DecoderForCausalLM, DecoderForSequenceClassification, DecoderModel
from align.model.rope import RotaryEmbedding, apply_rotary_pos_emb

V = 64


def tiny(**overrides) -> DecoderConfig:
    kwargs = dict(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return DecoderConfig(**{**kwargs, **overrides})


def lm(**overrides) -> DecoderForCausalLM:
    torch.manual_seed(0)
    return DecoderForCausalLM(tiny(**overrides)).eval()


def ids(B=2, T=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, V, (B, T), generator=g)


# ------------------------------------------------------------------------------------ config


def test_config_derives_llama_intermediate_size_and_defaults():
    c = DecoderConfig(hidden_size=4096, num_attention_heads=32, multiple_of=256)
    assert c.intermediate_size == 11008  # LLaMA-7B
    assert c.num_key_value_heads == 32 and c.head_dim == 128
    assert c.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}
    assert DecoderConfig.auto_map == {} and c.model_type == "align_decoder"


def test_config_accepts_legacy_rope_kwargs():
    c = tiny(rope_theta=500000.0, rope_scaling={"rope_type": "linear", "factor": 2.0})
    assert c.rope_parameters == {"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0}
    assert c.rope_theta == 500000.0


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(hidden_size=30), "hidden_size"),
        (dict(num_key_value_heads=3), "num_key_value_heads"),
        (dict(num_experts=4, num_experts_per_tok=5), "num_experts_per_tok"),
        (dict(rope_parameters={"rope_type": "ntk-by-parts", "factor": 2.0}), "rope_type"),
        (dict(rope_parameters={"rope_type": "linear"}), "factor"),
        (dict(num_hidden_layers=0), "num_hidden_layers"),
        (dict(num_experts=4, expert_capacity_factor=0.0), "expert_capacity_factor"),
        (dict(hidden_act="gelu"), "hidden_act"),
    ],
)
def test_bad_config_raises_value_error_naming_field(overrides, field):
    with pytest.raises(ValueError, match=field) as err:
        tiny(**overrides)
    value = overrides.get(field, overrides.get("rope_parameters", {}).get(field))
    if value is not None:
        assert repr(value) in str(err.value) or str(value) in str(err.value)


# ------------------------------------------------------------------------------------ structure


def test_module_names_follow_llama():
    names = {n for n, _ in lm().named_parameters()}
    for name in (
        "model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.o_proj.weight",
        "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight", "model.norm.weight",
    ):
        assert name in names, name


def test_tied_embeddings():
    m = lm()
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert m.get_input_embeddings() is m.model.embed_tokens and m.get_output_embeddings() is m.lm_head
    untied = lm(tie_word_embeddings=False)
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight


def test_init_std_scales_residual_projections():
    torch.manual_seed(0)
    c = tiny(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, initializer_range=0.02)
    m = DecoderForCausalLM(c)
    scaled = 0.02 / math.sqrt(2 * 4)
    layer = m.model.layers[2]
    for w, std in [
        (m.model.embed_tokens.weight[1:], 0.02), (layer.self_attn.q_proj.weight, 0.02),
        (layer.mlp.up_proj.weight, 0.02), (layer.self_attn.o_proj.weight, scaled), (layer.mlp.down_proj.weight, scaled),
    ]:
        assert w.std().item() == pytest.approx(std, rel=0.05)
        assert abs(w.mean().item()) < std / 10
    assert torch.equal(layer.input_layernorm.weight, torch.ones(256))
    assert torch.equal(m.model.embed_tokens.weight[0], torch.zeros(256))  # padding_idx row, like Llama


def test_backbone_returns_last_hidden_state_and_accepts_both_cache_kwargs():
    m = lm()
    x = ids()
    out = m.model(input_ids=x, use_cache=True)
    assert out.last_hidden_state.shape == (2, 8, 32) and out.cache.get_seq_length() == 8
    nxt = ids(T=1, seed=2)
    a = m(nxt, cache=out.cache, attention_mask=torch.ones(2, 9)).logits
    out2 = m.model(input_ids=x, use_cache=True)
    b = m(nxt, past_key_values=out2.cache, attention_mask=torch.ones(2, 9)).logits
    full = m(torch.cat([x, nxt], 1)).logits[:, -1:]
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, full, atol=1e-5, rtol=1e-5)
    assert m(x, return_dict=False)[0].shape == (2, 8, V)
    assert m.model(x, return_dict=False)[0].shape == (2, 8, 32)


# ------------------------------------------------------------------------------------ RoPE


def test_rope_preserves_norms_and_depends_only_on_offset():
    c = tiny(hidden_size=64, num_attention_heads=2, num_key_value_heads=2)
    rope = RotaryEmbedding(c)
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 32), torch.randn(1, 1, 1, 32)

    def rotated(m, n):
        cos_m, sin_m = rope(q, torch.tensor([[m]]))
        cos_n, sin_n = rope(q, torch.tensor([[n]]))
        qm, _ = apply_rotary_pos_emb(q, q, cos_m, sin_m)
        _, kn = apply_rotary_pos_emb(k, k, cos_n, sin_n)
        return qm, kn

    qm, kn = rotated(5, 2)
    torch.testing.assert_close(qm.norm(), q.norm())
    torch.testing.assert_close(kn.norm(), k.norm())
    dot = (qm * kn).sum()
    for shift in (1, 17, 40):
        qs, ks = rotated(5 + shift, 2 + shift)
        torch.testing.assert_close((qs * ks).sum(), dot, atol=1e-5, rtol=1e-5)
    qa, kb = rotated(9, 2)
    assert not torch.allclose((qa * kb).sum(), dot)  # a different offset gives a different score


def test_rope_angles_are_one_op_under_compile():
    """Compiled, cos/sin come from one opaque op, computed once for all layers (Inductor would recompute the trig
    in every layer's rotation), and the model computes what it does eagerly: loss, logits and every gradient."""
    m, x = lm().train(), ids(T=12)
    eager = m(input_ids=x, labels=x)
    eager.loss.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    out = torch.compile(m, backend=backend, fullgraph=True)(input_ids=x, labels=x)
    out.loss.backward()
    ops = [n for g in graphs for n in g.graph.nodes if "rope_cos_sin" in str(n.target)]
    assert len(ops) == 1
    torch.testing.assert_close(out.logits, eager.logits)
    for name, p in m.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], msg=name)


def test_training_with_labels_returns_detached_logits_and_compiles_without_a_logits_gradient():
    """With labels in training the loss is what trains: the logits come back detached, so a compiled step's backward
    takes no (B, T, V) zero gradient for them. Without labels, or in eval, the logits are the differentiable output."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    m, x = lm().train(), ids(T=12)
    out = m(input_ids=x, labels=x)
    assert out.loss.requires_grad and not out.logits.requires_grad
    assert m(input_ids=x).logits.requires_grad
    tangents = []

    def backward(gm, example_inputs):
        tangents.extend(n.meta["val"].shape for n in gm.graph.nodes if n.op == "placeholder" and "tangent" in n.name)
        return make_boxed_func(gm.forward)

    forward = lambda gm, _: make_boxed_func(gm.forward)  # noqa: E731
    compiled = torch.compile(m, backend=aot_autograd(fw_compiler=forward, bw_compiler=backward))
    compiled(input_ids=x, labels=x).loss.backward()
    assert tangents and (2, 12, V) not in [tuple(t) for t in tangents]


@pytest.mark.parametrize(
    "rope, T",
    [
        ({"rope_type": "linear", "factor": 2.0}, 24),
        ({"rope_type": "dynamic", "factor": 2.0}, 40),  # longer than max_position_embeddings=16
        ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 16.0}, 40),
        ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8}, 24),
    ],
)
def test_rope_scaling_matches_hf_llama(rope, T):
    m = lm(max_position_embeddings=16, rope_parameters={**rope, "rope_theta": 10000.0})
    ref = to_llama(m)
    assert ref.config.rope_parameters == m.config.rope_parameters
    for length in (T, 8, T + 3):  # grow, shrink (dynamic resets), grow again
        x = ids(T=length)
        torch.testing.assert_close(m(x).logits, ref(x).logits, atol=1e-5, rtol=0)
    if rope["rope_type"] == "dynamic":  # long generation through the dynamic frequency update
        prompt = ids(B=1, T=10)
        a = m.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
        b = ref.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------ attention / generation


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_gqa_matches_llama_and_cache(kv_heads):
    m = lm(num_key_value_heads=kv_heads)
    assert m.model.layers[0].self_attn.k_proj.weight.shape == (kv_heads * 8, 32)
    x = ids()
    torch.testing.assert_close(m(x).logits, to_llama(m)(x).logits, atol=1e-5, rtol=0)
    a = m.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False, use_cache=True)
    b = m.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(a, b)


def test_cached_and_uncached_greedy_generation_identical():
    m = lm(eos_token_id=None)
    x = ids(B=3, T=5)
    kw = dict(attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False)
    a = m.generate(x, use_cache=True, **kw)
    b = m.generate(x, use_cache=False, **kw)
    assert a.shape == (3, 17) and torch.equal(a, b)


def test_left_padded_batch_generation_equals_one_by_one():
    m = lm(eos_token_id=None)
    prompts = [ids(B=1, T=t, seed=t)[0] for t in (3, 7, 5)]
    T = max(len(p) for p in prompts)
    batch = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, p in enumerate(prompts):
        batch[i, T - len(p):], mask[i, T - len(p):] = p, 1
    out = m.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    for i, p in enumerate(prompts):
        single = m.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long),
                            max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert torch.equal(out[i, T:], single[0, len(p):]), i
    # the padded forward gives the same logits at real positions
    full = m(batch, attention_mask=mask).logits
    alone = m(prompts[0][None]).logits
    torch.testing.assert_close(full[0, T - 3:], alone[0], atol=1e-5, rtol=1e-5)


def test_no_query_row_is_fully_masked():
    """Left-pad queries see every key, not none: cuDNN's SDPA backward returns NaN for a row that sees nothing
    (found with bf16 GRPO on an H200). Real rows keep their mask, and their logits and gradients are those of
    the unpadded sequence."""
    m = lm().train()
    seen = []
    m.model.layers[0].self_attn.register_forward_pre_hook(lambda mod, args: seen.append(args[2]))
    x = ids(B=2, T=6)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    out = m(x, attention_mask=mask).logits
    attn = seen[0]  # (B, 1, T, S) bool
    assert attn.any(-1).all(), "a query row with no key to attend to"
    assert attn[0, 0, 0].all() and not attn[0, 0, 3, :3].any()  # pad row: all keys; real row: no pads
    out[0, 3:].sum().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    alone = m(x[:1, 3:]).logits
    torch.testing.assert_close(out[0, 3:], alone[0], atol=1e-5, rtol=1e-5)
    alone.sum().backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)


def test_sampling_and_stop_ids():
    m = lm(eos_token_id=None)
    x = ids(B=2, T=4)
    mask = torch.ones_like(x)
    torch.manual_seed(0)
    a = m.generate(x, attention_mask=mask, do_sample=True, temperature=0.7, top_k=10, top_p=0.9, max_new_tokens=10)
    torch.manual_seed(0)
    b = m.generate(x, attention_mask=mask, do_sample=True, temperature=0.7, top_k=10, top_p=0.9, max_new_tokens=10)
    assert a.shape == (2, 14) and torch.equal(a, b)
    # top_k=1 sampling is greedy
    greedy = m.generate(x, attention_mask=mask, do_sample=False, max_new_tokens=10)
    assert torch.equal(m.generate(x, attention_mask=mask, do_sample=True, top_k=1, max_new_tokens=10), greedy)
    # stop on any of several eos ids: row 0 stops at its 3rd greedy token, the rest is padding
    stop = int(greedy[0, 6])
    out = m.generate(x, attention_mask=mask, do_sample=False, max_new_tokens=10, eos_token_id=[stop, 63],
                     pad_token_id=0)
    first = (greedy[0, 4:] == stop).nonzero()[0].item()
    assert out[0, 4 + first].item() == stop and (out[0, 5 + first:] == 0).all()


# ------------------------------------------------------------------------------------ training


def test_loss_ignores_minus_100_and_matches_manual():
    m = lm()
    x = ids()
    labels = x.clone()
    labels[:, :3] = -100
    out = m(x, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, V)
    manual = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, manual)
    assert out.aux_loss is None and out.dropped_tokens is None
    # num_items_in_batch (Trainer gradient accumulation) switches to sum / n
    n = (labels[:, 1:] != -100).sum()
    torch.testing.assert_close(m(x, labels=labels, num_items_in_batch=n * 2).loss, manual / 2)


def test_overfits_one_batch():
    torch.manual_seed(0)
    m = DecoderForCausalLM(tiny()).train()
    x = ids(B=4, T=16)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is faster and kinder to a shared CI box
    try:
        for _ in range(200):
            loss = m(x, labels=x).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    assert loss.item() < 0.1


def test_gradient_checkpointing_same_gradients():
    x = ids()

    def grads(checkpointing, reentrant=False):
        m = lm().train()
        if checkpointing:
            m.activation_checkpointing_enable({"use_reentrant": reentrant})
            assert all(layer.gradient_checkpointing for layer in m.model.layers)
        m(x, labels=x).loss.backward()
        return {n: p.grad.clone() for n, p in m.named_parameters()}

    ref = grads(False)
    for reentrant in (False, True):
        got = grads(True, reentrant)
        assert got.keys() == ref.keys()
        for n in ref:
            torch.testing.assert_close(got[n], ref[n], atol=1e-6, rtol=1e-5, msg=n)


def test_peft_lora_only_adapters_train():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(lm().train(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("q_proj.lora_A" in n for n in trainable) and any("v_proj.lora_B" in n for n in trainable)
    x = ids()
    model(input_ids=x, labels=x).loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == ("lora_" in n), n


# ------------------------------------------------------------------------------------ save / load / auto


def test_save_load_round_trip_and_auto_classes(tmp_path):
    m = lm()
    x = ids()
    m.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert AutoConfig.from_pretrained(tmp_path).model_type == "align_decoder"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is DecoderForCausalLM
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    torch.testing.assert_close(loaded(x).logits, m(x).logits, atol=0, rtol=0)
    assert type(AutoModel.from_pretrained(tmp_path)) is DecoderModel
    seq = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=1)
    assert type(seq) is DecoderForSequenceClassification and seq.score.weight.shape == (1, 32)


# ------------------------------------------------------------------------------------ sequence classification


def test_seq_cls_pools_last_non_pad_token():
    torch.manual_seed(0)
    m = DecoderForSequenceClassification(tiny(num_labels=3)).eval()
    x = ids(B=2, T=6)
    right = x.clone()
    right[0, 4:] = 0  # right padded row 0: last real token at index 3
    mask = (right != 0).long()
    out = m(right, attention_mask=mask)
    h = m.model(right, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out.logits[0], m.score(h[0, 3]))
    torch.testing.assert_close(out.logits[1], m.score(h[1, 5]))
    # left padding: same sequence gives the same score
    left = torch.zeros_like(right)
    left[0, 2:] = right[0, :4]
    left[1] = right[1]
    torch.testing.assert_close(m(left, attention_mask=(left != 0).long()).logits, out.logits, atol=1e-5, rtol=1e-5)
    # labels -> loss
    assert m(right, attention_mask=mask, labels=torch.tensor([0, 2])).loss.ndim == 0
    # no pad token: batch size 1 only
    m.config.pad_token_id = None
    with pytest.raises(ValueError, match="padding token"):
        m(x)
