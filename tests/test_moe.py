"""align.model.moe: noisy top-k routing, capacity, load-balancing loss, and the MoE decoder."""

from __future__ import annotations

import math

import pytest
import torch

from align.convert import to_llama
from align.model import DecoderConfig, DecoderForCausalLM, MoEFeedForward, moe_stats

V = 64


def moe_config(**overrides) -> DecoderConfig:
    kwargs = dict(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, num_experts=4, num_experts_per_tok=2,
    )
    return DecoderConfig(**{**kwargs, **overrides})


def one_hot_router(E: int = 4, k: int = 1, **overrides) -> MoEFeedForward:
    """Router = scaled identity on the first E dims: token e_j goes to expert j."""
    torch.manual_seed(0)
    moe = MoEFeedForward(moe_config(num_experts=E, num_experts_per_tok=k, **overrides))
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[:, :E] = 5 * torch.eye(E)
    return moe


def tokens(expert_ids: list[int], C: int = 32) -> torch.Tensor:
    x = torch.zeros(1, len(expert_ids), C)
    x[0, torch.arange(len(expert_ids)), torch.tensor(expert_ids)] = 1.0
    return x


def test_aux_loss_is_one_at_perfect_balance_and_grows_with_imbalance():
    moe = one_hot_router(E=4, k=1).eval()
    _, balanced, dropped = moe(tokens([0, 1, 2, 3, 3, 2, 1, 0]))
    torch.testing.assert_close(balanced, torch.tensor(1.0))
    assert dropped.item() == 0
    _, skewed, _ = moe(tokens([0, 0, 0, 0, 0, 0, 1, 2]))
    assert skewed.item() > 1.5
    # uniform router probabilities: the loss is 1 whatever the assignment (E * sum f_i / E)
    with torch.no_grad():
        moe.router.weight.zero_()
    torch.testing.assert_close(moe(torch.randn(2, 5, 32))[1], torch.tensor(1.0))


def test_capacity_drops_overflow_and_counts_them():
    moe = one_hot_router(E=4, k=1, expert_capacity_factor=1.0).train()
    x = tokens([0] * 6 + [1, 2])  # 8 tokens: capacity = ceil(1.0 * 8 * 1 / 4) = 2 per expert
    out, _, dropped = moe(x)
    assert dropped.item() == 4  # expert 0 keeps its first 2 tokens, drops 4
    assert moe.last_dropped_tokens.item() == 4
    norms = out[0].norm(dim=-1)
    assert (norms[:2] > 0).all() and (norms[2:6] == 0).all() and (norms[6:] > 0).all()  # dropped: zero update
    # with no capacity limit (eval default) nothing is dropped
    moe.eval()
    assert moe(x)[2].item() == 0 and (moe(x)[0][0].norm(dim=-1) > 0).all()


def test_first_choices_served_before_second_choices():
    moe = one_hot_router(E=4, k=2, expert_capacity_factor=0.5).train()
    # capacity = ceil(0.5 * 4 * 2 / 4) = 1; token 0 picks expert 0 first, token 1..3 pick 1,2,3 first;
    # every second choice competes for a full queue -> all 4 second choices dropped, no first choice
    out, _, dropped = moe(tokens([0, 1, 2, 3]))
    assert dropped.item() == 4
    assert (out[0].norm(dim=-1) > 0).all()


def test_padding_is_not_routed():
    moe = one_hot_router(E=4, k=1).eval()
    x = tokens([0, 1, 2, 3])
    mask = torch.tensor([[False, True, True, True]])
    out, aux, _ = moe(x, mask)
    assert out[0, 0].abs().sum() == 0 and (out[0, 1:].norm(dim=-1) > 0).all()
    assert aux.item() > 1.0  # 3 tokens over 4 experts cannot balance


