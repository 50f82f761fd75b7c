"""GRPO completions/s: TRL's GRPOTrainer with its defaults (HF generate, no vLLM) vs the same trainer with
generation routed through align.fastgen (static KV cache + CUDA-graph decode), same model shape and prompts.

    python -m align.bench grpo --device cuda --size smollm2-135m --prompts 8 --num_generations 8 \
        --max_completion_length 128 --steps 4 --warmup 1 [--variants ...] [--lora true]

Rows (``--variants``): ``trl`` = LlamaForCausalLM, GRPOConfig defaults but the batch shape above (sampling at
T=1, bf16, gradient checkpointing); ``align`` = our decoder, the same config, ``model.generate`` through
``align.fastgen.use_fast_generate``; ``-nogc`` without activation checkpointing (what ``configs/grpo.yaml``
sets); ``-liger`` with the decoder's fused kernels (``use_liger_kernel``, align/model/kernels.py). The reward
is a cheap function of the completion, so generation and the policy update are what is timed. Random weights
rarely sample eos: every completion runs to the maximum length in every row. completions/s = prompts x
generations per step / seconds per step, after warm-up steps; gen s/step is the part of it inside ``generate``.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field

import torch

from align.bench.model import SIZES, device_name, peak_gib, reset_peak, versions
from align.bench.train import lora_config, word_tokenizer
from align.convert import to_llama
from align.model import DecoderConfig, DecoderForCausalLM
from align.models import input_grads_once

VARIANTS = ("trl", "align", "align-nogc", "align-liger", "align-liger-nogc")


def _reward(completions, **kw):  # cheap and deterministic: generation and the update are what is timed
    return [float(len(c)) / 1000 for c in completions]


def run_one(variant: str, base, tok, prompts, device, n_prompts, num_generations, max_completion_length, steps,
            warmup, compile=False, lora=False):
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from align.fastgen import use_fast_generate

    ours = variant.startswith("align")
    model = DecoderForCausalLM(base.config) if ours else to_llama(base)
    if ours:
        model.load_state_dict(base.state_dict())
        input_grads_once(model)  # as align.models.load does
        model.set_use_liger_kernel("liger" in variant)
        assert use_fast_generate(model, compile=compile, dtype=torch.bfloat16 if device.type == "cuda" else None)
    model.to(device)
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-grpo-"), max_steps=steps, report_to="none", save_strategy="no",
        logging_steps=max(steps, 1), disable_tqdm=True, seed=0, use_cpu=device.type == "cpu",
        bf16=device.type == "cuda", per_device_train_batch_size=n_prompts * num_generations,
        num_generations=num_generations, max_completion_length=max_completion_length,
        **({"activation_checkpointing": False} if "nogc" in variant else {}),
    )
    times, gen = [], []  # step ends; seconds inside each generate call (one per step)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            sync()
            times.append(time.perf_counter())

    inner = model.generate

    def timed_generate(*a, **kw):
        sync()
        t = time.perf_counter()
        out = inner(*a, **kw)
        sync()
        gen.append(time.perf_counter() - t)
        return out

    model.generate = timed_generate

    reset_peak(device)
    trainer = GRPOTrainer(model=model, reward_funcs=_reward, args=args, train_dataset=Dataset.from_list(prompts),
                          processing_class=tok, callbacks=[Clock()], peft_config=lora_config() if lora else None)
    trainer.train()
    step_s = (times[-1] - times[warmup - 1]) / (steps - warmup) if warmup else None
    out = {"completions_per_s": n_prompts * num_generations / step_s, "step_s": step_s,
           "gen_s": sum(gen[warmup:steps]) / (steps - warmup),
           "peak_gib": peak_gib(device)}
    del trainer, model
    return out


def run(size="small", device="cpu", n_prompts=2, num_generations=4, max_completion_length=16, prompt_len=32,
        steps=3, warmup=1, seed=0, json_path=None, compile=False, variants=("trl", "align"), lora=False) -> list[dict]:
    import random

    device = torch.device(device)
    torch.manual_seed(seed)
    config = DecoderConfig(**SIZES[size], max_position_embeddings=prompt_len + max_completion_length + 8,
                           eos_token_id=1, pad_token_id=0, bos_token_id=2)
    base = DecoderForCausalLM(config)
    tok = word_tokenizer(config.vocab_size)
    rng = random.Random(seed)
    words = lambda k: " ".join(f"w{rng.randrange(3, config.vocab_size)}" for _ in range(k))  # noqa: E731
    prompts = [{"prompt": words(rng.randint(8, prompt_len))} for _ in range(n_prompts * steps)]
    rows = []
    for v in variants:
        compiled = compile and v != "trl"
        r = run_one(v, base, tok, prompts, device, n_prompts, num_generations, max_completion_length, steps, warmup,
                    compile=compiled, lora=lora)
        r.update(bench="grpo", variant=v, size=size, params=sum(p.numel() for p in base.parameters()),
                 device=device_name(device), prompts=n_prompts, num_generations=num_generations,
                 max_completion_length=max_completion_length, steps=steps, warmup=warmup, versions=versions(),
                 compile=compiled, lora=lora)
        rows.append(r)
        print(f"grpo {v}: {r['completions_per_s']:.1f} completions/s", flush=True)
    ref = next((r for r in rows if r["variant"] == "trl"), rows[0])["completions_per_s"]
    for r in rows:
        r["vs_trl"] = r["completions_per_s"] / ref
        if json_path:
            with open(json_path, "a") as f:
                f.write(json.dumps(r) + "\n")
    print(format_table(rows), flush=True)
    return rows


def format_table(rows: list[dict]) -> str:
    r = rows[0]
    lora = " (LoRA r16, all linear)" if r["lora"] else ""
    out = [f"grpo{lora}: {r['size']} ({r['params'] / 1e6:.1f}M params), {r['device']}, {r['prompts']} prompts x "
           f"{r['num_generations']} generations x {r['max_completion_length']} tokens per step, "
           f"{r['steps'] - r['warmup']} timed steps after {r['warmup']}; {r['versions']}", "",
           "| variant | completions/s | vs TRL defaults | s/step | gen s/step | peak GiB |",
           "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
        out.append(f"| {r['variant']} | {r['completions_per_s']:,.1f} | {r['vs_trl']:.2f} | {r['step_s']:.2f} | "
                   f"{r['gen_s']:.2f} | {peak} |")
    return "\n".join(out)


@dataclass
class BenchArgs:
    """GRPO completions/s: TRL defaults vs generation through align.fastgen"""

    device: str = "cpu"
    size: str = field(default="small", metadata={"help": f"one of {sorted(SIZES)}"})
    prompts: int = field(default=2, metadata={"help": "prompts per step"})
    num_generations: int = 4
    max_completion_length: int = 16
    steps: int = 3
    warmup: int = 1
    compile: bool = field(default=False, metadata={"help": "align's decode step through torch.compile"})
    variants: list[str] = field(default_factory=lambda: ["trl", "align"], metadata={
        "help": f"any of {VARIANTS}: -nogc without activation checkpointing, -liger with the fused kernels (CUDA)"})
    lora: bool = field(default=False, metadata={"help": "LoRA r16 on all linear layers, for every variant"})
    json: str | None = None

    def __post_init__(self):
        if self.size not in SIZES:
            raise ValueError(f"size must be one of {sorted(SIZES)}, got {self.size!r}")
        if isinstance(self.variants, str):  # one variant given as one word
            self.variants = [self.variants]
        if bad := sorted(set(self.variants) - set(VARIANTS)):
            raise ValueError(f"variants: unknown {bad}; choose from {VARIANTS}")
        if not 1 <= self.warmup < self.steps:
            raise ValueError(f"need 1 <= warmup < steps, got {self.warmup}, {self.steps}")


def main(argv: list[str] | None = None) -> int:
    from align.config import parse, run_command

    (a,) = run_command(parse, [BenchArgs], argv, prog="python -m align.bench grpo")
    run(size=a.size, device=a.device, n_prompts=a.prompts, num_generations=a.num_generations,
        max_completion_length=a.max_completion_length, steps=a.steps, warmup=a.warmup, json_path=a.json,
        compile=a.compile, variants=a.variants, lora=a.lora)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
