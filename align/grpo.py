"""GRPO: ``python -m align.grpo configs/grpo.yaml [--key value ...]``.

TRL's ``GRPOTrainer`` (https://huggingface.co/papers/2402.03300) on prompts of the built-in world (or a
JSON/JSONL file of ``prompt`` records with any extra columns), rewarded by ``align.rewards``: rule rewards
(``correct``, ``polite``, ``world``, ``length``), the RM stage's reward model (``rm``) or any importable callable,
combined by ``reward_weights``. TRL logs each reward as ``rewards/<name>/mean``, plus ``reward``, ``kl``,
``entropy``, ``frac_reward_zero_std`` (groups whose replies all got the same reward: no learning signal) and
the clip ratios, to ``metrics.jsonl``.

For each prompt ``num_generations`` replies are sampled (T=``temperature``, at most ``max_completion_length``
tokens, by ``model.generate`` on CPU/GPU, or vLLM with ``use_vllm``); a reply's advantage is its reward minus its
group's mean, divided by the group's std (``scale_rewards``). ``beta`` > 0 adds a KL penalty to the reference:
the adapter-disabled model with LoRA (``use_peft``), else TRL reloads the start model from disk.

Before and after training, held-out world prompts measure exact match (greedy and sampled), preferred rate,
the mean reward of each reward function and the KL to the reference on sampled replies; ``eval.json`` holds the
after figures with ``before`` inside. ``final/`` is a standalone model (LoRA merged).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase
from trl import GRPOConfig, GRPOTrainer, ModelConfig, get_peft_config

from align import rewards as R
from align.config import parse, run_command
from align.data import world
from align.evaluate import compare_plot, eval_reward_funcs, evaluate_policy
from align.generate import as_messages, load_tokenizer, read_prompts
from align.distributed import save_final, zero3_init_disabled
from align.runs import MetricsCallback, plot_metrics, resume_checkpoint, setup_logging, write_config, write_json

logger = logging.getLogger("align.grpo")

# The curves the RL commands plot in rl_curves.png (TRL's GRPO names and align.ppo's names).
CURVES = ("reward", "kl", "entropy", "frac_reward_zero_std", "objective/scores", "objective/kl", "objective/entropy",
          "policy/entropy_avg", "objective/kl_coef")


@dataclass
class GRPOArguments:
    dataset_name: str = field(
        default="world",
        metadata={"help": "'world' (train prompts of the built-in world, with task/answer columns for the rule "
                          "rewards) or a JSON/JSONL file of records with a 'prompt' (string or messages) and any "
                          "extra columns, passed to the reward functions."},
    )
    num_prompts: int = field(default=2000, metadata={"help": "World training prompts (World(seed).rl_prompts(n))."})
    world_seed: int = field(default=0, metadata={"help": "Seed of the built-in world."})
    world_fresh_words: int = field(
        default=0,
        metadata={"help": "Made-up words (world.fresh_words, never held out) that the world's word tasks also draw "
                          "from, so RL learns to handle any word rather than the train words by heart (docs/rl.md)."},
    )
    reward_funcs: list[str] = field(
        default_factory=lambda: ["correct", "polite"],
        metadata={"help": f"Rewards, combined by reward_weights: any of {list(R.BUILTIN_REWARDS)} or "
                          "package.module:function."},
    )
    reward_model_path: str | list[str] | None = field(
        default=None,
        metadata={"help": f"Reward model dir for the 'rm' reward (made by `{R.MAKE_REWARD_MODEL}`), or a list of "
                          "dirs: an ensemble, whose mean is the reward. When given but 'rm' is not in reward_funcs, "
                          "it is still used in the evaluation."},
    )
    rm_uncertainty_penalty: float = field(
        default=0.0,
        metadata={"help": "An ensemble's 'rm' reward is its mean minus this times its members' std: no gain where "
                          "they disagree (Coste et al. 2023, https://arxiv.org/abs/2310.02743). 0: the mean."},
    )
    length_target: int = field(default=16, metadata={"help": "Tokens the 'length' reward allows before penalising."})
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer dir; defaults to model_name_or_path's."}
    )
    eval_num_prompts: int = field(
        default=300, metadata={"help": "Held-out world prompts for the before/after evaluation (0 skips it)."}
    )
    eval_kl_prompts: int = field(
        default=100, metadata={"help": "Held-out prompts whose sampled replies measure the KL and mean rewards."}
    )
    eval_max_new_tokens: int = field(default=32, metadata={"help": "Generation length in the evaluation."})
    eval_before: bool = field(default=True, metadata={"help": "Also evaluate the start model (eval.json 'before')."})

    def __post_init__(self):
        for name in ("num_prompts", "world_fresh_words", "eval_num_prompts", "eval_kl_prompts", "length_target",
                     "rm_uncertainty_penalty"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if isinstance(self.reward_funcs, str):
            self.reward_funcs = [self.reward_funcs]
        if not self.reward_funcs:
            raise ValueError(f"reward_funcs is empty; choose from {list(R.BUILTIN_REWARDS)}")
        for n in self.reward_funcs:
            if n not in R.BUILTIN_REWARDS and ":" not in n:
                raise ValueError(f"reward_funcs: unknown {n!r}; choose from {list(R.BUILTIN_REWARDS)} or module:function")


CONFIG_TYPES = (GRPOArguments, ModelConfig, GRPOConfig)


# ----------------------------------------------------------------------------------------------- data


def prompt_dataset(dataset_name: str, num_prompts: int, world_seed: int, fresh_words: int = 0) -> Dataset:
    """Conversational prompts with their extra columns (``task``, ``answer`` for the world)."""
    if dataset_name == "world":
        exs = world.World(world_seed, n_rl=max(num_prompts, 1)).rl_prompts(num_prompts, fresh_words)
        return Dataset.from_list(
            [{"prompt": [{"role": "user", "content": e.prompt}], "task": e.task, "answer": e.answer} for e in exs]
        )
    rows = [{**rec, "prompt": as_messages(prompt)} for rec, prompt in read_prompts(dataset_name)]
    if not rows:
        raise ValueError(f"{dataset_name}: no prompts")
    return Dataset.from_list(rows[: num_prompts or None])


def heldout_examples(world_seed: int, n: int) -> list[world.Example]:
    return world.World(world_seed, n_heldout=max(n, 1)).eval_prompts(n)


# ----------------------------------------------------------------------------------------------- evaluation


def finish_run(name: str, out: Path, before: dict | None, after: dict | None, summary: dict[str, Any]) -> dict[str, Any]:
    """eval.json (after + before), before/after bars, the reward/KL/entropy curves, summary.json."""
    title = f"{name} {out.name}"
    if after is not None:
        write_json(out / "eval.json", {**after, "before": before})
        if before is not None:
            compare_plot({"before": before, "after": after}, out / "eval.png", title=title)
        log_eval(name, before, after)
        summary["eval"] = {**after, "before": before}
    plot_metrics(out / "metrics.jsonl", out / "rl_curves.png", keys=CURVES, title=f"{title}: reward, KL, entropy")
    write_json(out / "summary.json", {k: v for k, v in summary.items() if k != "eval"})
    return summary


def log_eval(name: str, before: dict | None, after: dict) -> None:
    def f(d, k):
        return f"{d[k]:.3f}" if d and isinstance(d.get(k), (int, float)) else "-"

    for k in ("exact_match", "exact_match_sampled", "maj_at_k", "pass_at_k", "preferred_rate", "kl_to_reference",
              "mean_rm_reward"):
        logger.info("%s %-20s before %s  after %s", name, k, f(before, k), f(after, k))


# ----------------------------------------------------------------------------------------------- training


@dataclass
class RunSetup:
    """What GRPO and PPO prepare alike before their trainer: the start policy, rewards, data, evaluation."""

    out: Path
    tokenizer: PreTrainedTokenizerBase
    model: PreTrainedModel
    reward_funcs: list
    dataset: Dataset
    examples: list
    eval_funcs: list
    resume: str | None
    before: dict | None
    t0: float


def prepare_run(name: str, args: GRPOArguments, model_args: ModelConfig, training_args: Any) -> RunSetup:
    """Check inputs, load the start policy, build rewards and prompts, and evaluate the start policy
    (a resumed run keeps the figures it wrote first, in eval_before.json)."""
    if not model_args.model_name_or_path:
        raise ValueError(f"{name} needs model_name_or_path: an SFT/DPO run's final/ dir or any HF causal LM dir")
    if not Path(model_args.model_name_or_path).exists():
        raise FileNotFoundError(
            f"model '{model_args.model_name_or_path}' not found: make it with `python -m align.sft configs/sft.yaml`"
        )
    if "rm" in args.reward_funcs or args.reward_model_path:
        R.reward_model_dirs(args.reward_model_path)
    R.validate_weights(args.reward_funcs, training_args.reward_weights)
    if torch.cuda.is_available() and torch.backends.cuda.cudnn_sdp_enabled():
        # Left-padded prompts give query rows that see no key; cuDNN's SDPA backward returns NaN for them
        # (bf16, T % 128 == 64: https://github.com/pytorch/pytorch/issues/196678, seen with HF Llama on an H200).
        # The align decoder avoids such rows itself; other models need the other SDPA kernels.
        torch.backends.cuda.enable_cudnn_sdp(False)
        logger.info("cuDNN attention off for %s (pytorch#196678): flash/memory-efficient SDPA instead", name)
    t0 = time.time()
    out = Path(training_args.output_dir)
    tokenizer = load_tokenizer(args.tokenizer_name_or_path or model_args.model_name_or_path)
    torch.manual_seed(training_args.seed)
    model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, dtype=model_args.dtype)
    write_config(out, args, model_args, training_args)

    reward_funcs = R.build_reward_funcs(args.reward_funcs, args.reward_model_path, length_target=args.length_target,
                                        rm_uncertainty_penalty=args.rm_uncertainty_penalty)
    dataset = prompt_dataset(args.dataset_name, args.num_prompts, args.world_seed, args.world_fresh_words)
    examples = heldout_examples(args.world_seed, args.eval_num_prompts) if args.eval_num_prompts else []
    eval_funcs = eval_reward_funcs(args.reward_funcs, args.reward_model_path, args.length_target) if examples else []

    before = None
    resume = resume_checkpoint(out, training_args.resume_from_checkpoint)
    if examples and args.eval_before:
        before_path = out / "eval_before.json"
        if resume and before_path.exists():  # a resumed run keeps the start model's figures
            before = json.loads(before_path.read_text())
        else:
            before = evaluate_policy(model, tokenizer, examples, eval_funcs, None, kl_prompts=args.eval_kl_prompts,
                                     max_new_tokens=args.eval_max_new_tokens, seed=training_args.seed)
            write_json(before_path, before)
    return RunSetup(out, tokenizer, model, reward_funcs, dataset, examples, eval_funcs, resume, before, t0)


def train(args: GRPOArguments, model_args: ModelConfig, training_args: GRPOConfig) -> dict[str, Any]:
    if training_args.use_vllm and importlib.util.find_spec("vllm") is None:  # before any work, not at TRL's init
        raise ImportError("use_vllm: true needs vLLM, which is not installed: pip install 'trl[vllm]' (a CUDA GPU), "
                          "or set use_vllm: false to generate with model.generate")
    run = prepare_run("grpo", args, model_args, training_args)
    out, tokenizer, model, reward_funcs, dataset = run.out, run.tokenizer, run.model, run.reward_funcs, run.dataset
    examples, eval_funcs, resume, before, t0 = run.examples, run.eval_funcs, run.resume, run.before, run.t0
    ref_path = model_args.model_name_or_path

    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        callbacks=[MetricsCallback(out, title=f"grpo {out.name}")],
    )
    t_train = time.time()
    result = trainer.train(resume_from_checkpoint=resume)
    train_seconds = time.time() - t_train

    final = save_final(trainer, tokenizer, out / "final", adapter_dir=out / "adapter")  # merged if LoRA
    if not trainer.is_world_process_zero():
        return {"train_loss": result.training_loss}
    after = None
    if examples:
        with zero3_init_disabled():
            policy = AutoModelForCausalLM.from_pretrained(str(final)).to(trainer.args.device)
        after = evaluate_policy(policy, tokenizer, examples, eval_funcs, ref_path, kl_prompts=args.eval_kl_prompts,
                                max_new_tokens=args.eval_max_new_tokens, seed=training_args.seed)
    return finish_run("grpo", out, before, after, {
        "train_loss": result.training_loss,
        "steps": trainer.state.global_step,
        "prompts": len(dataset),
        "train_seconds": round(train_seconds, 1),
        "wall_seconds": round(time.time() - t0, 1),
        "final": str(final),
    })


def main(argv: list[str] | None = None) -> dict[str, Any]:
    setup_logging()
    return train(*parse(CONFIG_TYPES, argv))


if __name__ == "__main__":
    run_command(main)
