"""PPO phase times: where one iteration of align.ppo's trainer goes (generation, policy + value forward, reference
forward, rewards, GAE, the update's forward/backward passes and optimizer steps).

    python -m align.bench ppo --model /work/models/smollm2-135m-instruct --batch 16 --max_completion_length 32 \
        --num_mini_batches 2                                   # CPU (docs/rl.md, "What one iteration costs")
    python -m align.bench ppo --device cuda --bf16 true --batch 128 --max_completion_length 64 --num_mini_batches 4

The trainer is built as ``align.ppo`` builds it (world prompts, rewards ``answer`` + ``correct``, a value head, the
frozen reference copy, ``align.fastgen`` on CUDA); ``iterations`` rollout + update iterations run, the first
``warmup`` of them untimed, and each phase's seconds are summed over the rest (CUDA synchronised around each).
"""

from __future__ import annotations

import collections
import tempfile
import time
from dataclasses import dataclass, field

import torch


@dataclass
class BenchArgs:
    model: str = field(default="/work/models/smollm2-135m-instruct", metadata={"help": "causal LM dir"})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda"})
    bf16: bool = field(default=False, metadata={"help": "mixed precision (bf16 autocast), as --bf16 true in align.ppo"})
    batch: int = field(default=16, metadata={"help": "rollouts per iteration (per_device_train_batch_size)"})
    max_completion_length: int = 32
    num_mini_batches: int = 2
    num_ppo_epochs: int = 2
    iterations: int = 1
    warmup: int = 0

    def __post_init__(self):
        if not 0 <= self.warmup < self.iterations:
            raise ValueError(f"need 0 <= warmup < iterations, got {self.warmup}, {self.iterations}")


def run(a: BenchArgs) -> dict[str, float]:
    from align import ppo_trainer as P
    from align import reward_funcs as R
    from align.models import load, load_tokenizer
    from align.rl import prompt_dataset

    device = torch.device(a.device)
    torch.manual_seed(0)
    tok, model = load_tokenizer(a.model), load(a.model)
    if device.type == "cuda":
        from align.fastgen import use_fast_generate

        use_fast_generate(model)
    args = P.PPOConfig(output_dir=tempfile.mkdtemp(prefix="bench-ppo-"), per_device_train_batch_size=a.batch,
                       max_completion_length=a.max_completion_length, num_mini_batches=a.num_mini_batches,
                       num_ppo_epochs=a.num_ppo_epochs, learning_rate=2e-6, max_steps=a.iterations,
                       save_strategy="no", report_to="none", bf16=a.bf16, use_cpu=device.type == "cpu", seed=0,
                       disable_tqdm=True, lr_scheduler_type="constant", reward_weights=[1.0, 1.0],
                       missing_eos_penalty=0.0, kl_coef=0.02)
    tr = P.PPOTrainer(model=model, args=args, processing_class=tok, reward_funcs=["answer", "correct"],
                      train_dataset=prompt_dataset("world", 2000, 0, 50))
    tr._prepare()
    t: dict[str, float] = collections.defaultdict(float)
    phase = {"name": "rollout", "timed": False}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed(name, fn):
        def f(*args, **kwargs):
            sync()
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            sync()
            if phase["timed"]:
                t[name() if callable(name) else name] += time.perf_counter() - t0
            return out
        return f

    tr._sample = timed("generation", tr._sample)
    tr.model.forward = timed(lambda: "policy + value forward" if phase["name"] == "rollout"
                             else "update: forward + backward", tr.model.forward)
    tr.ref_model.forward = timed("reference forward", tr.ref_model.forward)
    score_all, gae = R.score_all, P.compute_gae
    R.score_all, P.compute_gae = timed("rewards", score_all), timed("GAE", gae)
    backward = tr._backward
    tr._backward = timed("update: forward + backward", backward)
    try:
        for it in range(a.iterations):
            phase.update(name="rollout", timed=it >= a.warmup)
            ro = timed("rollout in all", tr.rollout)(tr._rows(it))
            phase["name"] = "update"
            timed("update in all", tr.ppo_update)(ro)
    finally:
        R.score_all, P.compute_gae = score_all, gae
    parts = ("generation", "policy + value forward", "reference forward", "rewards", "GAE")
    t["rollout: the rest (log-probs, KL, figures)"] = t["rollout in all"] - sum(t[k] for k in parts)
    t["update: the rest (losses, optimizer)"] = t["update in all"] - t["update: forward + backward"]
    return dict(t)


def main(argv: list[str] | None = None) -> int:
    from align.config import parse, run_command

    (a,) = run_command(parse, [BenchArgs], argv, prog="python -m align.bench ppo")
    t = run(a)
    n = a.iterations - a.warmup
    print(f"ppo: {a.model}, {a.device}{' bf16' if a.bf16 else ''}, {a.batch} rollouts of <= {a.max_completion_length} "
          f"tokens, {a.num_ppo_epochs} epochs x {a.num_mini_batches} mini-batches; seconds per iteration "
          f"(mean of {n})")
    for k in sorted(t, key=lambda k: ("update" in k, "in all" in k)):
        print(f"  {k:45s} {t[k] / n:8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
