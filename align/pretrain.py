"""Pretraining: ``python -m align.pretrain configs/pretrain.yaml [--key value ...]``.

A ``DecoderForCausalLM`` built from ``model_config`` in the YAML (or any HF causal LM dir to continue
from), documents packed into fixed-length blocks with eos separators, on transformers' ``Trainer``.
Only the tail of the last block is padding, and padding carries label -100 so the loss ignores it.
Re-running a killed command resumes from its last checkpoint.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainingArguments
from trl import ModelConfig

from align.config import parse, run_command
from align.data.world import World
from align.distributed import save_final
from align.model import DecoderConfig, DecoderForCausalLM
from align.models import load, load_tokenizer, use_attention, use_liger_kernel
from align.runs import MetricsCallback, resume_checkpoint, setup_logging, write_config, write_json

logger = logging.getLogger("align.pretrain")


@dataclass
class PretrainArguments:
    dataset_name: str = field(
        default="world",
        metadata={"help": "'world' (the built-in task world's corpus), a .txt/.json/.jsonl(.gz) file "
                          "or a datasets dir."},
    )
    text_field: str = field(default="text", metadata={"help": "Field holding the text in JSON records / datasets."})
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer dir or hub id; defaults to model_name_or_path's."}
    )
    model_config: dict | None = field(
        default=None,
        metadata={"help": "DecoderConfig fields for a new model (used when model_name_or_path is empty)."},
    )
    block_size: int = field(default=128, metadata={"help": "Tokens per packed training block."})
    eval_fraction: float = field(default=0.02, metadata={"help": "Share of blocks held out for eval_loss."})
    world_seed: int = field(default=0, metadata={"help": "Seed of the built-in world's corpus."})

    def __post_init__(self):
        if self.block_size < 2:
            raise ValueError(f"block_size must be >= 2, got {self.block_size}")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")


CONFIG_TYPES = (PretrainArguments, ModelConfig, TrainingArguments)


def pack(token_lists: list[list[int]], block_size: int, eos_id: int, pad_id: int) -> list[dict[str, list[int]]]:
    """Concatenate documents with eos between them and cut into blocks; pad the last block, label -100 there."""
    stream: list[int] = []
    for ids in token_lists:
        stream.extend(ids)
        stream.append(eos_id)
    blocks = []
    for start in range(0, len(stream), block_size):
        ids = stream[start : start + block_size]
        n_pad = block_size - len(ids)
        blocks.append(
            {
                "input_ids": ids + [pad_id] * n_pad,
                "attention_mask": [1] * len(ids) + [0] * n_pad,
                "labels": ids + [-100] * n_pad,
            }
        )
    return blocks


def load_corpus(args: PretrainArguments) -> list[str]:
    from align.tokenizer import iter_corpus

    if args.dataset_name == "world":
        return World(seed=args.world_seed).pretrain_corpus()
    return list(iter_corpus(args.dataset_name, text_field=args.text_field))


def build_model(args: PretrainArguments, model_args: ModelConfig, tokenizer) -> torch.nn.Module:
    if model_args.model_name_or_path:
        return load(model_args.model_name_or_path, dtype=model_args.dtype,
                    attn_implementation=model_args.attn_implementation)
    cfg = dict(args.model_config or {})
    cfg.setdefault("max_position_embeddings", args.block_size)
    config = DecoderConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **cfg,
    )
    model = DecoderForCausalLM(config)
    use_attention(model, model_args.attn_implementation)
    return model


class _Blocks(torch.utils.data.Dataset):
    def __init__(self, blocks):
        self.blocks = blocks

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, i):
        return {k: torch.tensor(v) for k, v in self.blocks[i].items()}


def train(args: PretrainArguments, model_args: ModelConfig, training_args: TrainingArguments) -> dict[str, Any]:
    """Pretrain and write ``output_dir`` (config, metrics, plot, checkpoints, final/). Returns the summary."""
    tok_path = args.tokenizer_name_or_path or model_args.model_name_or_path
    if not tok_path:
        raise ValueError("pretrain needs tokenizer_name_or_path (or model_name_or_path): "
                         "run `python -m align.tokenizer` first")
    tokenizer = load_tokenizer(tok_path)
    torch.manual_seed(training_args.seed)
    model = build_model(args, model_args, tokenizer)
    use_liger_kernel(model, training_args.use_liger_kernel)
    out = Path(training_args.output_dir)
    write_config(out, args, model_args, training_args)

    texts = load_corpus(args)
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    blocks = pack(encoded, args.block_size, tokenizer.eos_token_id, tokenizer.pad_token_id)
    g = torch.Generator().manual_seed(training_args.seed)
    perm = torch.randperm(len(blocks), generator=g).tolist()
    n_eval = int(len(blocks) * args.eval_fraction)
    eval_blocks = [blocks[i] for i in perm[:n_eval]]
    train_blocks = [blocks[i] for i in perm[n_eval:]]
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(
        "pretraining %.2fM params on %d documents -> %d blocks of %d tokens (%d held out)",
        n_params / 1e6, len(texts), len(blocks), args.block_size, n_eval,
    )

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=_Blocks(train_blocks),
        eval_dataset=_Blocks(eval_blocks) if eval_blocks else None,
        processing_class=tokenizer,
        callbacks=[MetricsCallback(out, title=f"pretrain {out.name}")],
    )
    result = trainer.train(resume_from_checkpoint=resume_checkpoint(out, training_args.resume_from_checkpoint))
    summary: dict[str, Any] = {"train_loss": result.training_loss, "params": n_params, "blocks": len(train_blocks)}
    if eval_blocks:
        summary["eval_loss"] = trainer.evaluate()["eval_loss"]
        summary["eval_perplexity"] = math.exp(min(summary["eval_loss"], 50))
    save_final(trainer, tokenizer, out / "final")
    if trainer.is_world_process_zero():
        write_json(out / "summary.json", summary)
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    setup_logging()
    return train(*parse(CONFIG_TYPES, argv))


if __name__ == "__main__":
    run_command(main)
