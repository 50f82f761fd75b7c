"""PPO (align.ppo) on tiny models: GAE by hand, clipping, value loss, KL at step 0, learning, command + resume."""

from __future__ import annotations

import json

import pytest
import torch
from test_grpo import low_half, tiny_dirs, world_dataset

from align.ppo_trainer import (
    AdaptiveKLController,
    PPOConfig,
    PPOTrainer,
    compute_gae,
    masked_mean,
    masked_whiten,
    ppo_losses,
)

torch.set_num_threads(1)


def ppo_config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=16, max_completion_length=8,
                learning_rate=1e-2, max_steps=2, logging_steps=1, save_strategy="no", report_to="none", bf16=False,
                seed=0, num_ppo_epochs=2, num_mini_batches=2, kl_coef=0.05, disable_tqdm=True,
                lr_scheduler_type="constant")
    base.update(kw)
    return PPOConfig(**base)


def ppo_trainer(tmp_path, reward_funcs, peft=False, value_model=False, **kw):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from align.models import load_tokenizer

    d = tiny_dirs()
    torch.manual_seed(0)
    return PPOTrainer(model=AutoModelForCausalLM.from_pretrained(d["policy"]), args=ppo_config(tmp_path, **kw),
                      processing_class=load_tokenizer(d["policy"]), reward_funcs=reward_funcs,
                      train_dataset=world_dataset(64),
                      peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]) if peft else None,
                      value_model=AutoModelForSequenceClassification.from_pretrained(d["rm"]) if value_model else None)


