"""GRPO through TRL on tiny models (CPU, seconds): advantages, KL at step 0, learning, the command, bad input.

The tiny model helpers here are shared with test_ppo.py and test_rewards.py (``from test_grpo import ...``).
"""

from __future__ import annotations

import importlib.util
import json
import tempfile
from functools import lru_cache
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------- tiny models


@lru_cache(maxsize=None)
def tiny_dirs() -> dict[str, str]:
    """A small project tokenizer, a tiny random DecoderForCausalLM and a tiny reward model, saved once."""
    import align.model  # noqa: F401
    from align.model import DecoderConfig, DecoderForCausalLM, DecoderForSequenceClassification
    from align.models import load_tokenizer
    from align.tokenizer import TokenizerArguments, train_tokenizer

    root = Path(tempfile.mkdtemp(prefix="align-rl-tests-"))
    train_tokenizer(TokenizerArguments(corpus="world", vocab_size=300, max_documents=300, output_dir=str(root / "tok")))
    tok = load_tokenizer(root / "tok")
    cfg = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
               intermediate_size=64, max_position_embeddings=256, pad_token_id=tok.pad_token_id,
               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    DecoderForCausalLM(DecoderConfig(**cfg)).save_pretrained(root / "policy")
    tok.save_pretrained(root / "policy")
    torch.manual_seed(1)
    DecoderForSequenceClassification(DecoderConfig(**cfg, num_labels=1)).save_pretrained(root / "rm")
    tok.save_pretrained(root / "rm")
    return {"root": str(root), "tok": str(root / "tok"), "policy": str(root / "policy"), "rm": str(root / "rm")}


def low_half(prompts, completions, completion_ids=None, **kwargs):
    """A trivially learnable reward: the share of reply tokens from the lower half of the vocabulary."""
    return [sum(t < 150 for t in ids) / max(len(ids), 1) for ids in completion_ids]


def grpo_config(tmp_path, **kw):
    from trl import GRPOConfig

    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=16, num_generations=4, max_completion_length=8,
                learning_rate=3e-2, lr_scheduler_type="constant", max_steps=2, logging_steps=1, save_strategy="no",
                report_to="none",
                activation_checkpointing=False, bf16=False, beta=0.0, seed=0, disable_tqdm=True)
    base.update(kw)
    return GRPOConfig(**base)


def world_dataset(n=16):
    from align.rl import prompt_dataset

    return prompt_dataset("world", n, 0)


def grpo_trainer(tmp_path, reward_funcs, model=None, peft_config=None, **kw):
    from transformers import AutoModelForCausalLM
    from trl import GRPOTrainer

    from align.models import load_tokenizer
    from align.reward_funcs import build_reward_funcs

    d = tiny_dirs()
    return GRPOTrainer(model=model or AutoModelForCausalLM.from_pretrained(d["policy"]),
                       reward_funcs=build_reward_funcs(reward_funcs), args=grpo_config(tmp_path, **kw),
                       train_dataset=world_dataset(64), processing_class=load_tokenizer(d["policy"]),
                       peft_config=peft_config)


# ----------------------------------------------------------------------------------------------- tests


