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

import contextlib
import importlib.util
import inspect
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase
from trl import GRPOConfig, GRPOTrainer, ModelConfig, get_peft_config

from align import rewards as R
from align.config import parse
from align.data import world
from align.evaluate import compare_plot, evaluate
from align.generate import as_messages, load_tokenizer
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
    reward_funcs: list[str] = field(
        default_factory=lambda: ["correct", "polite"],
        metadata={"help": f"Rewards, combined by reward_weights: any of {list(R.BUILTIN_REWARDS)} or "
                          "package.module:function."},
    )
    reward_model_path: str | None = field(
        default=None,
        metadata={"help": f"Reward model dir for the 'rm' reward (made by `{R.MAKE_REWARD_MODEL}`). When given "
                          "but 'rm' is not in reward_funcs, it is still used in the evaluation."},
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
        for name in ("num_prompts", "eval_num_prompts", "eval_kl_prompts", "length_target"):
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


def prompt_dataset(dataset_name: str, num_prompts: int, world_seed: int) -> Dataset:
    """Conversational prompts with their extra columns (``task``, ``answer`` for the world)."""
    if dataset_name == "world":
        exs = world.World(world_seed, n_rl=max(num_prompts, 1)).rl_prompts(num_prompts)
        return Dataset.from_list(
            [{"prompt": [{"role": "user", "content": e.prompt}], "task": e.task, "answer": e.answer} for e in exs]
        )
    from align.data.formats import location, read_records

    rows = []
    for key, rec in read_records(dataset_name):
        if "prompt" not in rec:
            raise ValueError(f"{location(dataset_name, key)}: record has no 'prompt' field (keys: {sorted(rec)})")
        rows.append({**rec, "prompt": as_messages(rec["prompt"])})
    if not rows:
        raise ValueError(f"{dataset_name}: no prompts")
    return Dataset.from_list(rows[: num_prompts or None])


def heldout_examples(world_seed: int, n: int) -> list[world.Example]:
    return world.World(world_seed, n_heldout=max(n, 1)).eval_prompts(n)


# ----------------------------------------------------------------------------------------------- evaluation


@contextlib.contextmanager
def reference_of(model: torch.nn.Module, ref_path: str | None) -> Iterator[torch.nn.Module]:
    """The reference policy: the same model with its LoRA adapters disabled, else the start model from disk."""
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield model
    elif ref_path is None:
        yield model
    else:
        ref = AutoModelForCausalLM.from_pretrained(ref_path).to(next(model.parameters()).device).eval()
        yield ref
        del ref


def masked_inputs(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, Any]:
    """Forward kwargs for a left-padded batch: position ids that start at 0 on each row's first real token, as
    ``generate`` uses, where the model takes them. RoPE models score the same without them; absolute-position
    ones (GPT-2) need them; some (ALiBi, e.g. BLOOM) take none."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT passes kwargs through
    kw = {"input_ids": input_ids, "attention_mask": attention_mask}
    if "position_ids" in inspect.signature(base.forward).parameters:
        kw["position_ids"] = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
    return kw


def left_pad(ids: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) token ids and attention mask of token lists left-padded to the longest."""
    L = max(map(len, ids))
    q = torch.full((len(ids), L), pad, dtype=torch.long)
    m = torch.zeros_like(q)
    for i, x in enumerate(ids):
        q[i, L - len(x):], m[i, L - len(x):] = torch.tensor(x), 1
    return q, m


def response_logprobs(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, context_length: int,
    temperature: float = 1.0,
) -> torch.Tensor:
    """(B, T) log-probs of the response tokens ``input_ids[:, context_length:]`` under ``model``."""
    logits = model(**masked_inputs(model, input_ids, attention_mask)).logits[:, context_length - 1 : -1]
    logits = logits.float() / temperature
    return torch.gather(logits.log_softmax(-1), 2, input_ids[:, context_length:, None]).squeeze(-1)


@torch.no_grad()
def sample_with_kl(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], ref_path: str | None,
    *, max_new_tokens: int = 32, temperature: float = 1.0, batch_size: int = 50, seed: int = 0,
) -> tuple[list[str], list[float]]:
    """Replies sampled at ``temperature`` and each one's KL(policy || reference) estimate: the sum over its
    tokens of log pi(y_t) - log pi_ref(y_t) (unbiased for samples from pi; 0 when pi == pi_ref)."""
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    replies: list[str] = []
    kls: list[float] = []
    for s in range(0, len(prompts), batch_size):
        texts = [tokenizer.apply_chat_template(as_messages(p), tokenize=False, add_generation_prompt=True)
                 for p in prompts[s : s + batch_size]]
        q, qm = left_pad([tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts], pad)
        q, qm, L = q.to(device), qm.to(device), q.size(1)
        out = model.generate(input_ids=q, attention_mask=qm, max_new_tokens=max_new_tokens, do_sample=True,
                             temperature=temperature, top_k=0, top_p=1.0, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=pad)
        resp = out[:, L:]
        rmask = response_mask(resp, tokenizer.eos_token_id)
        full, fmask = torch.cat([q, resp], 1), torch.cat([qm, rmask], 1)
        lp = response_logprobs(model, full, fmask, L, temperature)
        with reference_of(model, ref_path) as ref:
            ref_lp = response_logprobs(ref, full, fmask, L, temperature)
        kls += ((lp - ref_lp) * rmask).sum(1).tolist()
        replies += [tokenizer.decode(r[m.bool()], skip_special_tokens=True).strip() for r, m in zip(resp, rmask)]
    model.train(was_training)
    return replies, kls


