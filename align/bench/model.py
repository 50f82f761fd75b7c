"""Throughput of align's decoder vs HF LlamaForCausalLM with the same config and weights.

    python -m align.bench model [--device cuda] [--dtype bf16] [--steps N] [--size small|medium]

Throughput is reported per wall second and, on CPU, per CPU second of this process (stable when other
jobs share the cores). Training: tokens/s of forward + backward + AdamW step on random tokens (batch x seq).
Generation: new tokens/s of greedy `generate` with the KV cache, a batch of prompts, no early stop.
Both models are warmed up untimed, then runs alternate (ours, HF, HF, ours, ...) and the best of
`--repeats` is reported, so start-up costs and background load hit both alike. The ratio column is ours / HF
(> 1 = ours faster). On CUDA, train MFU = tokens/s x fwd+bwd FLOPs per token / the device's bf16 peak (by name);
``--compile`` runs both models' training steps through torch.compile (``--compile_mode``: its mode, for both, e.g.
reduce-overhead for CUDA graphs). Ours takes align's default attention (align_fa4 where flash-attn-4 is installed, else
SDPA), the reference transformers' default (SDPA) unless told otherwise.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import platform
import time
from dataclasses import dataclass, field

import torch

from align.convert import to_llama
from align.model import DecoderConfig, DecoderForCausalLM, flash
from align.models import use_attention

SIZES = {  # few-M parameter configs that run in about a minute on 2 CPU cores
    "small": dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4),
    "medium": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                   num_attention_heads=12, num_key_value_heads=4),
    # real shapes for the GPU benches (random weights: speed does not depend on them)
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0),
    "qwen-386m": dict(vocab_size=32000, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                      num_attention_heads=14, num_key_value_heads=2, rope_theta=1000000.0),
}
# dense bf16/fp16 tensor-core peak FLOP/s by device name (vendor datasheets, no sparsity); fp32 runs use TF32's
PEAK_BF16 = {"H200": 989e12, "H100 SXM": 989e12, "H100 80GB HBM3": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12,
             "H100": 989e12, "GH200": 989e12, "B200": 2250e12, "A100": 312e12, "A10G": 125e12, "A10": 125e12,
             "L40S": 362e12, "L40": 181e12, "L4": 121e12, "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12,
             "T4": 65e12}


def peak_flops(device: torch.device | str) -> float | None:
    """Datasheet dense bf16 FLOP/s of a CUDA device, looked up by its name; None when unknown or on CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16, key=len, reverse=True):  # most specific name first ("H100 PCIe" before "H100")
        if key in name:
            return PEAK_BF16[key]
    return None


def train_flops_per_token(config, seq: int) -> float:
    """fwd+bwd FLOPs per token: 6 x matmul parameters (embedding lookup excluded, lm head included) plus
    attention scores and values, 6 x 2 x layers x seq x hidden (PaLM appendix B; causal halving ignored, as there)."""
    C, L = config.hidden_size, config.num_hidden_layers
    nh, nkv, hs = config.num_attention_heads, config.num_key_value_heads, C // config.num_attention_heads
    per_layer = C * nh * hs * 2 + C * nkv * hs * 2 + 3 * C * config.intermediate_size
    return 6 * (L * per_layer + C * config.vocab_size) + 12 * L * seq * C


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def reset_peak(device: torch.device) -> None:
    """Start a peak-memory count from what is live now. A trainer holds reference cycles, so the model of the run
    before outlives its ``del`` until the collector runs: collect first, or that model counts in this run's peak."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device, since: int = 0) -> float | None:
    """GiB at the peak since reset_peak, less `since` bytes (what was live before the run); None off CUDA."""
    return (torch.cuda.max_memory_allocated(device) - since) / 2**30 if device.type == "cuda" else None


def allocated(device: torch.device) -> int:
    """Bytes live on the device now (0 off CUDA)."""
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    import transformers

    out = f"torch {torch.__version__}, transformers {transformers.__version__}"
    for name in ("trl", "peft", "datasets", "liger-kernel"):
        try:
            out += f", {name} {version(name)}"
        except PackageNotFoundError:
            pass
    return out
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clock() -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds). On a shared CPU box the CPU-time rate is the stable one:
    wall time also counts the time other processes hold the cores."""
    return time.perf_counter(), time.process_time()