def test_matches_dense_loop_reference():
    torch.manual_seed(0)
    moe = MoEFeedForward(moe_config()).eval()
    x = torch.randn(2, 5, 32)
    out, _, _ = moe(x)
    probs = moe.router(x.reshape(-1, 32)).softmax(-1)
    w, idx = probs.topk(2, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    ref = torch.stack([
        sum(w[n, j] * moe.experts[idx[n, j]](x.reshape(-1, 32)[n]) for j in range(2)) for n in range(10)
    ])
    torch.testing.assert_close(out.reshape(-1, 32), ref, atol=1e-6, rtol=1e-5)


def test_router_noise_only_in_training():
    torch.manual_seed(0)
    moe = MoEFeedForward(moe_config(router_noise=1.0, expert_capacity_factor=None))
    x = torch.randn(1, 16, 32)
    moe.eval()
    assert torch.equal(moe(x)[0], moe(x)[0])
    moe.train()
    torch.manual_seed(1)
    a = moe(x)[0]
    torch.manual_seed(2)
    assert not torch.allclose(a, moe(x)[0])


def test_moe_model_loss_includes_aux_and_router_gets_gradients():
    torch.manual_seed(0)
    m = DecoderForCausalLM(moe_config(router_aux_loss_coef=0.1)).train()
    assert all(isinstance(layer.mlp, MoEFeedForward) for layer in m.model.layers)
    assert "model.layers.0.mlp.experts.3.down_proj.weight" in dict(m.named_parameters())
    x = torch.randint(3, V, (2, 12))
    out = m(x, labels=x)
    assert out.aux_loss.item() >= 1.0 - 1e-6 and out.dropped_tokens.ndim == 0
    lm_loss = m.loss_function(logits=out.logits, labels=x, vocab_size=V)
    torch.testing.assert_close(out.loss, lm_loss + 0.1 * out.aux_loss)
    out.loss.backward()
    for layer in m.model.layers:
        g = layer.mlp.router.weight.grad
        assert g is not None and g.abs().sum() > 0
    # the aux loss alone reaches the router too
    m.zero_grad()
    m(x).aux_loss.backward()
    assert m.model.layers[0].mlp.router.weight.grad.abs().sum() > 0
    stats = moe_stats(m)
    assert set(stats) == {"moe/aux_loss", "moe/dropped_tokens"} and stats["moe/aux_loss"] >= 1.0 - 1e-6


def test_moe_layer_freq_and_expert_init():
    torch.manual_seed(0)
    c = moe_config(num_hidden_layers=4, moe_layer_freq=2, hidden_size=128, moe_intermediate_size=256,
                   num_attention_heads=4, initializer_range=0.02)
    m = DecoderForCausalLM(c)
    assert [layer.is_moe for layer in m.model.layers] == [False, True, False, True]
    w = m.model.layers[1].mlp.experts[0].down_proj.weight
    assert w.shape == (128, 256)
    assert w.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.05)
    assert moe_stats(DecoderForCausalLM(moe_config(num_experts=0))) == {}


def test_moe_generation_cached_equals_uncached_and_gradient_checkpointing():
    torch.manual_seed(0)
    m = DecoderForCausalLM(moe_config(eos_token_id=None)).eval()
    x = torch.randint(3, V, (2, 5))
    kw = dict(attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False)
    assert torch.equal(m.generate(x, use_cache=True, **kw), m.generate(x, use_cache=False, **kw))
    # gradient checkpointing: aux loss survives recomputation, same gradients
    m.train()
    m.config.router_noise = 0.0

    def grads():
        m.zero_grad()
        m(x, labels=x).loss.backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    ref = grads()
    m.activation_checkpointing_enable({"use_reentrant": True})
    got = grads()
    assert got.keys() == ref.keys()
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], atol=1e-6, rtol=1e-5, msg=n)


def test_moe_refuses_llama_conversion():
    m = DecoderForCausalLM(moe_config())
    with pytest.raises(ValueError, match="num_experts=4"):
        to_llama(m)


def test_gshard_random_second_expert_skips_weak_seconds_in_training_only():
    """second_expert_policy='random': a second choice with gate g2 (renormalised over the two) serves its token
    with probability min(1, 2*g2); the output then equals first-expert-only for the skipped tokens."""
    torch.manual_seed(0)
    moe = MoEFeedForward(moe_config(second_expert_policy="random", expert_capacity_factor=None))
    x = torch.randn(1, 4000, 32)
    probs = moe.router(x.reshape(-1, 32)).softmax(-1)
    w, idx = probs.topk(2, dim=-1)
    g2 = w[:, 1] / w.sum(-1)  # (N,) in (0, 1/2]
    first_only = torch.stack([moe.experts[i](x[0, n]) for n, i in enumerate(idx[:, 0].tolist())])
    first_only = first_only * (w[:, 0] / w.sum(-1))[:, None]
    moe.train()
    torch.manual_seed(3)
    out = moe(x)[0].reshape(-1, 32).detach()
    skipped = (out - first_only.detach()).abs().amax(-1) < 1e-5  # (N,) the second expert added nothing
    rate = skipped.float().mean().item()
    expected = (1 - (2 * g2).clamp(max=1)).mean().item()
    assert expected > 0.05 and abs(rate - expected) < 0.03, (rate, expected)
    # the weaker the second choice, the likelier the skip
    assert skipped[g2 < 0.25].float().mean() > skipped[g2 > 0.4].float().mean()
    moe.eval()  # deterministic top-2 at evaluation
    out_eval = moe(x)[0].reshape(-1, 32)
    assert ((out_eval - first_only).abs().amax(-1) > 1e-5).all()


def test_second_expert_policy_is_validated():
    with pytest.raises(ValueError, match="second_expert_policy"):
        moe_config(second_expert_policy="sampling")
    with pytest.raises(ValueError, match="num_experts_per_tok=2"):
        moe_config(second_expert_policy="random", num_experts_per_tok=1)