def test_group_advantages_zero_mean(tmp_path):
    trainer = grpo_trainer(tmp_path, [low_half, "polite"])
    G = trainer.args.num_generations
    rows = [trainer.train_dataset[i] for i in range(trainer.args.per_device_train_batch_size // G)]
    inputs = [r for r in rows for _ in range(G)]  # what TRL's RepeatSampler hands over: G copies per prompt
    trainer.model.train()
    out = trainer._generate_and_score_completions(inputs)
    adv = out["advantages"].view(-1, G)
    assert adv.shape == (len(rows), G)
    assert torch.allclose(adv.mean(1), torch.zeros(len(rows)), atol=1e-5)
    assert adv.abs().sum() > 0  # the random policy's replies differ, so some groups have signal


def test_kl_zero_at_step_zero(tmp_path):
    from align.logprobs import sample_with_kl
    from align.models import load_tokenizer

    trainer = grpo_trainer(tmp_path, [low_half], beta=0.1, max_steps=1)
    trainer.train()
    first = next(r for r in trainer.state.log_history if "kl" in r)
    assert abs(first["kl"]) < 1e-4  # the loss of step 1 is computed before the first update: pi == pi_ref
    # our own eval-time estimate: the start model against itself (reloaded from disk) is exactly 0
    from transformers import AutoModelForCausalLM

    d = tiny_dirs()
    model = AutoModelForCausalLM.from_pretrained(d["policy"])
    replies, kls = sample_with_kl(model, load_tokenizer(d["policy"]), ["What is 1 + 2?", "Sort the digits 3 1 2."],
                                  d["policy"], max_new_tokens=6)
    assert len(replies) == 2 and max(abs(k) for k in kls) < 1e-4


def test_grpo_raises_mean_reward(tmp_path):
    trainer = grpo_trainer(tmp_path, [low_half], max_steps=12, per_device_train_batch_size=32, num_generations=8)
    trainer.train()
    rewards = [r["reward"] for r in trainer.state.log_history if "reward" in r]
    assert "rewards/low_half/mean" in trainer.state.log_history[0]
    assert "frac_reward_zero_std" in trainer.state.log_history[0]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.05, rewards


@pytest.mark.parametrize("gc", [False, True])
def test_lora_rollouts_go_through_the_fast_loop(tmp_path, monkeypatch, gc):
    # as align.rl.prepare routes them on CUDA: generate is routed before TRL wraps the policy in a PeftModel
    from peft import LoraConfig

    import align.fastgen as F
    from align.models import load

    calls = []
    real = F.fast_generate
    monkeypatch.setattr(F, "fast_generate", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    model = load(tiny_dirs()["policy"])
    assert F.use_fast_generate(model)
    trainer = grpo_trainer(tmp_path, [low_half], model=model, activation_checkpointing=gc,
                           peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    trainer.train()
    assert len(calls) == 2 and all(kw["do_sample"] and kw["max_new_tokens"] == 8 for kw in calls)  # one per step
    lora = [p for n, p in trainer.model.named_parameters() if "lora_B" in n]
    assert lora and any(p.abs().sum() > 0 for p in lora)  # the adapters trained


def test_grpo_command_with_lora_rm_and_eval(tmp_path):
    import importlib.util

    from align.grpo import main

    d = tiny_dirs()
    out = tmp_path / "run"
    has_rm = importlib.util.find_spec("align.score") is not None  # align/score.py is written concurrently
    rm = ["--reward_model_path", d["rm"], "--reward_funcs", "[correct, polite, rm]", "--reward_weights",
          "[1.0, 0.5, 0.1]"] if has_rm else []
    summary = main([
        "configs/grpo.yaml", "--output_dir", str(out), "--model_name_or_path", d["policy"], *rm,
        "--use_peft", "true", "--lora_r", "4", "--lora_target_modules", "[q_proj, v_proj]", "--beta", "0.05",
        "--max_steps", "2", "--per_device_train_batch_size", "8", "--num_generations", "4",
        "--max_completion_length", "6", "--save_steps", "1", "--num_prompts", "32", "--eval_num_prompts", "12",
        "--eval_kl_prompts", "6", "--eval_max_new_tokens", "6", "--seed", "0",
    ])
    ev = summary.eval
    keys = ["exact_match", "exact_match_sampled", "preferred_rate", "kl_to_reference", "reward/correct",
            "reward/polite"] + (["mean_rm_reward"] if has_rm else [])
    for k in keys:
        assert k in ev and k in summary.before, k
    assert abs(summary.before["kl_to_reference"]) < 1e-6
    assert json.loads((out / "eval.json").read_text())["before"] is not None
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("rewards/correct/mean" in r and "frac_reward_zero_std" in r for r in rows)
    assert not has_rm or any("rewards/rm/mean" in r for r in rows)
    assert (out / "final" / "config.json").exists() and not (out / "final" / "adapter_config.json").exists()
    assert (out / "rl_curves.png").exists() and (out / "eval.png").exists()


def test_grpo_command_without_rm_on_fresh_words(tmp_path):
    from align.data.world import fresh_words
    from align.grpo import main
    from align.rl import prompt_dataset

    d = tiny_dirs()
    summary = main([
        "configs/grpo.yaml", "--output_dir", str(tmp_path), "--model_name_or_path", d["policy"],
        "--max_steps", "1", "--per_device_train_batch_size", "8", "--num_generations", "4",
        "--max_completion_length", "4", "--num_prompts", "16", "--eval_num_prompts", "4", "--eval_kl_prompts", "2",
        "--eval_max_new_tokens", "4", "--eval_before", "false", "--world_fresh_words", "100",
    ])
    assert summary.before is None and "exact_match" in summary.eval
    rows = prompt_dataset("world", 90, 0, fresh_words=100).to_list()
    assert {"task", "answer"} <= set(rows[0])
    words = {w.strip("?.:") for r in rows for w in r["prompt"][0]["content"].split()}
    assert words & set(fresh_words(100))


def test_use_liger_kernel_reaches_the_decoder_of_an_rl_run():
    # --use_liger_kernel true (a GPU with liger-kernel) gives GRPO/PPO the decoder's fused path, as align.sft does
    from types import SimpleNamespace

    from trl import ModelConfig

    from align.rl import RLArguments, prepare

    d = tiny_dirs()
    for on in (False, True):
        args = SimpleNamespace(use_liger_kernel=on, reward_weights=None, seed=0)  # the GRPOConfig fields it reads
        setup = prepare(RLArguments(num_prompts=4), ModelConfig(model_name_or_path=d["policy"], dtype="float32"), args)
        norms = [m.liger for m in setup.model.modules() if hasattr(m, "liger")]
        assert setup.model.config.use_liger_kernel is on and norms and all(x is on for x in norms)


def test_rollouts_route_through_fastgen_on_cuda(monkeypatch):
    # prepare routes the policy's generate on CUDA, compiled where asked (--compile_rollouts true)
    from types import SimpleNamespace

    from trl import ModelConfig

    import align.fastgen as F
    from align.rl import RLArguments, prepare

    routed = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(F, "use_fast_generate",
                        lambda model, compile=False, dtype=None: routed.append((compile, dtype)) or True)
    d = tiny_dirs()
    for on in (False, True):  # the rollouts run in the trainer's mixed precision (the LoRA policy's too)
        prepare(RLArguments(num_prompts=4, compile_rollouts=on),
                ModelConfig(model_name_or_path=d["policy"], dtype="float32"),
                SimpleNamespace(use_liger_kernel=False, reward_weights=None, seed=0, bf16=on, fp16=False))
    assert routed == [(False, None), (True, torch.bfloat16)]


def test_grpo_on_a_preference_file_holds_out_prompts_and_scores_them_by_the_rm(tmp_path):
    from align.data.prompts import prompt_hash, split_of
    from align.grpo import main
    from align.rl import file_prompts, prompt_dataset

    d = tiny_dirs()
    pairs = tmp_path / "pairs.jsonl"
    with pairs.open("w") as f:
        for i in range(60):
            f.write(json.dumps({"prompt": f"Say something about {i}.", "chosen": "Yes.", "rejected": "No."}) + "\n")
    train = prompt_dataset(str(pairs), 0, 0, test_fraction=0.2).to_list()
    test = file_prompts(str(pairs), "test", 0.2)
    assert train and test and len(train) + len(test) == 60
    assert not {prompt_hash(r["prompt"]) for r in train} & {prompt_hash(r["prompt"]) for r in test}
    assert all(split_of(r["prompt"], 0.2) == "test" for r in test)
    summary = main([
        "configs/grpo.yaml", "--output_dir", str(tmp_path / "run"), "--model_name_or_path", d["policy"],
        "--dataset_name", str(pairs), "--test_fraction", "0.2", "--reward_funcs", "[rm, length]",
        "--reward_weights", "[1.0, 0.1]", "--reward_model_path", d["rm"], "--max_steps", "1",
        "--per_device_train_batch_size", "8", "--num_generations", "4", "--max_completion_length", "4",
        "--eval_num_prompts", "5", "--eval_max_new_tokens", "4",
    ])
    for ev in (summary.before, summary.eval):  # the held-out prompts' rewards and KL; no world checks
        assert ev["num_prompts"] == min(5, len(test)) and "exact_match" not in ev
        assert {"reward/rm", "reward/length", "mean_rm_reward", "kl_to_reference", "mean_length"} <= set(ev)
    assert abs(summary.before["kl_to_reference"]) < 1e-6
    assert summary.eval["samples"][0]["prompt"] == test[0]["prompt"]


def test_missing_reward_model_dir_says_which_command(tmp_path):
    from align.grpo import main

    d = tiny_dirs()
    with pytest.raises(FileNotFoundError, match=r"python -m align\.reward configs/reward\.yaml"):
        main(["configs/grpo.yaml", "--output_dir", str(tmp_path), "--model_name_or_path", d["policy"],
              "--reward_model_path", str(tmp_path / "nope"), "--reward_funcs", "[correct, rm]",
              "--reward_weights", "[1.0, 1.0]"])


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_use_vllm_without_vllm_fails_before_any_work(tmp_path):
    from align.grpo import main

    with pytest.raises(ImportError, match=r"use_vllm: true needs vLLM.*use_vllm: false"):
        main(["configs/grpo.yaml", "--output_dir", str(tmp_path / "run"), "--model_name_or_path", tiny_dirs()["policy"],
              "--use_vllm", "true"])
    assert not (tmp_path / "run").exists()


def test_failing_reward_names_reward_and_sample(tmp_path):
    from align.reward_funcs import RewardError

    def flaky(prompts, completions, completion_ids=None, **kw):
        return [float("nan")] + [1.0] * (len(completions) - 1)

    trainer = grpo_trainer(tmp_path, [flaky], max_steps=1)
    with pytest.raises(RewardError, match=r"reward 'flaky' returned nan for sample 0"):
        trainer.train()


def test_reward_weights_must_match(tmp_path):
    from align.grpo import main

    d = tiny_dirs()
    with pytest.raises(ValueError, match="reward_weights has 1 values for 2 reward_funcs"):
        main(["configs/grpo.yaml", "--output_dir", str(tmp_path), "--model_name_or_path", d["policy"],
              "--reward_weights", "[1.0]"])
