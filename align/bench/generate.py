"""Greedy generation throughput: align's fast path (static KV cache + CUDA-graph decode, align.fastgen) vs
HF ``generate`` on LlamaForCausalLM with the same config and weights, in one process on one device.

    python -m align.bench generate --device cuda --dtype bf16 --size medium --batch 1 16 64 --new_tokens 256 \
        [--hf-static] [--json out.jsonl]

Rows per batch size: ``hf`` = LlamaForCausalLM.generate (dynamic cache, eager: what a user runs by default);
``hf-static`` (with --hf-static) = the same with ``cache_implementation="static"``, which HF compiles with
torch.compile (mode reduce-overhead) on CUDA; ``ours`` = align.fastgen on our decoder; ``ours-on-llama`` =
align.fastgen driving the HF Llama (the path for HF models in GRPO/PPO rollouts); ``ours-compiled``
(with --compile) = align.fastgen with the decode step through torch.compile inside the CUDA graph. Each is
warmed up untimed at the timed shapes (HF's compile happens there), then runs alternate and the best of
``--repeats`` counts.
Every row generates exactly ``new_tokens`` per prompt (no eos). ``match`` is the share of new tokens
equal to HF's greedy tokens up to each row's first difference (random weights give near-flat logits, so
bf16 rounding may flip an argmax; tests/test_generate.py checks equality where rounding cannot).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import torch

from align.bench.model import DTYPES, SIZES, device_name, peak_gib, reset_peak, versions
from align.convert import to_llama
from align.fastgen import fast_generate
from align.model import DecoderConfig, DecoderForCausalLM


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _methods(ours, hf, hf_static: bool, compile: bool):
    def hf_generate(prompts, n, **extra):
        kw = dict(attention_mask=torch.ones_like(prompts), do_sample=False, max_new_tokens=n, min_new_tokens=n,
                  pad_token_id=0, eos_token_id=None)
        return hf.generate(prompts, **kw, **extra)[:, prompts.shape[1]:]

    methods = {"hf": hf_generate}
    if hf_static:
        methods["hf-static"] = lambda p, n: hf_generate(p, n, cache_implementation="static")
    methods["ours"] = lambda p, n: fast_generate(ours, p, max_new_tokens=n)
    methods["ours-on-llama"] = lambda p, n: fast_generate(hf, p, max_new_tokens=n)
    if compile:
        methods["ours-compiled"] = lambda p, n: fast_generate(ours, p, max_new_tokens=n, compile=True)
    return methods


def _matched(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of tokens equal before each row's first difference."""
    same = (a == b).long().cumprod(-1)  # (B, N) 1 until the first difference
    return same.sum().item() / a.numel()


