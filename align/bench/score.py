"""Throughput of ``align.score.RewardScorer`` vs a straightforward per-example HF loop, same model.

    python -m align.bench score [--device cuda] [--n 512] [--batch_size 64] [--model RM_DIR] [--size small]

Both score the same (prompt, response) pairs -- the chosen and rejected replies of the built-in world's
held-out prompts -- with the same reward model: ``--model`` (a reward run's final/) or, by default, a
randomly initialised ``DecoderForSequenceClassification`` of ``--size`` with a tokenizer trained on a
world sample (the speed does not depend on the weights). The loop tokenizes one pair with the chat
template, runs one forward and reads the logit; the scorer sorts by length and pads per batch. Both are
warmed up untimed, then timed alternately (loop, scorer, scorer, loop, ...); the best of ``--repeats``
is reported, per wall second and, on CPU, per CPU second of this process (stable on shared cores).
The two must agree: the largest |difference| of their rewards is printed.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from dataclasses import dataclass, field

import torch

from align.bench.model import SIZES, peak_gib, reset_peak
from align.score import RewardScorer, encode


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def build_default(size: str, device: str) -> RewardScorer:
    from align.model import DecoderConfig, DecoderForSequenceClassification
    from align.models import load_tokenizer
    from align.tokenizer import TokenizerArguments, train_tokenizer

    tmp = tempfile.mkdtemp(prefix="bench-score-")
    train_tokenizer(TokenizerArguments(corpus="world", vocab_size=768, max_documents=2000, output_dir=tmp))
    tok = load_tokenizer(tmp)
    cfg = {**SIZES[size], "vocab_size": len(tok)}
    torch.manual_seed(0)
    model = DecoderForSequenceClassification(DecoderConfig(
        num_labels=1, max_position_embeddings=256, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, **cfg))
    return RewardScorer(model=model.to(device).eval(), tokenizer=tok)


def pairs(n: int) -> tuple[list, list]:
    from align.reward_eval import world_heldout_pairs

    ps = world_heldout_pairs(0, min((n + 3) // 4, 300))  # the world has ~300 distinct held-out prompts
    prompts, responses = [], []
    for p in ps:
        for side in ("chosen", "rejected"):
            prompts.append(p["prompt"])
            responses.append(p[side][0]["content"])
    reps = -(-n // len(prompts))  # repeat them for larger n: the speed does not depend on the text
    return (prompts * reps)[:n], (responses * reps)[:n]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def naive(model, tokenizer, prompts, responses) -> list[float]:
    """The straightforward loop: tokenize one, forward, read the logit."""
    out = []
    for p, r in zip(prompts, responses):
        ids = torch.tensor([encode(tokenizer, p, r)], device=model.device)
        out.append(model(input_ids=ids).logits[0, 0].item())
    return out


def timed(fn, n: int, device: torch.device) -> tuple[float, float, list[float]]:
    sync(device)
    w0, c0 = time.perf_counter(), time.process_time()
    res = fn()
    sync(device)
    return n / (time.perf_counter() - w0), n / max(time.process_time() - c0, 1e-9), res


@dataclass
class BenchArgs:
    """RewardScorer vs a per-example HF loop: pairs scored per second"""

    device: str = "cpu"
    model: str | None = field(default=None, metadata={"help": "a reward model dir (default: a random model of size)"})
    size: str = field(default="small", metadata={"help": f"one of {sorted(SIZES)}"})
    n: int = field(default=512, metadata={"help": "(prompt, response) pairs scored per run"})
    batch_size: int = 64
    repeats: int = 2
    threads: int = field(default=2, metadata={"help": "torch CPU threads"})

    def __post_init__(self):
        if self.size not in SIZES:
            raise ValueError(f"size must be one of {sorted(SIZES)}, got {self.size!r}")


def main(argv: list[str] | None = None) -> int:
    from align.config import parse, run_command

    (a,) = run_command(parse, [BenchArgs], argv, prog="python -m align.bench score")
    torch.set_num_threads(a.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = torch.device(a.device)
    scorer = RewardScorer(a.model, device=device) if a.model else build_default(a.size, a.device)
    scorer.batch_size = a.batch_size
    prompts, responses = pairs(a.n)
    n_params = sum(p.numel() for p in scorer.model.parameters())
    mean_len = sum(len(encode(scorer.tokenizer, p, r)) for p, r in zip(prompts, responses)) / len(prompts)
    hw = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu_model()}, {a.threads} torch threads"
    print(f"reward model: {a.model or a.size} ({n_params / 1e6:.2f}M params), {len(prompts)} pairs "
          f"(mean {mean_len:.0f} tokens), batch {a.batch_size}, device {device} ({hw})")

    warm = min(16, len(prompts))
    naive(scorer.model, scorer.tokenizer, prompts[:warm], responses[:warm])
    scorer.score(prompts[:warm], responses[:warm])
    best = {"loop": (0.0, 0.0), "scorer": (0.0, 0.0)}
    results, peak = {}, {}
    for i in range(a.repeats):
        order = ("loop", "scorer") if i % 2 == 0 else ("scorer", "loop")
        for name in order:
            fn = (lambda: naive(scorer.model, scorer.tokenizer, prompts, responses)) if name == "loop" \
                else (lambda: scorer.score(prompts, responses))
            reset_peak(device)
            wall, cpu, res = timed(fn, len(prompts), device)
            results[name], peak[name] = res, peak_gib(device)  # the model's weights included, for both
            best[name] = max(best[name], (wall, cpu))
    diff = max(abs(x - y) for x, y in zip(results["loop"], results["scorer"]))
    cpu_col = device.type == "cpu"
    print(f"{'method':<34} {'pairs/s (wall)':>15}" + (f" {'pairs/CPU-s':>12}" if cpu_col else f" {'peak GiB':>9}"))
    for name, label in (("loop", "per-example HF loop"), ("scorer", f"RewardScorer (batch {a.batch_size})")):
        w, c = best[name]
        print(f"{label:<34} {w:>15.1f}" + (f" {c:>12.1f}" if cpu_col else f" {peak[name]:>9.2f}"))
    print(f"speed-up: {best['scorer'][0] / best['loop'][0]:.1f}x wall"
          + (f", {best['scorer'][1] / best['loop'][1]:.1f}x CPU" if cpu_col else "")
          + f"; max |reward difference| {diff:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
