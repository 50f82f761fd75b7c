"""Passkey retrieval past the trained length: RoPE scaling and dual chunk attention side by side.

    python -m align.bench context [--out runs/bench_context] [--quick] [--samples N] [--device cpu]

A tiny decoder is trained here (once; re-runs load `OUT/model/`) at `--train-len` tokens on filler text with a
hidden five-digit key, then asked for the key at 1x, 2x, 4x, 8x and 16x that length, the key at five depths.
Each method is the same weights under another config: plain RoPE, linear interpolation, dynamic NTK, YaRN,
dual chunk attention (ChunkLlama, https://arxiv.org/abs/2402.17463) and YaRN + dual chunk attention. The
scaled RoPE variants get factor = length / train_len. Greedy decoding with the KV cache; a sample counts when
all five digits come back. Writes OUT/results.json, OUT/context.png (accuracy heat-maps, depth x length)
and prints the table with the KV-cache memory of each length (measured after the prompt, and by the formula
2 * layers * batch * kv_heads * length * head_dim * bytes).

The vocabulary is a word list built here (digits, the filler's words, the needle's words): the point is the
positions, not the tokenizer.
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from align.model import DecoderConfig, DecoderForCausalLM

FILLER = [  # the classic passkey haystack (Mohtashami & Jaggi 2023, https://arxiv.org/abs/2305.16300)
    "the grass is green .", "the sky is blue .", "the sun is yellow .", "here we go .", "there and back again .",
]
NEEDLE = "the pass key is : {key} . remember it ."
QUESTION = "what is the pass key ? pass key :"
KEY_LEN = 5
WORDS = ["<pad>", "<bos>", "<eos>", *"0123456789"] + sorted(
    {w for s in [*FILLER, NEEDLE.replace("{key}", ""), QUESTION] for w in s.split()}
)
VOCAB = {w: i for i, w in enumerate(WORDS)}
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)  # where the needle sits in the haystack (fraction of the filler before it)
MULTIPLES = (1, 2, 4, 8, 16)
METHODS = ("rope", "linear", "dynamic", "yarn", "dca", "yarn+dca")
_print = functools.partial(print, flush=True)  # progress lines show up in a redirected log at once


def encode(text: str) -> list[int]:
    return [VOCAB[w] for w in text.split()]


def sample(length: int, depth: float, g: torch.Generator) -> tuple[list[int], list[int]]:
    """(prompt ids, key ids): <bos> filler... needle filler... question, `length - KEY_LEN` tokens in all, so that
    prompt + answer is exactly `length` tokens. The key's digits are distinct (no ambiguous copy)."""
    key = [VOCAB[str(int(d))] for d in torch.randperm(10, generator=g)[:KEY_LEN]]
    needle = encode(NEEDLE.replace("{key}", ""))
    colon = needle.index(VOCAB[":"]) + 1
    needle = needle[:colon] + key + needle[colon:]
    question = encode(QUESTION)
    n_fill = length - KEY_LEN - 1 - len(needle) - len(question)
    if n_fill < 0:
        raise ValueError(f"length {length} is too short for the needle and question ({length - n_fill} tokens)")
    fill: list[int] = []
    while len(fill) < n_fill:
        fill += encode(FILLER[int(torch.randint(len(FILLER), (1,), generator=g))])
    fill = fill[:n_fill]
    at = round(depth * n_fill)
    return [VOCAB["<bos>"], *fill[:at], *needle, *fill[at:], *question], key


