"""Supervised fine-tuning: ``python -m align.sft configs/sft.yaml [--key value ...]``.

TRL's ``SFTTrainer`` on conversations with assistant-only loss: the chat template wraps each assistant
turn (with its end token) in ``{% generation %}`` markers, and every other token gets label -100.
Works on our decoder or any HF causal LM dir, with LoRA through ``use_peft``. Data: the built-in
world, or JSON/JSONL files in ``messages``, prompt/completion or Alpaca form, or a ``datasets`` dir.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from trl import ModelConfig, SFTConfig, SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from align.config import parse, run_command
from align.data.formats import location, read_records, to_conversation
from align.data.world import World
from align.evaluate import evaluate
from align.models import check_exists, load, load_tokenizer, peft_config, use_liger_kernel
from align.runs import MetricsCallback, setup_logging
from align.stage import StageResult, log_figures, run_stage

logger = logging.getLogger("align.sft")


@dataclass
class SFTArguments:
    dataset_name: str = field(
        default="world",
        metadata={"help": "'world' (built-in conversations), a JSON/JSONL(.gz) file or a datasets dir."},
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer dir; defaults to model_name_or_path's."}
    )
    world_seed: int = field(default=0, metadata={"help": "Seed of the built-in world."})
    world_correct_fraction: float = field(
        default=1.0,
        metadata={"help": "Share of the world's demonstrations with the right answer; the rest are plausible "
                          "mistakes, as in human-written demonstrations. SFT imitates them; RL can remove them."},
    )
    eval_num_prompts: int = field(
        default=300, metadata={"help": "Held-out world prompts for eval.json (0 skips the world evaluation)."}
    )
    eval_max_new_tokens: int = field(default=32, metadata={"help": "Generation length in the evaluation."})

    def __post_init__(self):
        if self.eval_num_prompts < 0:
            raise ValueError(f"eval_num_prompts must be >= 0, got {self.eval_num_prompts}")
        if not 0.0 <= self.world_correct_fraction <= 1.0:
            raise ValueError(f"world_correct_fraction must be in [0, 1], got {self.world_correct_fraction}")


CONFIG_TYPES = (SFTArguments, ModelConfig, SFTConfig)


def load_dataset(args: SFTArguments) -> Dataset:
    if args.dataset_name == "world":
        convs = [c["messages"] for c in World(seed=args.world_seed).sft_conversations(args.world_correct_fraction)]
    else:
        path = args.dataset_name
        convs = [to_conversation(r, location(path, key)) for key, r in read_records(path)]
    return Dataset.from_list([{"messages": m} for m in convs])


def count_truncated(dataset: Dataset, tokenizer, max_length: int | None) -> int:
    """How many conversations are longer than max_length (TRL truncates them; we say so)."""
    if not max_length:
        return 0
    texts = [tokenizer.apply_chat_template(m, tokenize=False) for m in dataset["messages"]]
    return sum(len(ids) > max_length for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])


@dataclass
class PackedRowsCollator(DataCollatorForLanguageModeling):
    """Batches of packed rows (B, max_length) whose conversations cannot see each other.

    With ``packing: true`` (bfd) TRL flattens the whole batch into one row and relies on flash-attention's
    varlen kernels to keep sequences apart; under SDPA or eager attention that one row costs
    (B * max_length)^2 attention. Here the rows stay rows: position_ids restart at every conversation and
    there is no attention_mask, so transformers builds a block-diagonal causal mask per row
    (``masking_utils.find_packed_sequence_indices``). Same loss as unpacked, no padding waste. Holds for
    models whose masks come from ``create_causal_mask`` (ours, Llama, Qwen2, Mistral, ... in transformers 5).
    """

    return_position_ids: bool = True

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super().torch_call(examples)
        del batch["attention_mask"]  # a 2D mask would switch off the packed-sequence detection
        return batch


def train(args: SFTArguments, model_args: ModelConfig, training_args: SFTConfig) -> StageResult:
    start = check_exists(model_args.model_name_or_path)
    tokenizer = load_tokenizer(args.tokenizer_name_or_path or start)
    dataset = load_dataset(args)
    torch.manual_seed(training_args.seed)
    model = load(start, dtype=model_args.dtype, attn_implementation=model_args.attn_implementation)
    use_liger_kernel(model, training_args.use_liger_kernel)
    truncated = count_truncated(dataset, tokenizer, training_args.max_length)
    if truncated:
        logger.warning(
            "%d of %d conversations are longer than max_length=%d and are truncated",
            truncated, len(dataset), training_args.max_length,
        )

    def make_trainer() -> SFTTrainer:
        out = Path(training_args.output_dir)
        trainer = SFTTrainer(
            model=model, args=training_args, train_dataset=dataset, processing_class=tokenizer,
            peft_config=peft_config(model_args, model), callbacks=[MetricsCallback(out, title=f"sft {out.name}")],
        )
        flash = "flash" in str(trainer.model.config._attn_implementation)
        if training_args.packing and trainer.padding_free and not flash:
            trainer.data_collator = PackedRowsCollator(pad_token_id=tokenizer.pad_token_id)
            logger.info("packing: %d conversations in %d rows of <= %d tokens, no attention across conversations",
                        len(dataset), len(trainer.train_dataset), training_args.max_length)
        return trainer

    def evaluate_world(policy, before):
        return evaluate(policy, tokenizer, num_prompts=args.eval_num_prompts,
                        max_new_tokens=args.eval_max_new_tokens, seed=training_args.seed)

    return run_stage(
        "sft", (args, model_args, training_args), make_trainer, tokenizer, start=start,
        evaluate=evaluate_world if args.eval_num_prompts else None,
        data={"examples": len(dataset), "truncated": truncated},
        log=lambda r: log_figures(r, ("exact_match", "exact_match_sampled", "preferred_rate")),
    )


def main(argv: list[str] | None = None) -> StageResult:
    setup_logging()
    return train(*parse(CONFIG_TYPES, argv))


if __name__ == "__main__":
    run_command(main)
