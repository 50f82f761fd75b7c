"""What the RL commands (GRPO, PPO) share: their prompts, rewards, start policy and evaluation.

``prepare(args, model_args, training_args)`` checks the inputs (the start model, the reward models, the reward
weights) before anything is written, loads the tokenizer and the start policy, builds the rewards and the
prompt dataset (a data file's held-out prompts left out); ``evaluator(...)`` is the stage's evaluation for
``align.stage.run_stage``: on held-out world prompts, exact match, preferred rate, each reward's mean and the KL to
the start policy on sampled replies; on a file's held-out prompts, the rewards' means (the reward model's too) and
the KL.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

from align import reward_funcs as R
from align.data import world
from align.data.prompts import as_messages, prompt_hash, split_of
from align.distributed import zero3_init_disabled
from align.evaluate import evaluate_policy, reply_figures
from align.generate import read_prompts
from align.model import DecoderPreTrainedModel
from align.models import check_exists, load, load_tokenizer, use_liger_kernel
from align.runs import plot_metrics
from align.stage import StageResult, log_figures

logger = logging.getLogger("align.rl")

# The curves the RL commands plot in rl_curves.png (TRL's GRPO names and align.ppo's names).
CURVES = ("reward", "kl", "entropy", "frac_reward_zero_std", "objective/scores", "objective/kl", "objective/entropy",
          "policy/entropy_avg", "objective/kl_coef")
FIGURES = ("exact_match", "exact_match_sampled", "answer_match", "answer_match_sampled", "maj_at_k", "pass_at_k",
           "preferred_rate", "kl_to_reference", "mean_rm_reward")


@dataclass
class RLArguments:
    """What GRPO and PPO share: the prompts, the rewards and the before/after evaluation."""

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
    test_fraction: float = field(
        default=0.05,
        metadata={"help": "File data: share of prompts held out by a hash of the prompt (align.data.prompts.split_of, "
                          "the reward model's and DPO's rule): never trained on, the evaluation's prompts."},
    )
    eval_num_prompts: int = field(
        default=300, metadata={"help": "Held-out prompts for the before/after evaluation (0 skips it): the world's "
                                       "(exact match, ...) or, for file data, the held-out prompts (rewards, KL)."}
    )
    eval_kl_prompts: int = field(
        default=100, metadata={"help": "Held-out prompts whose sampled replies measure the KL and mean rewards."}
    )
    eval_max_new_tokens: int = field(default=32, metadata={"help": "Generation length in the evaluation."})
    eval_before: bool = field(default=True, metadata={"help": "Also evaluate the start model (eval.json 'before')."})
    compile_rollouts: bool = field(
        default=False,
        metadata={"help": "On CUDA, also run the rollouts' decode step through torch.compile: tens of seconds per new "
                          "batch shape, then 20-40% less time generating (docs/benchmarks.md, GRPO)."},
    )

    def __post_init__(self):
        for name in ("num_prompts", "world_fresh_words", "eval_num_prompts", "eval_kl_prompts", "length_target",
                     "rm_uncertainty_penalty"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.test_fraction < 1:
            raise ValueError(f"test_fraction must be in [0, 1), got {self.test_fraction}")
        if isinstance(self.reward_funcs, str):
            self.reward_funcs = [self.reward_funcs]
        if not self.reward_funcs:
            raise ValueError(f"reward_funcs is empty; choose from {list(R.BUILTIN_REWARDS)}")
        for n in self.reward_funcs:
            if n not in R.BUILTIN_REWARDS and ":" not in n:
                raise ValueError(f"reward_funcs: unknown {n!r}; choose from {list(R.BUILTIN_REWARDS)} or "
                                 "module:function")



def prompt_dataset(dataset_name: str, num_prompts: int, world_seed: int, fresh_words: int = 0,
                   test_fraction: float = 0.0) -> Dataset:
    """Conversational training prompts with their extra columns (``task``, ``answer`` for the world); a file's
    held-out prompts (``test_fraction``) are left out."""
    if dataset_name == "world":
        exs = world.World(world_seed, n_rl=max(num_prompts, 1)).rl_prompts(num_prompts, fresh_words)
        return Dataset.from_list(
            [{"prompt": [{"role": "user", "content": e.prompt}], "task": e.task, "answer": e.answer} for e in exs]
        )
    rows = file_prompts(dataset_name, "train", test_fraction)
    if not rows:
        raise ValueError(f"{dataset_name}: no training prompts (test_fraction {test_fraction})")
    return Dataset.from_list(rows[: num_prompts or None])


def file_prompts(dataset_name: str, split: str, test_fraction: float) -> list[dict[str, Any]]:
    """A data file's records in ``split`` ("train" / "test", by prompt hash), each with a conversational ``prompt``,
    once per distinct prompt (a preference file repeats a prompt for each of its pairs)."""
    rows, seen = [], set()
    for rec, prompt in read_prompts(dataset_name):
        messages = as_messages(prompt)
        h = prompt_hash(messages)
        if h not in seen and split_of(messages, test_fraction) == split:
            seen.add(h)
            rows.append({**rec, "prompt": messages})
    return rows


def heldout_examples(world_seed: int, n: int) -> list[world.Example]:
    return world.World(world_seed, n_heldout=max(n, 1)).eval_prompts(n)


@dataclass
class RLSetup:
    """The start policy, its tokenizer, the rewards and the prompts of an RL run."""

    start: str
    tokenizer: PreTrainedTokenizerBase
    model: PreTrainedModel
    reward_funcs: list
    dataset: Dataset


def cudnn_attention_guard(model: torch.nn.Module | None) -> None:
    """Left-padded prompts give query rows that see no key; cuDNN's SDPA backward returns NaN for them (bf16,
    T % 128 == 64: https://github.com/pytorch/pytorch/issues/196678, seen with HF Llama on an H200). The align
    decoder avoids such rows itself; a run that trains any other model gets the other SDPA kernels."""
    if (model is not None and not isinstance(model, DecoderPreTrainedModel) and torch.cuda.is_available()
            and torch.backends.cuda.cudnn_sdp_enabled()):
        torch.backends.cuda.enable_cudnn_sdp(False)
        logger.info("cuDNN attention off (pytorch#196678): flash/memory-efficient SDPA instead")


def prepare(args: RLArguments, model_args: Any, training_args: Any) -> RLSetup:
    """Check the inputs (in the order a user makes them), then load the start policy, rewards and prompts."""
    start = check_exists(model_args.model_name_or_path)
    if "rm" in args.reward_funcs or args.reward_model_path:
        R.reward_model_dirs(args.reward_model_path)
    R.validate_weights(args.reward_funcs, training_args.reward_weights)
    tokenizer = load_tokenizer(args.tokenizer_name_or_path or start)
    with zero3_init_disabled():  # a reward model is a plain callable: whole on every process, even under ZeRO-3
        reward_funcs = R.build_reward_funcs(args.reward_funcs, args.reward_model_path,
                                            length_target=args.length_target,
                                            rm_uncertainty_penalty=args.rm_uncertainty_penalty)
    dataset = prompt_dataset(args.dataset_name, args.num_prompts, args.world_seed, args.world_fresh_words,
                             args.test_fraction)
    torch.manual_seed(training_args.seed)
    model = load(start, dtype=model_args.dtype, attn_implementation=model_args.attn_implementation)
    use_liger_kernel(model, training_args.use_liger_kernel)  # align's decoder; TRL/transformers patch HF models
    cudnn_attention_guard(model)
    # rollouts: static cache + CUDA-graph decode, LoRA too (the trainer's PeftModel reaches this model's generate);
    # not under ZeRO-3, which gathers the weights anew for each generate
    if torch.cuda.is_available() and not is_deepspeed_zero3_enabled():
        from align.fastgen import use_fast_generate

        amp = torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else None
        if use_fast_generate(model, compile=args.compile_rollouts, dtype=amp):
            logger.info("rollouts through align.fastgen (static KV cache, CUDA-graph decode%s)",
                        ", compiled" if args.compile_rollouts else "")
    return RLSetup(start, tokenizer, model, reward_funcs, dataset)


def evaluator(args: RLArguments, setup: RLSetup, seed: int):
    """The before/after evaluation (None when ``eval_num_prompts`` is 0): on held-out world prompts, exact match and
    the rest (:func:`align.evaluate.evaluate_policy`); on a data file's held-out prompts, each reward's mean (the
    reward model's too, where given) and the KL on sampled replies, since the world's checks mean nothing there.
    The KL is to the start policy, read from its dir."""
    if not args.eval_num_prompts:
        return None
    with zero3_init_disabled():  # whole on every process: rank 0 evaluates alone after training
        funcs = R.eval_reward_funcs(args.reward_funcs, args.reward_model_path, args.length_target)
    if args.dataset_name == "world":
        examples = heldout_examples(args.world_seed, args.eval_num_prompts)

        def evaluate(policy: PreTrainedModel, before: dict | None) -> dict[str, Any]:
            ref = None if before is None else setup.start
            return evaluate_policy(policy, setup.tokenizer, examples, funcs, ref, kl_prompts=args.eval_kl_prompts,
                                   max_new_tokens=args.eval_max_new_tokens, seed=seed)

        return evaluate

    rows = file_prompts(args.dataset_name, "test", args.test_fraction)[: args.eval_num_prompts]
    if not rows:
        logger.warning("%s has no held-out prompts (test_fraction %s): no evaluation", args.dataset_name,
                       args.test_fraction)
        return None
    prompts = [r["prompt"] for r in rows]
    columns = {k: [r.get(k) for r in rows] for k in rows[0] if k != "prompt"}

    def evaluate_file(policy: PreTrainedModel, before: dict | None) -> dict[str, Any]:
        t0 = time.time()
        ref = None if before is None else setup.start
        ev, replies = reply_figures(policy, setup.tokenizer, prompts, columns, funcs, ref,
                                    max_new_tokens=args.eval_max_new_tokens, seed=seed)
        lengths = [len(setup.tokenizer(r, add_special_tokens=False)["input_ids"]) for r in replies]
        return {"num_prompts": len(prompts), **ev, "mean_length": sum(lengths) / len(lengths),
                "seconds": round(time.time() - t0, 1),
                "samples": [{"prompt": p, "sampled": r} for p, r in list(zip(prompts, replies))[:8]]}

    return evaluate_file


def log_run(result: StageResult) -> None:
    """Before/after bars, the reward/KL/entropy curves and one log line per figure."""
    from align.evaluate import compare_plot

    title = f"{result.stage} {result.output_dir.name}"
    if result.eval is not None and result.before is not None:
        compare_plot({"before": result.before, "after": result.eval}, result.output_dir / "eval.png", title=title)
    plot_metrics(result.output_dir / "metrics.jsonl", result.output_dir / "rl_curves.png", keys=CURVES,
                 title=f"{title}: reward, KL, entropy")
    log_figures(result, FIGURES + tuple(k for k in result.eval or {} if k.startswith("reward/")) + ("mean_length",))
