"""PPO: ``python -m align.ppo configs/ppo.yaml [--key value ...]``.

The trainer is ``align.ppo_trainer`` (``PPOTrainer`` beside ``PPOConfig``, the TRL way: the recipe, the value
model and what is logged are documented there). This command starts it from an SFT/DPO policy on the RL
commands' prompts and rewards (``align.rl``), and evaluates the start and the result on held-out world
prompts: ``eval.json`` (with ``before``), ``eval.png``, ``rl_curves.png``; ``final/`` is the policy alone (LoRA
merged), a standalone causal LM. Under ``accelerate launch`` (DDP, DeepSpeed ZeRO-2/3) each process rolls out its share
of the prompts; see docs/distributed.md, "PPO".
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase
from trl import ModelConfig

from align import reward_funcs as R
from align.config import parse, run_command
from align.models import load, load_tokenizer, peft_config
from align.ppo_trainer import PPOConfig, PPOTrainer
from align.rl import RLArguments, cudnn_attention_guard, evaluator, log_run, prepare
from align.runs import MetricsCallback, setup_logging
from align.stage import StageResult, run_stage

logger = logging.getLogger("align.ppo")


@dataclass
class PPOArguments(RLArguments):
    """The RL commands' prompts, rewards and evaluation (``align.rl.RLArguments``) plus the value model."""

    value_model_path: str | None = field(
        default=None,
        metadata={"help": "None: a linear value head on the policy's trunk. A sequence-classification model dir "
                          "(the RM stage's final/, as TRL and Huang et al. 2024 do): a separate value model, its "
                          "score head read at every token. It must share the policy's tokenizer."},
    )


CONFIG_TYPES = (PPOArguments, ModelConfig, PPOConfig)


def load_value_model(path: str | None, tokenizer: PreTrainedTokenizerBase, dtype: Any = None,
                     attn_implementation: str | None = None) -> nn.Module | None:
    """The separate value model at ``path`` (None: the policy gets a value head), checked against the policy's
    tokenizer."""
    if not path:
        return None
    p = R.check_reward_model_dir(path)
    value_tok = load_tokenizer(p)
    if value_tok.get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"value model '{p}' has another tokenizer than the policy ({len(value_tok)} vs "
                         f"{len(tokenizer)} tokens): its values are read at the policy's tokens, so it must share it")
    return load(p, "value", dtype=dtype, key="value_model_path", attn_implementation=attn_implementation)


def train(args: PPOArguments, model_args: ModelConfig, training_args: PPOConfig) -> StageResult:
    run = prepare(args, model_args, training_args)
    value_model = load_value_model(args.value_model_path, run.tokenizer, model_args.dtype,
                                   model_args.attn_implementation)
    cudnn_attention_guard(value_model)  # trained too

    def make_trainer() -> PPOTrainer:
        out = Path(training_args.output_dir)
        return PPOTrainer(
            model=run.model, args=training_args, processing_class=run.tokenizer, reward_funcs=run.reward_funcs,
            train_dataset=run.dataset, peft_config=peft_config(model_args, run.model), value_model=value_model,
            callbacks=[MetricsCallback(out, title=f"ppo {out.name}")],
        )

    return run_stage("ppo", (args, model_args, training_args), make_trainer, run.tokenizer, start=run.start,
                     start_model=run.model if args.eval_before else None,
                     evaluate=evaluator(args, run, training_args.seed), data={"prompts": len(run.dataset)},
                     log=log_run)


def main(argv: list[str] | None = None) -> StageResult:
    setup_logging()
    return train(*parse(CONFIG_TYPES, argv))


if __name__ == "__main__":
    run_command(main)