def batch(n: int, length: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n training rows (n, length) and the answer mask (n, length) over the positions whose next-token target is
    a digit of an answer. Half the rows are one sample of `length` tokens; the other half pack two samples of
    random lengths (like packed pretraining documents), so questions occur at every position below `length`,
    not only at its end. Needle depths are uniform."""
    shortest = 2 * KEY_LEN + 1 + len(encode(NEEDLE.replace("{key}", ""))) + len(encode(QUESTION)) + 4
    rows, mask = [], torch.zeros(n, length, dtype=torch.bool)
    for i in range(n):
        first = length
        if i % 2 and length >= 2 * shortest:
            first = int(torch.randint(shortest, length - shortest + 1, (1,), generator=g))
        row: list[int] = []
        for part in (first, length - first):
            if part == 0:
                continue
            prompt, key = sample(part, float(torch.rand((), generator=g)), g)
            mask[i, len(row) + len(prompt) - 1 : len(row) + part - 1] = True
            row += prompt + key
        rows.append(row)
    return torch.tensor(rows), mask


def model_config(train_len: int, size: str) -> DecoderConfig:
    width, layers = {"tiny": (32, 2), "small": (128, 2)}[size]
    return DecoderConfig(
        vocab_size=len(WORDS), hidden_size=width, intermediate_size=width * 2, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=train_len,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )


@torch.no_grad()
def accuracy(model, length: int, depths=DEPTHS, samples: int = 8, seed: int = 1234,
             batch_size: int = 8) -> dict[float, float]:
    """Fraction of samples whose five digits come back exactly (greedy, KV cache), per depth."""
    model.eval()
    device = next(model.parameters()).device
    out = {}
    for d in depths:
        g = torch.Generator().manual_seed(seed + int(d * 1000))
        cases = [sample(length, d, g) for _ in range(samples)]
        hits = 0
        for i in range(0, samples, batch_size):
            chunk = cases[i : i + batch_size]
            prompts = torch.tensor([p for p, _ in chunk], device=device)
            gen = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=KEY_LEN,
                                 min_new_tokens=KEY_LEN, do_sample=False, use_cache=True, pad_token_id=0)
            hits += sum(gen[j, -KEY_LEN:].tolist() == key for j, (_, key) in enumerate(chunk))
        out[d] = hits / samples
    return out


def train(out_dir: Path, train_len: int = 256, size: str = "small", steps: int = 2500, batch_size: int = 16,
          lr: float = 2e-3, device: str = "cpu", seed: int = 0, log=_print) -> DecoderForCausalLM:
    """Train (or load from out_dir/model) the passkey model at train_len for `steps` steps (cosine to 0), logging
    greedy retrieval at train_len on 80 held-out samples, 16 at each depth, every 250 steps. Training on after
    retrieval first reaches 1.0 sharpens the copy heads, which is what keeps it alive among 16x more keys."""
    path = out_dir / "model"
    if (path / "config.json").exists():
        log(f"loading the trained passkey model from {path}")
        return DecoderForCausalLM.from_pretrained(path).to(device)
    torch.manual_seed(seed)
    model = DecoderForCausalLM(model_config(train_len, size)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    warmup = min(100, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    g = torch.Generator().manual_seed(seed)
    t0, history = time.perf_counter(), []
    for step in range(1, steps + 1):
        model.train()
        x, answer = batch(batch_size, train_len, g)
        x, answer = x.to(device), answer.to(device)
        logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()  # (B, T-1, V)
        targets = x[:, 1:]
        lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        answer = answer[:, :-1].reshape(-1)
        # LM loss everywhere (it grows the previous-token heads retrieval builds on) + the answer's own loss
        loss = lm.mean() + lm[answer].mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 250 == 0 or step == steps:
            acc = accuracy(model, train_len, depths=DEPTHS, samples=16, seed=99)
            mean = sum(acc.values()) / len(acc)
            history.append({"step": step, "loss": loss.item(), "answer_loss": lm[answer].mean().item(), "acc": mean})
            log(f"step {step}: loss {loss.item():.3f} answer loss {lm[answer].mean().item():.3f} "
                f"retrieval@{train_len} {mean:.2f} ({time.perf_counter() - t0:.0f}s)")
    model.save_pretrained(path)
    (path / "train.json").write_text(json.dumps({"seconds": time.perf_counter() - t0, "history": history,
                                                 "threads": torch.get_num_threads(), "device": device}, indent=1))
    return model


def method_config(base: DecoderConfig, method: str, length: int) -> DecoderConfig:
    """The trained model's config under `method` at `length`: scaled RoPE gets factor length / trained length;
    dual chunk attention takes ChunkLlama's defaults for a trained length c: chunk s = 5c/8, local window
    w = c/8, so the longest distance, s + w, is 3c/4."""
    c = base.max_position_embeddings
    factor = max(1.0, length / c)
    theta = base.rope_parameters["rope_theta"]
    rope = {"rope_type": "default", "rope_theta": theta}
    if method == "linear":
        rope = {"rope_type": "linear", "rope_theta": theta, "factor": factor}
    elif method == "dynamic":  # NTK-aware, theta grown with the running length (transformers' usual factor 2)
        rope = {"rope_type": "dynamic", "rope_theta": theta, "factor": 2.0}
    elif method in ("yarn", "yarn+dca"):
        rope = {"rope_type": "yarn", "rope_theta": theta, "factor": factor, "original_max_position_embeddings": c}
    dca = {}
    if method.endswith("dca"):  # YaRN brings its own attention temperature: DCA's is for plain RoPE only
        dca = dict(dca_chunk_size=5 * c // 8, dca_local_window=c // 8, dca_attention_scaling=method == "dca")
    kwargs = {k: v for k, v in base.to_diff_dict().items() if k in DecoderConfig.__dataclass_fields__}
    kwargs.update(rope_parameters=rope, **{"dca_chunk_size": None, "dca_local_window": None, **dca})
    return DecoderConfig(**kwargs)


def kv_cache_bytes(model, length: int) -> tuple[int, int]:
    """(measured bytes of the KV cache after a `length`-token prompt, batch 1; the formula's
    2 * layers * batch * kv_heads * length * head_dim * bytes)."""
    cfg = model.config
    device = next(model.parameters()).device
    with torch.no_grad():
        cache = model(input_ids=torch.full((1, length), VOCAB["the"], device=device), use_cache=True).cache
    measured = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    elem = next(model.parameters()).element_size()
    return measured, 2 * cfg.num_hidden_layers * 1 * cfg.num_key_value_heads * length * cfg.head_dim * elem


def evaluate(model, multiples=MULTIPLES, methods=METHODS, samples: int = 10, log=_print) -> dict:
    c = model.config.max_position_embeddings
    device = next(model.parameters()).device
    results = {"train_len": c, "samples": samples, "depths": list(DEPTHS), "lengths": [m * c for m in multiples],
               "accuracy": {}, "kv_cache": {}}
    for length in results["lengths"]:
        results["kv_cache"][length] = dict(zip(("measured", "formula"), kv_cache_bytes(model, length)))
    for method in methods:
        results["accuracy"][method] = {}
        for length in results["lengths"]:
            m = DecoderForCausalLM(method_config(model.config, method, length)).to(device).eval()
            m.load_state_dict(model.state_dict())
            t0 = time.perf_counter()
            acc = accuracy(m, length, samples=samples)
            results["accuracy"][method][length] = acc
            log(f"{method:9s} {length:6d} tokens: {sum(acc.values()) / len(acc):.2f} "
                f"by depth {[round(a, 2) for a in acc.values()]} ({time.perf_counter() - t0:.0f}s)")
    return results


def format_table(r: dict) -> str:
    lengths, c = r["lengths"], r["train_len"]
    head = "| method | " + " | ".join(f"{n // c}x ({n})" for n in lengths) + " |"
    rows = [head, "|---|" + "---:|" * len(lengths)]
    for method, by_len in r["accuracy"].items():
        cells = [sum(by_len[n].values()) / len(by_len[n]) for n in lengths]
        rows.append(f"| {method} | " + " | ".join(f"{a:.2f}" for a in cells) + " |")
    kv = r["kv_cache"]
    rows.append("| KV cache, measured (KiB, batch 1) | "
                + " | ".join(f"{kv[n]['measured'] / 1024:.0f}" for n in lengths) + " |")
    rows.append("| KV cache, formula (KiB) | " + " | ".join(f"{kv[n]['formula'] / 1024:.0f}" for n in lengths) + " |")
    return "\n".join(rows)


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods, lengths, depths = list(r["accuracy"]), r["lengths"], r["depths"]
    cols = 3
    rows = math.ceil(len(methods) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, method in zip(axes.flat, methods):
        grid = [[r["accuracy"][method][n][d] for n in lengths] for d in depths]  # (depth, length)
        ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for i, row in enumerate(grid):
            for j, a in enumerate(row):
                ax.text(j, i, f"{a:.1f}", ha="center", va="center", fontsize=7)
        ax.set_title(method, fontsize=9)
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=7)
        ax.set_xlabel("context (tokens)", fontsize=7)
        ax.set_ylabel("key depth", fontsize=7)
    for ax in list(axes.flat)[len(methods):]:
        ax.axis("off")
    fig.suptitle(f"passkey retrieval, trained at {r['train_len']} tokens ({r['samples']} samples a cell)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def run(out: Path, quick: bool = False, samples: int = 10, steps: int = 2500, train_len: int = 256,
        device: str = "cpu", log=_print) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    if quick:
        model = train(out, train_len=32, size="tiny", steps=30, batch_size=8, device=device, log=log)
        results = evaluate(model, multiples=(1, 4), samples=2, log=log)
    else:
        model = train(out, train_len=train_len, steps=steps, device=device, log=log)
        results = evaluate(model, samples=samples, log=log)
    results.update(threads=torch.get_num_threads(), torch=torch.__version__, device=device,
                   cpu=platform.processor() or platform.machine())
    train_info = out / "model" / "train.json"
    if train_info.exists():
        results["training"] = json.loads(train_info.read_text())
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "context.png")
    return results


@dataclass
class BenchArgs:
    """passkey retrieval past the trained length: RoPE scalings and dual chunk attention"""

    out: str = field(default="runs/bench_context", metadata={"help": "output dir (the trained model is kept in "
                                                                      "OUT/model)"})
    quick: bool = field(default=False, metadata={"help": "tiny model at 32 tokens, 1x and 4x, 2 samples (seconds)"})
    train_len: int = 256
    steps: int = field(default=2500, metadata={"help": "training steps"})
    samples: int = field(default=10, metadata={"help": "samples per (method, length, depth)"})
    device: str = "cpu"


def main(argv: list[str] | None = None) -> int:
    from align.config import parse, run_command

    (args,) = run_command(parse, [BenchArgs], argv, prog="python -m align.bench context")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    r = run(Path(args.out), quick=args.quick, samples=args.samples, steps=args.steps, train_len=args.train_len,
            device=args.device)
    print(f"\ntorch {r['torch']}, {r['cpu']}, device {r['device']}, {r['threads']} threads; "
          f"accuracy = all five digits right, mean over {len(r['depths'])} depths x {r['samples']} samples")
    print(format_table(r))
    print(f"heat-map: {Path(args.out) / 'context.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
