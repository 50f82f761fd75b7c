"""Train a small byte-level BPE tokenizer with the project's special tokens and chat template.

    python -m align.tokenizer configs/tokenizer.yaml [--vocab_size 768 --output_dir runs/tokenizer]

Byte-level (any Unicode round-trips losslessly), digits split one per token, special tokens
`<|bos|> <|eos|> <|pad|> <|unk|> <|system|> <|user|> <|assistant|>` (ids 0-6), the chat template of
`align.data.chat`. The corpus defaults to the built-in task world (pretraining documents + SFT
conversations rendered with the chat template); `corpus` may instead name a text file, a JSON/JSONL
file (records with `text_field`) or a `datasets` directory saved with `save_to_disk`.
Writes a `PreTrainedTokenizerFast` directory (loadable with `AutoTokenizer.from_pretrained`),
`config.yaml` and `stats.json` (bytes per token on English and Chinese text).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from align.data.chat import BOS, CHAT_TEMPLATE, EOS, PAD, SPECIAL_TOKENS, UNK, render_chat

logger = logging.getLogger(__name__)

_HERE = Path(__file__).resolve().parent
ENGLISH_SAMPLE_FILE = _HERE.parent.parent / "shared" / "data" / "pretrain" / "c4_demo.jsonl"
ENGLISH_SAMPLE = (
    "The quick brown fox jumps over the lazy dog. Alignment makes a language model follow "
    "instructions, answer helpfully and refuse harmful requests."
)
CHINESE_SAMPLE = (
    "人工智能是计算机科学的一个分支，它企图了解智能的实质，并生产出一种新的能以人类智能相似的方式"
    "做出反应的智能机器。该领域的研究包括机器人、语言识别、图像识别、自然语言处理和专家系统等。"
)


@dataclass
class TokenizerArguments:
    corpus: str = field(default="world", metadata={
        "help": "'world' (the built-in task world) or a path: .txt, .json/.jsonl (records with "
                "`text_field`), or a `datasets` directory saved with save_to_disk."})
    text_field: str = field(default="text", metadata={"help": "Field holding the text in JSON/JSONL/datasets corpora."})
    vocab_size: int = field(
        default=384, metadata={"help": "Vocabulary size including the 7 special tokens and 256 bytes."})
    min_frequency: int = field(default=2, metadata={"help": "Minimum pair frequency for a BPE merge."})
    output_dir: str = field(default="runs/tokenizer", metadata={"help": "Where the tokenizer is saved."})
    world_seed: int = field(default=0, metadata={"help": "Seed of the built-in world when corpus='world'."})
    max_documents: int = field(default=0, metadata={"help": "Use at most this many documents (0 = all)."})
    model_max_length: int = field(default=128, metadata={"help": "model_max_length written to tokenizer_config.json."})

    def __post_init__(self):
        min_vocab = 256 + len(SPECIAL_TOKENS)
        if self.vocab_size < min_vocab:
            raise ValueError(f"vocab_size must be >= {min_vocab} (256 bytes + specials), got {self.vocab_size}")
        if self.min_frequency < 1:
            raise ValueError(f"min_frequency must be >= 1, got {self.min_frequency}")
        if self.max_documents < 0:
            raise ValueError(f"max_documents must be >= 0, got {self.max_documents}")
        if self.model_max_length < 1:
            raise ValueError(f"model_max_length must be >= 1, got {self.model_max_length}")
        if not self.output_dir:
            raise ValueError("output_dir must be set")
        if self.corpus != "world" and not os.path.exists(self.corpus):
            raise ValueError(f"corpus: no such file or directory: {self.corpus!r} (or use 'world')")


# --------------------------------------------------------------------------------------------------
# Corpora


def world_texts(seed: int = 0) -> list[str]:
    """The built-in world's pretraining documents plus its SFT conversations in chat format."""
    from align.data.world import World

    w = World(seed=seed)
    return w.pretrain_corpus() + [render_chat(c["messages"]) for c in w.sft_conversations()]


def _json_text(record: object, where: str, text_field: str) -> str:
    if not isinstance(record, dict) or text_field not in record:
        raise ValueError(f"{where}: expected an object with field {text_field!r}, got {str(record)[:200]!r}")
    value = record[text_field]
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {text_field!r} must be a string, got {value!r:.200}")
    return value


