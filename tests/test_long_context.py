"""Long context: dual chunk attention, the attention registry (sdpa/eager), dropout, the usable context and
generation's cut at it, and the passkey benchmark end to end (tiny sizes, CPU)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from transformers import DynamicCache

from align import generate as G
from align.bench import context as bench
from align.convert import to_llama
from align.model import DecoderConfig, DecoderForCausalLM
from align.model.modeling import chunk_masks
from align.model.rope import apply_rotary_pos_emb, usable_context
from align.models import load, load_tokenizer

V = 64
TOL = dict(atol=1e-4, rtol=1e-4)  # fp32 batched sums differ by CPU vendor


def tiny(**overrides) -> DecoderConfig:
    kwargs = dict(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return DecoderConfig(**{**kwargs, **overrides})


def same_weights(ref: DecoderForCausalLM, **overrides) -> DecoderForCausalLM:
    m = DecoderForCausalLM(tiny(**overrides)).eval()
    m.load_state_dict(ref.state_dict())
    return m


@pytest.fixture(scope="module")
def ref() -> DecoderForCausalLM:
    torch.manual_seed(0)
    return DecoderForCausalLM(tiny()).eval()


def ids(B=2, T=40, seed=1):
    return torch.randint(3, V, (B, T), generator=torch.Generator().manual_seed(seed))


def left_padded(x: torch.Tensor, pads: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    x, mask = x.clone(), torch.ones_like(x)
    for row, n in enumerate(pads):
        x[row, :n], mask[row, :n] = 0, 0
    return x, mask


# ------------------------------------------------------------------------ dual chunk attention


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_dca_with_one_chunk_equals_ordinary_attention(ref, impl):
    x, mask = left_padded(ids(T=40), [0, 7])
    m = same_weights(ref, dca_chunk_size=48, dca_local_window=8)  # all 40 positions in chunk 0
    m.config._attn_implementation = impl
    got, want = m(x, attention_mask=mask).logits, ref(x, attention_mask=mask).logits
    torch.testing.assert_close(got[1, 7:], want[1, 7:], **TOL)
    torch.testing.assert_close(m(x).logits, ref(x).logits, **TOL)


def test_dca_differs_from_ordinary_attention_past_one_chunk():
    torch.manual_seed(0)
    plain = DecoderForCausalLM(tiny(initializer_range=0.3)).eval()  # large weights: position-sensitive attention
    m = same_weights(plain, initializer_range=0.3, dca_chunk_size=8, dca_local_window=3)
    x = ids(T=40)
    a, b = m(x).logits, plain(x).logits
    torch.testing.assert_close(a[:, :8], b[:, :8], **TOL)  # the first chunk is plain causal attention
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-2  # past it the positions are remapped


def test_no_query_key_distance_exceeds_the_trained_length(ref):
    s, w, T = 8, 3, 50
    m = same_weights(ref, dca_chunk_size=s, dca_local_window=w)
    x, mask = left_padded(ids(T=T), [0, 5])
    pos_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    pos = m.model.chunked_positions(m.model.embed_tokens(x), pos_ids, mask, T)
    allowed = mask[:, None, None, :].bool() & (torch.arange(T)[None, :] <= torch.arange(T)[:, None])[None, None]
    true_dist = pos_ids[:, :, None] - pos_ids[:, None, :]  # (B, T, S)
    seen = torch.zeros_like(allowed)
    for q, kind in zip(pos.query_positions, chunk_masks(allowed, pos)):
        dist = q[:, :, None] - pos.key_positions[:, None, :]  # (B, T, S) after remapping
        kind = kind[:, 0]
        assert (dist[kind] >= 0).all() and dist[kind].max() <= s + w < m.config.max_position_embeddings
        seen |= kind[:, None]
    assert torch.equal(seen, allowed)  # every allowed key is in exactly one kind (the masks are disjoint below)
    intra, succ, inter = (k[:, 0] for k in chunk_masks(allowed, pos))
    assert not (intra & succ).any() and not (intra & inter).any() and not (succ & inter).any()
    dist_intra = pos.query_positions[0][:, :, None] - pos.key_positions[:, None, :]
    assert torch.equal(dist_intra[intra], true_dist[intra])  # within a chunk: the true distances
    dist_succ = pos.query_positions[1][:, :, None] - pos.key_positions[:, None, :]
    near = succ & (pos_ids % s <= w)[:, :, None]  # queries in the first w+1 slots of their chunk
    assert near.any() and torch.equal(dist_succ[near], true_dist[near])  # ... see the last chunk at true distances
    assert true_dist[allowed[:, 0]].max() > 3 * (s + w)  # and the sequence did go far past it


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_dca_attention_equals_a_brute_force_reference(ref, impl):
    """Against a from-scratch reference: every (query, key) scored with RoPE at its remapped positions, masked
    by chunk, the logits of a query at position p past the trained length c times (0.1 ln((p+1)/c) + 1)^2, one
    softmax. Through the Attention module: eager (log-sum-exp merge) and SDPA (one softmax; several query
    blocks), with left padding."""
    import align.model.modeling as modeling

    s, w, T, c, hs = 6, 2, 30, 12, 8
    m = same_weights(ref, dca_chunk_size=s, dca_local_window=w, max_position_embeddings=c)
    m.config._attn_implementation = impl
    attn = m.model.layers[0].self_attn
    x, mask = left_padded(ids(T=T), [0, 4])
    pos_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    h = m.model.embed_tokens(x)
    pos = m.model.chunked_positions(h, pos_ids, mask, T)
    allowed = mask[:, None, None, :].bool() & (torch.arange(T)[None, :] <= torch.arange(T)[:, None])[None, None]

    q = attn.q_proj(h).view(2, T, 4, hs).transpose(1, 2)
    k = attn.k_proj(h).view(2, T, 2, hs).transpose(1, 2).repeat_interleave(2, dim=1)  # (B, nh, T, hs)
    v = attn.v_proj(h).view(2, T, 2, hs).transpose(1, 2).repeat_interleave(2, dim=1)
    rope = m.model.rotary_emb
    k_rot = apply_rotary_pos_emb(k, k, *rope(h, pos_ids % s))[1]
    temperature = (0.1 * torch.log(((pos_ids + 1) / c).clamp(min=1.0)) + 1) ** 2  # (B, T)
    assert temperature.max() > 1.1  # the sequence does go past c
    scores = torch.full((2, 4, T, T), float("-inf"))
    q_positions = (pos_ids % s, (pos_ids % s + s).clamp(max=s + w), torch.full_like(pos_ids, s + w))
    for qp, kind in zip(q_positions, chunk_masks(allowed, pos)):
        part = apply_rotary_pos_emb(q, q, *rope(h, qp))[0] @ k_rot.transpose(2, 3) * hs**-0.5
        scores = torch.where(kind, part * temperature[:, None, :, None], scores)
    want = attn.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, T, -1))  # (B, T, C)

    blocks = modeling.dual_chunk_attention_sdpa.__defaults__
    modeling.dual_chunk_attention_sdpa.__defaults__ = (0.0, 7)  # query blocks of 7: five of them
    try:
        got = attn(h, pos, allowed)
    finally:
        modeling.dual_chunk_attention_sdpa.__defaults__ = blocks
    real = mask.bool()  # padding queries are never read
    torch.testing.assert_close(got[real], want[real], **TOL)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_dca_cached_generation_equals_uncached(ref, impl):
    m = same_weights(ref, dca_chunk_size=8, dca_local_window=3)
    m.config._attn_implementation = impl
    x, mask = left_padded(ids(T=20), [0, 6])
    kw = dict(attention_mask=mask, max_new_tokens=30, do_sample=False, pad_token_id=0, eos_token_id=None)
    cached, uncached = m.generate(x, use_cache=True, **kw), m.generate(x, use_cache=False, **kw)
    assert torch.equal(cached, uncached) and cached.shape[1] == 50  # 50 tokens: six chunks of 8
    # token by token through the cache = one full forward
    full = m(cached).logits
    cache = DynamicCache(config=m.config)
    steps = [m(cached[:, :25], cache=cache, use_cache=True).logits]
    steps += [m(cached[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(25, 50)]
    torch.testing.assert_close(torch.cat(steps, 1), full, **TOL)


def test_dca_config_is_validated():
    with pytest.raises(ValueError, match=r"dca_chunk_size \+ dca_local_window \(56 \+ 8\) < max_position_embeddings"):
        tiny(dca_chunk_size=56)  # w defaults to 64 // 8
    with pytest.raises(ValueError, match="dca_local_window must be an integer in"):
        tiny(dca_chunk_size=8, dca_local_window=8)
    with pytest.raises(ValueError, match="dca_chunk_size must be a positive integer"):
        tiny(dca_chunk_size=0)
    c = tiny(dca_chunk_size=40)
    assert c.dca_local_window == 8 and DecoderConfig.from_dict(c.to_dict()).dca_chunk_size == 40


# ------------------------------------------------------------------------ attention registry


def test_eager_sdpa_and_native_gqa_agree(ref):
    x, mask = left_padded(ids(T=24), [0, 5])
    sdpa = ref(x, attention_mask=mask).logits
    plain = ref(x).logits
    eager = same_weights(ref)
    eager.set_attn_implementation("eager")  # transformers' switch: possible because attention uses the registry
    assert eager.config._attn_implementation == "eager"
    torch.testing.assert_close(eager(x, attention_mask=mask).logits[1, 5:], sdpa[1, 5:], **TOL)
    torch.testing.assert_close(eager(x).logits, plain, **TOL)
    # the eager path returns the probabilities: rows sum to 1, nothing of the future, nothing of the padding
    out = eager(x, attention_mask=mask, output_attentions=True)
    assert len(out.attentions) == 2 and out.attentions[0].shape == (2, 4, 24, 24)
    for p in out.attentions:
        assert torch.allclose(p.sum(-1)[1, :, 5:], torch.ones(4, 19))
        assert p[0].triu(1).abs().max() == 0 and p[1, :, 5:].triu(6).abs().max() == 0  # row 1: query r is at r + 5
        assert p[1, :, 5:, :5].abs().max() == 0
    assert eager(x).attentions is None
    with pytest.raises(ValueError, match="output_attentions needs attn_implementation='eager'"):
        ref(x, output_attentions=True)


def test_unknown_attention_implementation_is_refused(ref):
    with pytest.raises((ValueError, KeyError)):
        DecoderForCausalLM.from_pretrained  # noqa: B018  (the attribute exists)
        same_weights(ref).set_attn_implementation("no_such_attention")


def test_eager_model_saves_and_loads_with_its_implementation(ref, tmp_path):
    ref.save_pretrained(tmp_path)
    m = DecoderForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert m.config._attn_implementation == "eager"
    torch.testing.assert_close(m(ids()).logits, ref(ids()).logits, **TOL)


# ------------------------------------------------------------------------ dropout, defaults, conversion


def test_dropout_acts_in_training_only_and_defaults_keep_llama_conversion(ref):
    x = ids()
    m = same_weights(ref, embedding_dropout=0.3, residual_dropout=0.3)
    torch.testing.assert_close(m(x).logits, ref(x).logits, **TOL)  # eval: no dropout
    m.train()
    torch.manual_seed(0)
    a = m(x).logits
    torch.manual_seed(1)
    assert not torch.allclose(a, m(x).logits)
    for name in ("embedding_dropout", "residual_dropout", "attention_dropout"):
        with pytest.raises(ValueError, match=name):
            tiny(**{name: 1.0})
    # the default config (no DCA, no dropout, sdpa) is still a Llama, logits equal after conversion
    torch.testing.assert_close(to_llama(ref).eval()(x).logits, ref(x).logits, **TOL)


# ------------------------------------------------------------------------ usable context, generation


def test_usable_context():
    assert tiny().usable_context == 64
    assert tiny(rope_parameters={"rope_type": "yarn", "factor": 4.0}).usable_context == 256
    assert tiny(rope_parameters={"rope_type": "linear", "factor": 2.0}, max_context_length=100).usable_context == 100
    assert tiny(dca_chunk_size=40).usable_context is None
    from transformers import LlamaConfig

    assert usable_context(LlamaConfig(max_position_embeddings=128)) == 128


def test_fit_context_cuts_left_or_refuses(caplog):
    ids_ = [list(range(10)), list(range(30)), list(range(50))]
    with caplog.at_level(logging.WARNING, logger="align.generate"):
        out = G.fit_context(ids_, limit=40, max_new_tokens=8, overflow="truncate")
    assert out[0] == ids_[0] and out[1] == list(range(30)) and out[2] == list(range(18, 50))  # the end is kept
    assert "1 of 3 prompts" in caplog.text and "cut 18 tokens" in caplog.text
    with pytest.raises(ValueError, match=r"1 of 3 prompts .* usable context \(40 tokens\) .* 32; the longest has 50"):
        G.fit_context(ids_, limit=40, max_new_tokens=8, overflow="error")
    with pytest.raises(ValueError, match="context_overflow must be"):
        G.fit_context(ids_, limit=40, max_new_tokens=8, overflow="drop")
    assert G.fit_context(ids_, limit=None, max_new_tokens=8, overflow="error") == ids_


def test_generate_cuts_a_prompt_past_the_models_context(tiny_lm_dir, caplog):
    model, tok = load(tiny_lm_dir, device="cpu"), load_tokenizer(tiny_lm_dir)
    limit = model.config.usable_context  # 256
    long_prompt = "three plus four is seven . " * 80
    assert len(G.prompt_ids(tok, [long_prompt])[0]) > limit
    with caplog.at_level(logging.WARNING, logger="align.generate"):
        replies = G.generate(model, tok, [long_prompt, "Hi"], max_new_tokens=4)
    assert len(replies) == 2 and "cut" in caplog.text and f"usable context ({limit} tokens)" in caplog.text
    with pytest.raises(ValueError, match="longer than the usable context"):
        G.generate(model, tok, [long_prompt], max_new_tokens=4, context_overflow="error")


# ------------------------------------------------------------------------ the passkey benchmark


def test_passkey_samples_hold_the_key_where_asked():
    g = torch.Generator().manual_seed(0)
    where = []
    for depth in (0.0, 0.5, 1.0):
        prompt, key = bench.sample(300, depth, g)
        assert len(prompt) + len(key) == 300 and len(set(key)) == bench.KEY_LEN
        text = [bench.WORDS[t] for t in prompt]
        at = text.index("pass") - 1  # the needle starts with "the pass key is :"
        assert text[-3:] == ["pass", "key", ":"] and text.count("pass") == 3
        assert [bench.VOCAB[w] for w in text[at + 5 : at + 5 + bench.KEY_LEN]] == key
        where.append(at)
    n_fill = 300 - 2 * bench.KEY_LEN - 1 - len(bench.encode(bench.NEEDLE.replace("{key}", ""))) - len(
        bench.encode(bench.QUESTION))
    assert where == [1, 1 + round(n_fill / 2), 1 + n_fill]  # after <bos>, mid-haystack, just before the question
    x, answer = bench.batch(6, 80, g)
    assert x.shape == (6, 80) and answer.sum(1).tolist() == [5, 10] * 3  # packed rows hold two samples
    with pytest.raises(ValueError, match="too short"):
        bench.sample(20, 0.5, g)


def test_bench_context_quick_end_to_end(tmp_path, capsys):
    assert bench.main(["--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    r = json.loads((tmp_path / "results.json").read_text())
    assert set(r["accuracy"]) == set(bench.METHODS) and r["lengths"] == [32, 128]
    for n in r["lengths"]:
        assert r["kv_cache"][str(n)]["measured"] == r["kv_cache"][str(n)]["formula"] > 0
    assert (tmp_path / "context.png").stat().st_size > 5000 and (tmp_path / "model" / "config.json").exists()
    assert "| yarn+dca |" in out and "KV cache, measured" in out
    # a re-run loads the saved model instead of training again
    assert bench.main(["--quick", "--out", str(tmp_path)]) == 0
    assert "loading the trained passkey model" in capsys.readouterr().out


def test_method_configs():
    base = bench.model_config(256, "tiny")
    c = bench.method_config(base, "yarn+dca", 2048)
    assert c.rope_parameters["rope_type"] == "yarn" and c.rope_parameters["factor"] == 8.0
    assert (c.dca_chunk_size, c.dca_local_window) == (160, 32)
    assert bench.method_config(base, "rope", 2048).dca_chunk_size is None
    assert bench.method_config(base, "linear", 256).rope_parameters["factor"] == 1.0