def test_gae_matches_hand_computation():
    # one reply of 3 tokens (+1 padding), gamma=0.9, lambda=0.8
    r = torch.tensor([[0.1, -0.2, 1.0, 5.0]])
    v = torch.tensor([[0.5, 0.4, 0.3, 9.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    g, lam = 0.9, 0.8
    d2 = 1.0 + g * 0.0 - 0.3  # last real token bootstraps from 0: the padding's value and reward are masked
    d1 = -0.2 + g * 0.3 - 0.4
    d0 = 0.1 + g * 0.4 - 0.5
    a2 = d2
    a1 = d1 + g * lam * a2
    a0 = d0 + g * lam * a1
    adv, ret = compute_gae(r, v, m, g, lam)
    assert torch.allclose(adv, torch.tensor([[a0, a1, a2, 0.0]]), atol=1e-6)
    assert torch.allclose(ret, torch.tensor([[a0 + 0.5, a1 + 0.4, a2 + 0.3, 0.0]]), atol=1e-6)
    # gamma = lambda = 1: advantage = (sum of rewards to go) - V_t
    adv1, _ = compute_gae(r, v, m, 1.0, 1.0)
    assert torch.allclose(adv1[0, :3], torch.tensor([0.9 - 0.5, 0.8 - 0.4, 1.0 - 0.3]), atol=1e-6)


def test_whiten_is_zero_mean_unit_var_on_mask():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = masked_whiten(x, m)
    assert abs(float((w * m).sum())) < 1e-5 and torch.allclose(w[0, :3], torch.tensor([-1.0, 0.0, 1.0]), atol=1e-4)


def test_clipping_engages_outside_the_trust_region():
    eps = 0.2
    old = torch.zeros(1, 4)
    new = torch.log(torch.tensor([[1.0, 1.1, 1.5, 0.5]])).requires_grad_(True)  # ratios 1.0, 1.1, 1.5, 0.5
    adv = torch.tensor([[1.0, 1.0, 1.0, -1.0]])
    m = torch.ones(1, 4)
    zeros = torch.zeros(1, 4)
    out = ppo_losses(new, old, adv, zeros, zeros, zeros, m, eps, 0.2)
    out["pg_loss"].backward()
    # ratio 1.5 with A>0 and ratio 0.5 with A<0 are clipped: no gradient; inside [0.8, 1.2] there is
    assert new.grad[0, 2] == 0 and new.grad[0, 3] == 0
    assert new.grad[0, 0] != 0 and new.grad[0, 1] != 0
    assert out["pg_clipfrac"].item() == pytest.approx(0.5)
    # the value loss is clipped too: a prediction that moved more than cliprange_value from the old value
    # (0 -> 0.9, return 1) is scored as if at 0.2, and gets no gradient
    vpred = torch.tensor([[0.9, 0.1, 0.0, 0.0]], requires_grad=True)
    out = ppo_losses(new.detach(), old, adv, vpred, zeros, torch.full((1, 4), 1.0), m, eps, 0.2)
    out["vf_loss"].backward()
    assert out["vf_clipfrac"].item() == pytest.approx(0.25)
    assert vpred.grad[0, 0] == 0 and vpred.grad[0, 1] != 0


def test_adaptive_kl_controller():
    kl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    kl.update(12.0, n_steps=1000)  # error clipped to +0.2
    assert kl.value == pytest.approx(0.1 * 1.02)
    kl.update(0.0, n_steps=1000)
    assert kl.value == pytest.approx(0.1 * 1.02 * 0.98)


def test_config_validates():
    with pytest.raises(ValueError, match="cliprange"):
        PPOConfig(output_dir="/tmp/x", cliprange=0.0, report_to="none", bf16=False)
    with pytest.raises(ValueError, match="num_mini_batches"):
        PPOConfig(output_dir="/tmp/x", per_device_train_batch_size=6, num_mini_batches=4, report_to="none", bf16=False)


@pytest.mark.parametrize("value_model", [False, True], ids=["value-head", "value-model"])
def test_kl_zero_at_step_zero_and_value_loss_falls(tmp_path, value_model):
    trainer = ppo_trainer(tmp_path, [low_half], peft=True, value_model=value_model, vf_coef=1.0, learning_rate=3e-3)
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    ro = trainer.rollout([world_dataset(64)[i] for i in range(16)])
    assert abs(ro.stats["objective/kl"]) < 1e-5  # LoRA B starts at 0: pi == pi_ref
    assert ro.mask.sum(1).min() >= 1 and "rewards/low_half/mean" in ro.stats
    first = trainer.ppo_update(ro)
    for _ in range(4):
        last = trainer.ppo_update(ro)  # the same batch again and again: the value head fits its returns
    assert last["loss/value_avg"] < 0.5 * first["loss/value_first"], (first, last)


@pytest.mark.parametrize("value_model", [False, True], ids=["value-head", "value-model"])
def test_value_learning_rate_gives_the_critic_its_own_group(tmp_path, value_model):
    trainer = ppo_trainer(tmp_path, [low_half], value_model=value_model, learning_rate=1e-5, value_learning_rate=1e-3)
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    critic = {id(p) for p in trainer.model.critic().parameters()}
    groups = [{id(p) for p in g["params"]} for g in trainer.optimizer.param_groups]
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [1e-5, 1e-5, 1e-3]
    assert groups[2] == critic and not (groups[0] | groups[1]) & critic
    assert sum(map(len, groups)) == sum(p.requires_grad for p in trainer.model.parameters())  # every weight once


def test_ppo_raises_mean_reward(tmp_path):
    trainer = ppo_trainer(tmp_path, [low_half], max_steps=10, per_device_train_batch_size=32, kl_coef=0.0,
                          learning_rate=2e-2, num_ppo_epochs=2, num_mini_batches=1)
    trainer.train()
    scores = [r["objective/scores"] for r in trainer.state.log_history if "objective/scores" in r]
    assert len(scores) == 10
    assert sum(scores[-3:]) / 3 > sum(scores[:3]) / 3 + 0.05, scores


def test_ppo_command_checkpoint_resume_and_eval(tmp_path):
    import importlib.util

    from align.ppo import main

    d = tiny_dirs()
    has_rm = importlib.util.find_spec("align.score") is not None
    rm = ["--reward_model_path", d["rm"]] if has_rm else []
    argv = ["configs/ppo.yaml", "--output_dir", str(tmp_path), "--model_name_or_path", d["policy"], *rm,
            "--use_peft", "true", "--lora_r", "4", "--lora_target_modules", "[q_proj, v_proj]",
            "--per_device_train_batch_size", "8", "--num_mini_batches", "2", "--num_ppo_epochs", "1",
            "--max_completion_length", "6", "--save_steps", "1", "--num_prompts", "32", "--eval_num_prompts", "8",
            "--eval_kl_prompts", "4", "--eval_max_new_tokens", "6", "--adaptive_kl", "true",
            "--missing_eos_penalty", "1.0", "--seed", "0"]
    main([*argv, "--max_steps", "1"])
    assert (tmp_path / "checkpoint-1" / "trainable.pt").exists()
    summary = main([*argv, "--max_steps", "2"])  # re-run with more steps: resumes from checkpoint-1
    assert summary.steps == 2
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for k in ("objective/kl", "objective/entropy", "policy/clipfrac_avg", "loss/value_avg", "loss/policy_avg",
              "rewards/correct/mean", "rewards/polite/mean", "objective/kl_coef"):
        assert k in rows[-1], k
    ev = summary.eval
    for k in ("exact_match", "exact_match_sampled", "preferred_rate", "kl_to_reference"):
        assert k in ev and k in summary.before
    assert not has_rm or "mean_rm_reward" in ev
    assert (tmp_path / "final" / "config.json").exists() and not (tmp_path / "final" / "adapter_config.json").exists()
    assert not (tmp_path / "checkpoint-1").exists()  # save_total_limit: 1 in configs/ppo.yaml
    assert (tmp_path / "rl_curves.png").exists()


def test_failing_reward_names_reward_and_sample(tmp_path):
    from align.reward_funcs import RewardError

    def broken(prompts, completions, completion_ids=None, **kw):
        raise KeyError("score")

    trainer = ppo_trainer(tmp_path, [broken], max_steps=1)
    with pytest.raises(RewardError, match=r"reward 'broken' raised KeyError.*first sample: prompt="):
        trainer.train()


def test_separate_value_model_resumes_and_must_share_the_tokenizer(tmp_path):
    import shutil

    from align.models import load_tokenizer
    from align.ppo import main

    d = tiny_dirs()
    argv = ["configs/ppo.yaml", "--output_dir", str(tmp_path / "run"), "--model_name_or_path", d["policy"],
            "--per_device_train_batch_size", "8", "--num_mini_batches", "1", "--num_ppo_epochs", "1",
            "--max_completion_length", "6", "--save_steps", "1", "--num_prompts", "16", "--eval_num_prompts", "0"]
    main([*argv, "--value_model_path", d["rm"], "--max_steps", "1"])
    state = torch.load(tmp_path / "run" / "checkpoint-1" / "trainable.pt")
    assert any(k.startswith("value_model.model.") for k in state), sorted(state)[:5]  # the whole value model trains
    assert not any(k.startswith("value_head") for k in state)
    assert main([*argv, "--value_model_path", d["rm"], "--max_steps", "2"]).steps == 2  # resumes from checkpoint-1

    other = tmp_path / "rm-other-tokenizer"
    shutil.copytree(d["rm"], other)
    tok = load_tokenizer(d["rm"])
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(other)
    with pytest.raises(ValueError, match=r"value model .*rm-other-tokenizer.* another tokenizer"):
        main([*argv, "--output_dir", str(tmp_path / "bad"), "--value_model_path", str(other), "--max_steps", "1"])
    with pytest.raises(FileNotFoundError, match=r"does not exist; train one first with `python -m align.reward"):
        main([*argv, "--output_dir", str(tmp_path / "bad"), "--value_model_path", str(tmp_path / "nope")])


def test_hf_models_left_padded_rollout_logprobs_match_unpadded(tmp_path):
    """GPT-2 (absolute positions) as the policy and a Llama value model: a left-padded rollout scores each reply
    as the policy does with no padding at all, so position ids follow the attention mask."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForSequenceClassification

    from align.models import load_tokenizer

    d = tiny_dirs()
    tok = load_tokenizer(d["policy"])
    ids = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
               eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    policy = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=256, **ids))
    value = LlamaForSequenceClassification(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                       num_attention_heads=2, num_labels=1, **ids))
    trainer = PPOTrainer(model=policy, args=ppo_config(tmp_path), processing_class=tok, reward_funcs=[low_half],
                         train_dataset=world_dataset(64), value_model=value)
    rows = [world_dataset(64)[i] for i in range(8)]
    ro = trainer.rollout(rows)
    L = ro.context_length
    assert (ro.attention_mask[:, :L] == 0).any()  # prompts of different lengths: some rows are left-padded
    assert abs(ro.stats["objective/kl"]) < 1e-5
    with torch.no_grad():
        for i in range(len(rows)):
            real = ro.attention_mask[i].bool()
            seq = ro.query_responses[i][real][None]  # the row without any padding
            n = int(ro.mask[i].sum())
            logits = policy(input_ids=seq).logits[0, -n - 1 : -1].float()
            own = torch.log_softmax(logits / trainer.args.temperature, -1).gather(-1, seq[0, -n:, None]).squeeze(-1)
            torch.testing.assert_close(ro.logprobs[i, :n], own, atol=1e-4, rtol=1e-4)


def _old_micro_batch(wrapper, ro, idx, args):
    """The update's micro-batch as it was computed before the fast path: logits over the whole padded sequence, the
    reply's slice taken afterwards, log-softmax over the full vocabulary in fp32, entropy in a second pass."""
    L = ro.context_length
    logits, vpred = wrapper(input_ids=ro.query_responses[idx], attention_mask=ro.attention_mask[idx])
    logits, vpred = logits[:, L - 1 : -1].float() / args.temperature, vpred[:, L - 1 : -1].float()
    logp = logits.log_softmax(-1)
    new_lp = logp.gather(-1, ro.query_responses[idx, L:, None]).squeeze(-1)
    m = ro.mask[idx]
    out = ppo_losses(new_lp, ro.logprobs[idx], ro.advantages[idx], vpred, ro.values[idx], ro.returns[idx], m,
                     args.cliprange, args.cliprange_value)
    out["entropy"] = ((-(logp.exp() * logp).sum(-1)) * m).sum().detach() / m.sum()
    return out


def test_fast_path_gives_the_old_logprobs_values_losses_and_gradients(tmp_path):
    """Rollout log-probs, values and reference log-probs from logits of the reply's positions only (logits_to_keep)
    and the fused log-prob + entropy pass, and the update on micro-batches cut to their longest reply, equal the
    old full-sequence, full-vocabulary computation."""
    import copy
    import dataclasses

    trainer = ppo_trainer(tmp_path, [low_half], per_device_train_batch_size=8, gradient_accumulation_steps=2,
                          num_ppo_epochs=1, num_mini_batches=1, max_grad_norm=0.0, temperature=0.7)
    trainer._prepare()  # the optimizer (train() makes it)
    args = trainer.args
    ro = trainer.rollout([world_dataset(64)[i] for i in range(16)])
    L, T = ro.context_length, ro.mask.size(1)
    # replies of different lengths (a random tiny model rarely samples its EOS): cut row i after k_i tokens, all
    # shorter than the rollout's width, so every micro-batch is cut
    k = torch.tensor([1 + (3 * i) % max(T - 1, 1) for i in range(16)])
    mask = (torch.arange(T)[None] < k[:, None]).float()
    qr = ro.query_responses.clone()
    qr[:, L:] = qr[:, L:].masked_fill(mask == 0, trainer.pad_id)
    attn = torch.cat([ro.attention_mask[:, :L], mask.long()], 1)
    # and 3 more columns of left padding on every prompt, so every micro-batch is cut on the left too
    qr = torch.nn.functional.pad(qr, (3, 0), value=trainer.pad_id)
    attn = torch.nn.functional.pad(attn, (3, 0), value=0)
    L += 3
    ro = dataclasses.replace(ro, query_responses=qr, attention_mask=attn, context_length=L, mask=mask,
                             logprobs=ro.logprobs * mask, values=ro.values * mask, advantages=ro.advantages * mask,
                             returns=ro.returns * mask)

    old = copy.deepcopy(trainer.model)
    with torch.no_grad():  # the rollout's figures, the old way
        logits, values = old(input_ids=ro.query_responses, attention_mask=ro.attention_mask)
        lp = (logits[:, L - 1 : -1].float() / args.temperature).log_softmax(-1)
        lp = lp.gather(-1, ro.query_responses[:, L:, None]).squeeze(-1)
        new_lp, ent = trainer._logprobs(logits[:, L - 1 : -1], ro.query_responses[:, L:])  # the fused pass
        torch.testing.assert_close(new_lp, lp, atol=1e-5, rtol=1e-5)
        full = (logits[:, L - 1 : -1].float() / args.temperature).log_softmax(-1)
        torch.testing.assert_close(ent, -(full.exp() * full).sum(-1), atol=1e-5, rtol=1e-5)
        fresh = trainer.rollout([world_dataset(64)[i] for i in range(16)])
    # a second rollout's stored log-probs and values against the old computation on its own sequences
    with torch.no_grad():
        Lf = fresh.context_length
        logits, values = old(input_ids=fresh.query_responses, attention_mask=fresh.attention_mask)
        lp = (logits[:, Lf - 1 : -1].float() / args.temperature).log_softmax(-1)
        lp = lp.gather(-1, fresh.query_responses[:, Lf:, None]).squeeze(-1)
        torch.testing.assert_close(fresh.logprobs, lp * fresh.mask, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fresh.values, values[:, Lf - 1 : -1].float() * fresh.mask, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fresh.ref_logprobs, lp * fresh.mask, atol=1e-5, rtol=1e-5)  # reference = start
        full = (logits[:, Lf - 1 : -1].float() / args.temperature).log_softmax(-1)
        ent_old = masked_mean(-(full.exp() * full).sum(-1), fresh.mask)
        assert fresh.stats["policy/entropy_avg"] == pytest.approx(float(ent_old), abs=1e-5)

    # the update: same permutation, two micro-batches of 8, one optimizer step; losses and gradients as before
    torch.manual_seed(123)
    perm = torch.randperm(16)
    old.train()
    outs = []
    for half in (perm[:8], perm[8:]):
        out = _old_micro_batch(old, ro, half, args)
        ((out["pg_loss"] + args.vf_coef * out["vf_loss"]) * 0.5).backward()
        outs.append(out)
    torch.manual_seed(123)
    upd = trainer.ppo_update(ro)
    for key, name in (("pg_loss", "loss/policy_avg"), ("vf_loss", "loss/value_avg"), ("ratio", "val/ratio"),
                      ("approxkl", "policy/approxkl_avg"), ("entropy", "policy/entropy_train")):
        assert upd[name] == pytest.approx(sum(float(o[key].detach()) for o in outs) / 2, abs=1e-5), name
    for (n, p), q in zip(trainer.model.named_parameters(), old.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=n)


def test_ppo_rollouts_go_through_fastgen(tmp_path, monkeypatch):
    """With align.fastgen routing the policy's generate (as align.rl.prepare does on CUDA), the PPO trainer's
    rollouts reach the fast loop: through accelerate's prepared wrapper and trl's unwrap, the policy called is the
    patched one."""
    from transformers import AutoModelForCausalLM

    from align import fastgen
    from align.models import load_tokenizer

    d = tiny_dirs()
    policy = AutoModelForCausalLM.from_pretrained(d["policy"])
    assert fastgen.use_fast_generate(policy)
    calls = []
    real = fastgen.fast_generate
    monkeypatch.setattr(fastgen, "fast_generate", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    trainer = PPOTrainer(model=policy, args=ppo_config(tmp_path, max_steps=1), reward_funcs=[low_half],
                         processing_class=load_tokenizer(d["policy"]), train_dataset=world_dataset(64))
    trainer.train()
    assert len(calls) == 1 and calls[0]["do_sample"] and calls[0]["max_new_tokens"] == 8


def test_response_logprobs_keep_only_the_reply_positions():
    """align.logprobs.response_logprobs (the evaluation's KL) from the reply's logits alone equals the full-sequence
    log-softmax it replaced."""
    from transformers import AutoModelForCausalLM

    from align.logprobs import left_pad, response_logprobs

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs()["policy"]).eval()
    q, m = left_pad([[5, 6, 7, 8], [9, 10]], 0)
    resp = torch.randint(3, 200, (2, 5))
    ids, mask = torch.cat([q, resp], 1), torch.cat([m, torch.ones_like(resp)], 1)
    with torch.no_grad():
        got = response_logprobs(model, ids, mask, 4, temperature=0.7)
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, 3:-1].float() / 0.7
        want = logits.log_softmax(-1).gather(-1, resp[..., None]).squeeze(-1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_rollouts_generate_under_the_training_autocast(tmp_path):
    """Under bf16 accelerate autocasts the prepared policy + critic's forward only; generation calls the policy inside
    it, so it must enter autocast itself (it ran in fp32 before), as the log-prob forwards do."""
    trainer = ppo_trainer(tmp_path, [low_half], bf16=True, use_cpu=True)
    trainer._prepare()
    seen = []
    forward = trainer.policy.forward
    trainer.policy.forward = lambda *a, **kw: seen.append(torch.is_autocast_enabled("cpu")) or forward(*a, **kw)
    trainer._sample(*trainer._encode_prompts([world_dataset(8)[i]["prompt"] for i in range(4)]))
    assert seen and all(seen)
