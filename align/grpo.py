"""GRPO: ``python -m align.grpo configs/grpo.yaml [--key value ...]``.

TRL's ``GRPOTrainer`` (https://huggingface.co/papers/2402.03300) on prompts of the built-in world (or a
JSON/JSONL file of ``prompt`` records with any extra columns), rewarded by ``align.reward_funcs``: rule rewards
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
import logging
from dataclasses import dataclass
from pathlib import Path

from trl import GRPOConfig, GRPOTrainer, ModelConfig

from align.config import parse, run_command
from align.models import peft_config
from align.rl import RLArguments, evaluator, log_run, prepare
from align.runs import MetricsCallback, setup_logging
from align.stage import StageResult, run_stage

logger = logging.getLogger("align.grpo")


@dataclass
class GRPOArguments(RLArguments):
    """The prompts, rewards and evaluation of an RL run (``align.rl.RLArguments``)."""


CONFIG_TYPES = (GRPOArguments, ModelConfig, GRPOConfig)


def train(args: GRPOArguments, model_args: ModelConfig, training_args: GRPOConfig) -> StageResult:
    if training_args.use_vllm and importlib.util.find_spec("vllm") is None:  # before any work, not at TRL's init
        raise ImportError("use_vllm: true needs vLLM, which is not installed: pip install 'trl[vllm]' (a CUDA GPU), "
                          "or set use_vllm: false to generate with model.generate")
    run = prepare(args, model_args, training_args)

    def make_trainer() -> GRPOTrainer:
        out = Path(training_args.output_dir)
        return GRPOTrainer(
            model=run.model, reward_funcs=run.reward_funcs, args=training_args, train_dataset=run.dataset,
            processing_class=run.tokenizer, peft_config=peft_config(model_args, run.model),
            callbacks=[MetricsCallback(out, title=f"grpo {out.name}")],
        )

    return run_stage("grpo", (args, model_args, training_args), make_trainer, run.tokenizer, start=run.start,
                     start_model=run.model if args.eval_before else None,
                     evaluate=evaluator(args, run, training_args.seed), data={"prompts": len(run.dataset)},
                     log=log_run)


def main(argv: list[str] | None = None) -> StageResult:
    setup_logging()
    return train(*parse(CONFIG_TYPES, argv))


if __name__ == "__main__":
    run_command(main)