def _rates(n: int, t0: tuple[float, float]) -> tuple[float, float]:
    wall, cpu = _clock()
    return n / (wall - t0[0]), n / max(cpu - t0[1], 1e-9)


def train_tokens_per_s(model, batch: torch.Tensor, steps: int, warmup: int = 2, compile: bool = False,
                       compile_mode: str | None = None) -> tuple[float, float]:
    """(tokens per wall second, tokens per CPU second) of forward+backward+AdamW. The optimizer is torch's fused
    AdamW, the Trainer's default (``adamw_torch_fused``): the foreach one took 4.3 of 31.5 ms a step on an H200."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    device = batch.device
    forward = torch.compile(model, mode=compile_mode) if compile else model

    def step():
        loss = forward(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    _sync(device)
    t0 = _clock()
    for _ in range(steps):
        step()
    _sync(device)
    return _rates(batch.numel() * steps, t0)


@torch.no_grad()
def generate_tokens_per_s(model, prompts: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """(new tokens per wall second, per CPU second) of greedy generate with the KV cache."""
    model.eval()
    kw = dict(attention_mask=torch.ones_like(prompts), do_sample=False, use_cache=True,
              max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
    model.generate(prompts, **{**kw, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
    _sync(prompts.device)
    t0 = _clock()
    out = model.generate(prompts, **kw)
    _sync(prompts.device)
    assert out.shape[1] == prompts.shape[1] + new_tokens
    return _rates(prompts.shape[0] * new_tokens, t0)


def training_attention(name: str, tokens: int) -> str:
    """The attention function a training step of ``tokens`` reaches: align_fa4 sends short steps to SDPA."""
    short = name == flash.NAME and not flash.enough_tokens(tokens)
    return f"{name} (sdpa below {flash.MIN_TOKENS} tokens)" if short else name


def run(size="small", device="cpu", dtype="fp32", steps=4, batch=8, seq=128, gen_batch=8, prompt_len=32,
        new_tokens=64, repeats=3, seed=0, compile=False, compile_mode=None, liger=False, attn_implementation=None,
        hf_attn_implementation="sdpa") -> dict:
    device = torch.device(device)
    torch.manual_seed(seed)
    config = DecoderConfig(**SIZES[size], max_position_embeddings=max(seq, prompt_len + new_tokens), eos_token_id=None)
    ours = DecoderForCausalLM(config)
    hf = to_llama(ours)
    use_attention(ours, attn_implementation)
    use_attention(hf, hf_attn_implementation)
    models = {"ours": ours, "hf": hf}
    if liger:  # the same weights with Liger's fused kernels and q/k/v, gate/up in one matmul (CUDA only)
        models["liger"] = copy.deepcopy(ours)
        models["liger"].set_use_liger_kernel(True)
    models = {name: m.to(device, DTYPES[dtype]) for name, m in models.items()}
    train_batch = torch.randint(3, config.vocab_size, (batch, seq), device=device)
    prompts = torch.randint(3, config.vocab_size, (gen_batch, prompt_len), device=device)

    # untimed warm-up of both (thread pools, allocator, kernel selection): the first model run pays it otherwise
    for model in models.values():
        m = copy.deepcopy(model)
        train_tokens_per_s(m, train_batch, steps=1, warmup=1, compile=compile, compile_mode=compile_mode)
        generate_tokens_per_s(m, prompts, 4)
    results = {name: {"train": (0.0, 0.0), "generate": (0.0, 0.0), "train_peak_gib": None} for name in models}
    best = lambda a, b: (max(a[0], b[0]), max(a[1], b[1]))  # noqa: E731 best wall, best CPU
    order = list(models.items())
    for i in range(repeats):
        for name, model in order if i % 2 == 0 else order[::-1]:  # alternate who goes first
            # a fresh copy per repeat: both start from the same weights and optimizer state
            reset_peak(device)
            since = allocated(device)  # the resident models: not this run's
            m = copy.deepcopy(model)
            results[name]["train"] = best(results[name]["train"],
                                          train_tokens_per_s(m, train_batch, steps, compile=compile,
                                                             compile_mode=compile_mode))
            results[name]["train_peak_gib"] = peak_gib(device, since)  # the copy, its grads, AdamW, activations
            results[name]["generate"] = best(results[name]["generate"], generate_tokens_per_s(m, prompts, new_tokens))
            del m
    return {
        "load": os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"),
        "size": size, "params": sum(p.numel() for p in ours.parameters()), "device": str(device), "dtype": dtype,
        "threads": torch.get_num_threads(),
        "train_shape": (batch, seq), "steps": steps, "repeats": repeats,
        "gen_shape": (gen_batch, prompt_len, new_tokens), "compile": compile and (compile_mode or "default"),
        "attention": {n: training_attention(m.config._attn_implementation, batch * seq) for n, m in models.items()},
        "peak_flops": peak_flops(device), "flops_per_token": train_flops_per_token(config, seq),
        "results": results,
    }


def format_table(r: dict) -> str:
    cpu = r["device"] == "cpu"
    liger = "liger" in r["results"]
    rows = [
        "| metric | align decoder | HF Llama | ours / HF |" + (" align + Liger | Liger / HF |" if liger else "")
        + (" ours (CPU-time) | HF (CPU-time) | ours / HF (CPU-time) |" if cpu else ""),
        "|---|---:|---:|---:|" + ("---:|---:|" if liger else "") + ("---:|---:|---:|" if cpu else ""),
    ]
    labels = (("train", "train tokens/s (fwd+bwd+AdamW)"), ("generate", "generate tokens/s (greedy, KV cache)"))
    for key, label in labels:
        (ours, ours_cpu), (hf, hf_cpu) = r["results"]["ours"][key], r["results"]["hf"][key]
        row = f"| {label} | {ours:,.0f} | {hf:,.0f} | {ours / hf:.2f} |"
        if liger:
            row += f" {r['results']['liger'][key][0]:,.0f} | {r['results']['liger'][key][0] / hf:.2f} |"
        if cpu:
            row += f" {ours_cpu:,.0f} | {hf_cpu:,.0f} | {ours_cpu / hf_cpu:.2f} |"
        rows.append(row)
    if r["results"]["ours"]["train_peak_gib"] is not None:
        peak = {n: v["train_peak_gib"] for n, v in r["results"].items()}
        row = f"| train peak GiB (copy, grads, AdamW, activations) | {peak['ours']:.2f} | {peak['hf']:.2f} |"
        row += f" {peak['ours'] / peak['hf']:.2f} |"
        if liger:
            row += f" {peak['liger']:.2f} | {peak['liger'] / peak['hf']:.2f} |"
        rows.append(row)
    b, t = r["train_shape"]
    gb, pl, nt = r["gen_shape"]
    head = (
        f"model: {r['size']} ({r['params'] / 1e6:.1f}M params), device {r['device']}, dtype {r['dtype']}, "
        f"torch threads {r['threads']}, torch {torch.__version__}, {platform.processor() or platform.machine()}\n"
        f"train: batch {b} x seq {t}, {r['steps']} timed steps; generate: {gb} prompts x {pl} tokens + {nt} new; "
        f"best of {r['repeats']} alternating repeats; 1-min load average at the end {r['load']:.1f}; attention: "
        + ", ".join(f"{n} {a}" for n, a in r["attention"].items())
    )
    if r["peak_flops"]:
        mfu = {n: 100 * v["train"][0] * r["flops_per_token"] / r["peak_flops"] for n, v in r["results"].items()}
        compiled = f" (compiled, mode {r['compile']})" if r["compile"] else ""
        rows.append(f"\ntrain MFU{compiled}: "
                    + ", ".join(f"{n} {v:.1f}%" for n, v in mfu.items()) + f" of {r['peak_flops'] / 1e12:.0f} TFLOP/s")
    return head + "\n\n" + "\n".join(rows)


@dataclass
class BenchArgs:
    """ours vs HF Llama: training and generation throughput"""

    device: str = "cpu"
    dtype: str = field(default="fp32", metadata={"help": f"one of {sorted(DTYPES)}"})
    steps: int = field(default=4, metadata={"help": "timed training steps per repeat"})
    size: str = field(default="small", metadata={"help": f"one of {sorted(SIZES)}"})
    batch: int = 8
    seq: int = 128
    new_tokens: int = 64
    repeats: int = field(default=3, metadata={"help": "interleaved repeats; the best is reported"})
    compile: bool = field(default=False, metadata={"help": "torch.compile both models for training"})
    compile_mode: str | None = field(default=None, metadata={
        "help": "torch.compile's mode for both, e.g. reduce-overhead (CUDA graphs), as TrainingArguments' "
                "torch_compile_mode; implies --compile"})
    liger: bool = field(default=False, metadata={
        "help": "also ours with use_liger_kernel (fused RMSNorm, RoPE and LM-head loss; needs CUDA and liger-kernel)"})
    attn_implementation: str | None = field(default=None, metadata={
        "help": "ours: None = align's default (align_fa4 where flash-attn-4 is installed, else sdpa)"})
    hf_attn_implementation: str = field(default="sdpa", metadata={
        "help": "the reference's: transformers' default sdpa, or e.g. flash_attention_4 (transformers' own FA4 path)"})
    json: str | None = field(default=None, metadata={
        "help": "append one JSON line per model to this file (python -m align.bench plot --bench model draws them)"})

    def __post_init__(self):
        for name, allowed in (("dtype", DTYPES), ("size", SIZES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {sorted(allowed)}, got {getattr(self, name)!r}")
        self.compile = self.compile or self.compile_mode is not None


def main(argv: list[str] | None = None) -> int:
    from align.config import parse, run_command

    (args,) = run_command(parse, [BenchArgs], argv, prog="python -m align.bench model")
    r = run(size=args.size, device=args.device, dtype=args.dtype, steps=args.steps, batch=args.batch, seq=args.seq,
            gen_batch=args.batch, new_tokens=args.new_tokens, repeats=args.repeats, compile=args.compile,
            compile_mode=args.compile_mode, liger=args.liger, attn_implementation=args.attn_implementation,
            hf_attn_implementation=args.hf_attn_implementation)
    print(format_table(r))
    if args.json:
        with open(args.json, "a") as f:
            for line in json_rows(r):
                f.write(json.dumps(line) + "\n")
    return 0


def json_rows(r: dict) -> list[dict]:
    """One flat row per model of a run's result: what `align.bench plot --bench model` reads."""
    b, t = r["train_shape"]
    return [{"bench": "model", "model": name, "size": r["size"], "dtype": r["dtype"],
             "device": device_name(r["device"]), "batch": b, "seq": t, "compile": r["compile"],
             "attention": r["attention"][name], "train_tokens_per_s": v["train"][0],
             "generate_tokens_per_s": v["generate"][0], "train_peak_gib": v["train_peak_gib"],
             "mfu": v["train"][0] * r["flops_per_token"] / r["peak_flops"] if r["peak_flops"] else None}
            for name, v in r["results"].items()]


if __name__ == "__main__":
    raise SystemExit(main())
