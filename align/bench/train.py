"""SFT and DPO throughput: align's settings vs TRL's trainers with their defaults (and with use_liger_kernel),
on the same random-initialised model shape and the same data, in one process on one device.

    python -m align.bench sft --device cuda --size smollm2-135m --batch 8 --max_length 1024 [--lora]
    python -m align.bench dpo --device cuda --size smollm2-135m --batch 8 --max_length 1024 [--lora]

Data: synthetic prompt/completion (SFT) or prompt/chosen/rejected (DPO) texts over a word-level tokenizer
whose vocabulary is the model's, with chat-like lengths (prompt 16..L/4, completion 16..L/2 tokens, uniform),
so padding costs what it costs on real data; speed does not depend on the words. Rows:

- ``trl``: TRL's trainer with its defaults (bf16 on GPU, gradient checkpointing on, no packing; DPO with a
  reference model copy) on HF LlamaForCausalLM, what a user would run;
- ``trl-liger``: the same + ``use_liger_kernel`` (fused RMSNorm/RoPE/SwiGLU), where liger-kernel is installed;
- ``align``: align's settings on our decoder: SFT packs conversations into rows (``packing``, bfd, kept apart
  by align.sft.PackedRowsCollator), DPO precomputes the reference log-probs once (``precompute_ref_log_probs``,
  no reference model in memory); gradient checkpointing as TRL's default;
- ``align-nogc``: the same without gradient checkpointing (faster, more memory);
- ``align-liger``: ``align`` + ``use_liger_kernel`` (the decoder's fused path: align/model/kernels.py), on CUDA.

tokens/s counts real (non-pad) tokens through the policy per second over the timed steps (after
``--warmup`` steps); for DPO the reference pre-pass is charged pro rata to the steps. MFU = tokens/s x
fwd+bwd FLOPs per token / the device's datasheet bf16 peak (DPO's reference forward, 2/6 of that, is not counted).
"""

from __future__ import annotations

import copy
import json
import os
import random
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from align.bench.model import SIZES, device_name, peak_flops, peak_gib, reset_peak, train_flops_per_token, versions
from align.convert import to_llama
from align.model import DecoderConfig, DecoderForCausalLM


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer of ``vocab_size`` ids: "w17" <-> 17; 0 pad, 1 eos, 2 bos."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")