def iter_corpus(corpus: str, text_field: str = "text", world_seed: int = 0) -> Iterator[str]:
    """Yield the documents of a corpus (see `TokenizerArguments.corpus`)."""
    if corpus == "world":
        yield from world_texts(world_seed)
        return
    path = Path(corpus)
    if path.is_dir():
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        if text_field not in ds.column_names:
            raise ValueError(f"{path}: dataset has no column {text_field!r} (columns: {ds.column_names})")
        yield from ds[text_field]
    elif path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{i}: invalid JSON: {e}: {line[:200]!r}") from None
                    yield _json_text(record, f"{path}:{i}", text_field)
    elif path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):
            data = [data]
        for i, record in enumerate(data):
            yield _json_text(record, f"{path}[{i}]", text_field)
    else:
        yield path.read_text(encoding="utf-8")


# --------------------------------------------------------------------------------------------------
# Training


def build_tokenizer_object() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def wrap(tok: Tokenizer, model_max_length: int = 128) -> PreTrainedTokenizerFast:
    """A `PreTrainedTokenizerFast` with the project's specials and chat template (no BOS is added
    on encode: the chat template emits the only one)."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (BOS, EOS, PAD, UNK)],
        chat_template=CHAT_TEMPLATE,
        padding_side="right",
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


def compression(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> float:
    """UTF-8 bytes per token (higher = better compression)."""
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tokens = sum(len(e.ids) for e in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False))
    return n_bytes / max(n_tokens, 1)


def _english_texts(limit: int = 100) -> list[str]:
    if ENGLISH_SAMPLE_FILE.exists():
        with open(ENGLISH_SAMPLE_FILE, encoding="utf-8") as f:
            return [json.loads(line)["text"] for _, line in zip(range(limit), f)]
    return [ENGLISH_SAMPLE]


def train_tokenizer(args: TokenizerArguments) -> PreTrainedTokenizerFast:
    """Train, save to `args.output_dir` (with stats.json and config.yaml) and return the tokenizer."""
    world = world_texts(args.world_seed) if args.corpus == "world" else None
    texts = iter(world) if world is not None else iter_corpus(args.corpus, args.text_field, args.world_seed)
    if args.max_documents:
        texts = (t for _, t in zip(range(args.max_documents), texts))
    tok = build_tokenizer_object()
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab_size, min_frequency=args.min_frequency, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tokenizer = wrap(tok, args.model_max_length)

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out))
    stats = {
        "vocab_size": len(tokenizer),
        "bytes_per_token": {
            "english_c4_demo": round(compression(tokenizer, _english_texts()), 3),
            "english_sample": round(compression(tokenizer, [ENGLISH_SAMPLE]), 3),
            "chinese_sample": round(compression(tokenizer, [CHINESE_SAMPLE]), 3),
        },
    }
    if world is not None:
        from align.data.world import World

        stats["bytes_per_token"]["world"] = round(compression(tokenizer, world[:: max(1, len(world) // 500)]), 3)
        ev = [e.prompt for e in World(args.world_seed).eval_prompts()]
        stats["bytes_per_token"]["world_heldout_prompts"] = round(compression(tokenizer, ev), 3)
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    _write_config(out, args)
    return tokenizer


def _write_config(out: Path, args: TokenizerArguments) -> None:
    try:
        from align.runs import write_config
    except ImportError:
        import yaml

        (out / "config.yaml").write_text(yaml.safe_dump(asdict(args), sort_keys=False))
    else:
        write_config(out, args)


CONFIG_TYPES = (TokenizerArguments,)


def main(argv: list[str] | None = None) -> PreTrainedTokenizerFast:
    from align.config import parse

    (args,) = parse(CONFIG_TYPES, argv)
    tokenizer = train_tokenizer(args)
    stats = json.loads((Path(args.output_dir) / "stats.json").read_text())
    print(f"saved tokenizer ({stats['vocab_size']} tokens) to {args.output_dir}")
    for name, v in stats["bytes_per_token"].items():
        print(f"  bytes/token {name:>24}: {v:.2f}")
    return tokenizer


if __name__ == "__main__":
    from align.config import run_command

    run_command(main)