def response_mask(responses: torch.Tensor, eos_token_id: int | None) -> torch.Tensor:
    """(B, T) 1 up to and including the first eos of each response, 0 after it."""
    if eos_token_id is None:
        return torch.ones_like(responses)
    is_eos = (responses == eos_token_id).long()
    after = (is_eos.cumsum(1) - is_eos) > 0  # strictly after the first eos
    return (~after).long()


def rl_evaluate(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, examples: Sequence[world.Example],
    reward_funcs: Sequence[Any], ref_path: str | None, *, kl_prompts: int = 100, max_new_tokens: int = 32,
    seed: int = 0,
) -> dict[str, Any]:
    """``align.evaluate.evaluate`` on held-out prompts, plus on sampled replies to the first ``kl_prompts`` of them:
    ``kl_to_reference`` (mean per-sequence KL) and ``reward/<name>`` (mean of each reward; ``mean_rm_reward``)."""
    t0 = time.time()
    ev = evaluate(model, tokenizer, list(examples), max_new_tokens=max_new_tokens, seed=seed)
    sub = list(examples)[:kl_prompts]
    if sub:
        replies, kls = sample_with_kl(model, tokenizer, [e.prompt for e in sub], ref_path,
                                      max_new_tokens=max_new_tokens, seed=seed)
        ev["kl_to_reference"] = sum(kls) / len(kls)
        cols = {"task": [e.task for e in sub], "answer": [e.answer for e in sub]}
        prompts = [[{"role": "user", "content": e.prompt}] for e in sub]
        for f in reward_funcs:
            vals = f(prompts=prompts, completions=replies, completion_ids=None, **cols)
            ev[f"reward/{f.__name__}"] = sum(vals) / len(vals)
        if "reward/rm" in ev:
            ev["mean_rm_reward"] = ev["reward/rm"]
    ev["seconds"] = round(time.time() - t0, 1)
    return ev


def eval_reward_funcs(names: Sequence[str], reward_model_path: str | None, length_target: int) -> list[Any]:
    """The training rewards plus, when a reward model is given, 'rm' (the 'mean RM reward' of the evaluation)."""
    names = list(names)
    if reward_model_path and "rm" not in names:
        names.append("rm")
    return R.build_reward_funcs(names, reward_model_path, length_target=length_target)


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
        R.check_reward_model_dir(args.reward_model_path)
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

    reward_funcs = R.build_reward_funcs(args.reward_funcs, args.reward_model_path, length_target=args.length_target)
    dataset = prompt_dataset(args.dataset_name, args.num_prompts, args.world_seed)
    examples = heldout_examples(args.world_seed, args.eval_num_prompts) if args.eval_num_prompts else []
    eval_funcs = eval_reward_funcs(args.reward_funcs, args.reward_model_path, args.length_target) if examples else []

    before = None
    resume = resume_checkpoint(out, training_args.resume_from_checkpoint)
    if examples and args.eval_before:
        before_path = out / "eval_before.json"
        if resume and before_path.exists():  # a resumed run keeps the start model's figures
            before = json.loads(before_path.read_text())
        else:
            before = rl_evaluate(model, tokenizer, examples, eval_funcs, None, kl_prompts=args.eval_kl_prompts,
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
        after = rl_evaluate(policy, tokenizer, examples, eval_funcs, ref_path, kl_prompts=args.eval_kl_prompts,
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
    main()