def synthetic_rows(kind: str, n: int, vocab_size: int, max_length: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    words = lambda k: " ".join(f"w{rng.randrange(3, vocab_size)}" for _ in range(k))  # noqa: E731
    hi_p, hi_c = max(16, max_length // 4), max(16, max_length // 2) - 1  # -1: room for eos
    rows = []
    for _ in range(n):
        row = {"prompt": words(rng.randint(16, hi_p))}
        if kind == "sft":
            row["completion"] = " " + words(rng.randint(16, hi_c))
        else:
            row["chosen"], row["rejected"] = " " + words(rng.randint(16, hi_c)), " " + words(rng.randint(16, hi_c))
        rows.append(row)
    return rows


class _Timer:
    """Trainer callback + collator wrapper: real tokens per batch, wall time from step ``warmup`` to the end."""

    def __init__(self, collator, pad_id: int, warmup: int, device: torch.device):
        self.collator, self.pad_id, self.warmup, self.device = collator, pad_id, warmup, device
        self.tokens: list[int] = []
        self.t0 = self.t1 = None

    def __call__(self, examples):
        batch = self.collator(examples)
        self.tokens.append(int((batch["input_ids"] != self.pad_id).sum()))
        return batch

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def callback(self):
        from transformers import TrainerCallback

        timer = self

        class CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                if state.global_step == timer.warmup:
                    timer._sync()
                    timer.t0 = time.perf_counter()

            def on_train_end(self, args, state, control, **kw):
                timer._sync()
                timer.t1 = time.perf_counter()

        return CB()


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")


def run_one(kind: str, variant: str, base: DecoderForCausalLM, tok, rows, device: torch.device, batch: int,
            max_length: int, steps: int, warmup: int, lora: bool) -> dict[str, Any]:
    """One trainer run; returns tokens/s over the timed steps, peak memory and the last loss."""
    from datasets import Dataset

    ours = variant.startswith("align")
    model = DecoderForCausalLM(base.config) if ours else to_llama(base)
    if ours:
        model.load_state_dict(base.state_dict())
        model.set_use_liger_kernel(variant == "align-liger")  # what --use_liger_kernel does in align.sft
    model.to(device)
    common = dict(
        output_dir=tempfile.mkdtemp(prefix=f"bench-{kind}-"), max_steps=steps, per_device_train_batch_size=batch,
        max_length=max_length, report_to="none", save_strategy="no", logging_steps=max(steps, 1), disable_tqdm=True,
        dataloader_num_workers=0, seed=0, use_cpu=device.type == "cpu", bf16=device.type == "cuda",
    )
    if variant == "trl-liger":
        common["use_liger_kernel"] = True
    if variant == "align-nogc":
        common["gradient_checkpointing"] = False
    reset_peak(device)
    data = Dataset.from_list(rows)
    pre_s, pre_peak = 0.0, None
    if kind == "sft":
        from trl import SFTConfig, SFTTrainer

        from align.sft import PackedRowsCollator

        args = SFTConfig(**common, packing=ours)
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                             peft_config=lora_config() if lora else None)
        if ours:  # as align.sft does under SDPA: packed rows that cannot see each other
            trainer.data_collator = PackedRowsCollator(pad_token_id=tok.pad_token_id)
    else:
        from trl import DPOConfig, DPOTrainer

        # the pre-pass runs without gradients, so a larger batch stays under a training step's peak: 4x for full
        # training, 2x with LoRA, whose step holds no optimizer state for the base (measured: 4x was the peak there)
        args = DPOConfig(**common, precompute_ref_log_probs=ours, precompute_ref_batch_size=(2 if lora else 4) * batch)
        # TRL loads the reference from the policy's path; a user with an in-memory model passes a copy
        ref = copy.deepcopy(model) if not ours and not lora else None
        orig = DPOTrainer._precompute_ref_logps

        def timed(self, *a, **kw):  # the reference pre-pass runs inside __init__: time it for the pro-rata charge
            nonlocal pre_s, pre_peak
            t = time.perf_counter()
            out = orig(self, *a, **kw)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                pre_peak = peak_gib(device)  # the pre-pass's share of the peak
            pre_s += time.perf_counter() - t
            return out

        DPOTrainer._precompute_ref_logps = timed
        try:
            trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=data, processing_class=tok,
                                 peft_config=lora_config() if lora else None)
        finally:
            DPOTrainer._precompute_ref_logps = orig
    timer = _Timer(trainer.data_collator, tok.pad_token_id, warmup, device)
    trainer.data_collator = timer
    trainer.add_callback(timer.callback())
    result = trainer.train()
    tokens = sum(timer.tokens[warmup:steps])
    seconds = timer.t1 - timer.t0
    if pre_s:  # the pre-pass covered the whole dataset; charge the timed steps' share
        seconds += pre_s * (steps - warmup) / max(len(trainer.train_dataset) / batch, 1)
    out = {"tokens_per_s": tokens / seconds, "step_s": seconds / (steps - warmup), "loss": result.training_loss,
           "tokens_per_step": tokens / (steps - warmup), "pre_pass_s": pre_s, "pre_pass_peak_gib": pre_peak,
           "peak_gib": peak_gib(device)}
    del trainer, model
    return out