@torch.inference_mode()
def run(size="small", device="cpu", dtype="fp32", batches=(1, 8), prompt_len=32, new_tokens=32, repeats=3,
        hf_static=False, compile=False, seed=0, json_path=None,
        only=None) -> list[dict]:
    device = torch.device(device)
    torch.manual_seed(seed)
    config = DecoderConfig(**SIZES[size], max_position_embeddings=prompt_len + new_tokens, eos_token_id=None)
    ours = DecoderForCausalLM(config).eval()
    hf = to_llama(ours).eval()
    ours, hf = ours.to(device, DTYPES[dtype]), hf.to(device, DTYPES[dtype])
    params = sum(p.numel() for p in ours.parameters())
    methods = _methods(ours, hf, hf_static, compile)
    if only:  # hf stays: it is the reference of every ratio
        methods = {k: v for k, v in methods.items() if k == "hf" or k in only}
    rows = []
    for B in batches:
        prompts = torch.randint(3, config.vocab_size, (B, prompt_len), device=device)
        tokens, t_warm = {}, {}
        for name, fn in list(methods.items()):  # warm-up at the timed shapes: kernels, graph capture, HF's compile
            t0 = time.perf_counter()
            try:
                tokens[name] = fn(prompts, new_tokens)
            except Exception as e:  # noqa: BLE001  report the broken method, time the others
                print(f"generate {name} (batch {B}): FAILED {type(e).__name__}: {e}", flush=True)
                del methods[name]
                continue
            _sync(device)
            t_warm[name] = time.perf_counter() - t0
        best = {name: 0.0 for name in methods}
        peak = {}
        order = list(methods)
        for i in range(repeats):
            for name in order if i % 2 == 0 else order[::-1]:  # alternate who goes first
                reset_peak(device)
                _sync(device)
                t0 = time.perf_counter()
                out = methods[name](prompts, new_tokens)
                _sync(device)
                best[name] = max(best[name], B * new_tokens / (time.perf_counter() - t0))
                assert out.shape == (B, new_tokens), out.shape
                peak[name] = peak_gib(device)
        for name in methods:
            row = {
                "bench": "generate", "size": size, "params": params, "device": device_name(device), "dtype": dtype,
                "batch": B, "prompt_len": prompt_len, "new_tokens": new_tokens, "method": name,
                "tokens_per_s": best[name], "ms_per_step": 1e3 * B / best[name], "vs_hf": best[name] / best["hf"],
                "match_hf": _matched(tokens[name], tokens["hf"]), "peak_gib": peak.get(name),
                "warmup_s": t_warm[name], "versions": versions(),
            }
            rows.append(row)
            if json_path:
                with open(json_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
        print(format_table([r for r in rows if r["batch"] == B], header=B == batches[0]), flush=True)
    return rows


def format_table(rows: list[dict], header: bool = True) -> str:
    out = []
    if header and rows:
        r = rows[0]
        out += [f"generate: {r['size']} ({r['params'] / 1e6:.1f}M params), {r['device']}, {r['dtype']}, "
                f"{r['prompt_len']} prompt + {r['new_tokens']} new tokens per row, greedy; {r['versions']}", "",
                "| batch | method | tokens/s | ms/step | vs HF generate | greedy match | peak GiB | warm-up s |",
                "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
        out.append(f"| {r['batch']} | {r['method']} | {r['tokens_per_s']:,.0f} | {r['ms_per_step']:.2f} | "
                   f"{r['vs_hf']:.2f} | {r['match_hf']:.3f} | {peak} | {r['warmup_s']:.1f} |")
    return "\n".join(out)


@dataclass
class BenchArgs:
    """fast generation (align.fastgen) vs HF generate: tokens/s"""

    device: str = "cpu"
    dtype: str = field(default="fp32", metadata={"help": f"one of {sorted(DTYPES)}"})
    size: str = field(default="small", metadata={"help": f"one of {sorted(SIZES)}"})
    batch: list[int] = field(default_factory=lambda: [1, 8], metadata={"help": "batch sizes, one row group each"})
    prompt_len: int = 32
    new_tokens: int = 32
    repeats: int = field(default=3, metadata={"help": "interleaved repeats; the best is reported"})
    hf_static: bool = field(default=False, metadata={"help": "also HF generate with the static cache (compiled)"})
    compile: bool = field(default=False, metadata={"help": "also align.fastgen with the decode step compiled"})
    methods: list[str] | None = field(default=None, metadata={"help": "time only these (hf is always timed)"})
    json: str | None = field(default=None, metadata={"help": "append one JSON line per row to this file"})

    def __post_init__(self):
        if isinstance(self.methods, str):  # one method given as one word
            self.methods = [self.methods]
        for name, allowed in (("dtype", DTYPES), ("size", SIZES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {sorted(allowed)}, got {getattr(self, name)!r}")


def main(argv: list[str] | None = None) -> int:
    from align.config import parse, run_command

    (a,) = run_command(parse, [BenchArgs], argv, prog="python -m align.bench generate")
    run(size=a.size, device=a.device, dtype=a.dtype, batches=a.batch, prompt_len=a.prompt_len,
        new_tokens=a.new_tokens, repeats=a.repeats, hf_static=a.hf_static, compile=a.compile, json_path=a.json,
        only=a.methods)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