def run(kind="sft", size="small", device="cpu", batch=4, max_length=256, steps=6, warmup=2, lora=False,
        variants=None, seed=0, json_path=None, align_batch=None) -> list[dict]:
    device = torch.device(device)
    torch.manual_seed(seed)
    config = DecoderConfig(**SIZES[size], max_position_embeddings=max(max_length, 2048), eos_token_id=1,
                           pad_token_id=0, bos_token_id=2)
    base = DecoderForCausalLM(config)
    tok = word_tokenizer(config.vocab_size)
    rows = synthetic_rows(kind, 4 * batch * steps, config.vocab_size, max_length, seed)  # packing needs fewer
    if variants is None:
        try:
            import liger_kernel  # noqa: F401

            has_liger = device.type == "cuda"
        except ImportError:
            has_liger = False
        variants = ["trl", *(["trl-liger"] if has_liger else []), "align", "align-nogc",
                    *(["align-liger"] if has_liger else [])]
    peak = peak_flops(device)
    fpt = train_flops_per_token(config, max_length)
    results = []
    for v in variants:
        rows_per_step = align_batch if align_batch and kind == "sft" and v.startswith("align") else batch
        try:
            r = run_one(kind, v, base, tok, rows, device, rows_per_step, max_length, steps, warmup, lora)
        except Exception as e:  # noqa: BLE001  one broken variant (say liger vs this transformers) keeps the others
            print(f"{kind} {v}: FAILED {type(e).__name__}: {e}", flush=True)
            continue
        r.update(bench=kind, variant=v, size=size, params=sum(p.numel() for p in base.parameters()),
                 device=device_name(device), batch=rows_per_step, max_length=max_length, steps=steps, warmup=warmup,
                 lora=lora, mfu=r["tokens_per_s"] * fpt / peak if peak else None, versions=versions())
        results.append(r)
        if json_path:
            with open(json_path, "a") as f:
                f.write(json.dumps(r) + "\n")
        print(f"{kind} {v}: {r['tokens_per_s']:,.0f} tokens/s", flush=True)
    if not results:
        return results
    ref = next((r for r in results if r["variant"] == "trl"), results[0])["tokens_per_s"]
    for r in results:
        r["vs_trl"] = r["tokens_per_s"] / ref
    print(format_table(results), flush=True)
    return results


def format_table(rows: list[dict]) -> str:
    r = rows[0]
    lora = " (LoRA r16, all linear)" if r["lora"] else ""
    out = [f"{r['bench']}{lora}: {r['size']} ({r['params'] / 1e6:.1f}M params), "
           f"{r['device']}, max_length {r['max_length']}, {r['steps'] - r['warmup']} timed steps "
           f"after {r['warmup']}; {r['versions']}", "",
           "| variant | batch | tokens/s | vs TRL defaults | s/step | tokens/step | MFU | peak GiB | loss |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
        out.append(f"| {r['variant']} | {r['batch']} | {r['tokens_per_s']:,.0f} | {r['vs_trl']:.2f} | "
                   f"{r['step_s']:.3f} | {r['tokens_per_step']:,.0f} | {mfu} | {peak} | {r['loss']:.3f} |")
    return "\n".join(out)


@dataclass
class BenchArgs:
    """training throughput vs TRL's defaults (and Liger)"""

    device: str = "cpu"
    size: str = field(default="small", metadata={"help": f"one of {sorted(SIZES)}"})
    batch: int = field(default=4, metadata={"help": "per-device batch (examples, or packed rows for align)"})
    max_length: int = 256
    steps: int = field(default=6, metadata={"help": "optimizer steps per run, warm-up included"})
    warmup: int = field(default=2, metadata={"help": "untimed first steps"})
    lora: bool = field(default=False, metadata={"help": "LoRA r16 on all linear layers, for every variant"})
    variants: list[str] | None = field(
        default=None, metadata={"help": "any of trl, trl-liger, align, align-nogc, align-liger; default: all that "
                                        "apply (the -liger ones where liger-kernel and CUDA are there)"})
    align_batch: int | None = field(default=None, metadata={
        "help": "sft: packed rows per step for align's variants (default: batch). A packed row holds more real tokens "
                "than a padded example (~2.6x at max_length 1024): set it to compare at equal tokens per step"})
    json: str | None = field(default=None, metadata={"help": "append one JSON line per variant to this file"})

    def __post_init__(self):
        if self.size not in SIZES:
            raise ValueError(f"size must be one of {sorted(SIZES)}, got {self.size!r}")
        if self.steps <= self.warmup:
            raise ValueError(f"steps ({self.steps}) must exceed warmup ({self.warmup})")
        if isinstance(self.variants, str):  # one variant given as one word
            self.variants = [self.variants]
        bad = set(self.variants or ()) - {"trl", "trl-liger", "align", "align-nogc", "align-liger"}
        if bad:
            raise ValueError(f"variants: unknown {sorted(bad)}")


def bench_main(kind: str, argv: list[str] | None = None) -> int:
    """The sft and dpo benches' command line (``align.bench.sft`` / ``.dpo``)."""
    from align.config import parse, run_command

    (a,) = run_command(parse, [BenchArgs], argv, prog=f"python -m align.bench {kind}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run(kind, size=a.size, device=a.device, batch=a.batch, max_length=a.max_length, steps=a.steps, warmup=a.warmup,
        lora=a.lora, variants=a.variants, json_path=a.json, align_batch=a.align_batch)
    return 0
