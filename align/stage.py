"""One stage runner: what SFT, the reward model, DPO, GRPO and PPO do around their trainer, alike.

    result = run_stage("dpo", configs, trainer_fn, tokenizer, start=policy, evaluate=evaluate_fn)

1. writes ``output_dir/config.yaml`` (every field of every config dataclass);
2. evaluates the start model (``evaluate(model, None)``) once and keeps it in ``before.json``, so a resumed run
   reuses it (it is tied to the start model's path);
3. trains from the last complete checkpoint (``--resume_from_checkpoint false`` starts over);
4. saves ``final/`` (an ordinary HF dir: LoRA merged, ZeRO-3/FSDP shards gathered; collective, every rank);
5. on rank 0, reloads ``final/`` and evaluates it (``evaluate(model, before)``: the stage compares with its
   start there, e.g. a win rate), and writes ``eval.json`` (with ``before``) and ``summary.json``;
6. returns a ``StageResult``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import PreTrainedModel, Trainer

from align.distributed import gathered_params, is_main_process, save_final, zero3_init_disabled
from align.models import load
from align.runs import resume_checkpoint, write_config, write_json

logger = logging.getLogger("align.stage")

Evaluate = Callable[[PreTrainedModel, "dict[str, Any] | None"], "dict[str, Any]"]

# TRL's preference metrics (DPO, KTO, CPO, ORPO) under the names every stage reports them by.
_TRL_METRICS = {"eval_rewards/accuracies": "reward_accuracy", "eval_rewards/margins": "reward_margin"}


@dataclass
class StageResult:
    """What a stage hands back: the figures of ``eval.json`` and the facts of ``summary.json``."""

    stage: str
    output_dir: Path
    final: Path | None
    train_loss: float | None = None
    steps: int = 0
    train_seconds: float = 0.0
    wall_seconds: float = 0.0
    eval: dict[str, Any] | None = None  # final/'s figures (None on ranks > 0 or when not evaluated)
    before: dict[str, Any] | None = None  # the start model's figures
    data: dict[str, Any] = field(default_factory=dict)  # what the data loader reported
    extra: dict[str, Any] = field(default_factory=dict)  # the stage's own facts

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("eval", "before"):
            d.pop(k)
        return {**d.pop("extra"), **d, "output_dir": str(self.output_dir), "final": str(self.final)}


def start_figures(out: Path, start: str, model: PreTrainedModel, evaluate: Evaluate,
                  device: torch.device | None = None) -> dict[str, Any]:
    """The start model's figures: ``before.json`` when it is of the same start, else evaluated on ``device``
    (the trainer's, where the model goes next anyway: a 135M model's evaluation on a GPU run's CPU took minutes)
    on every rank, since a ZeRO-3 model's parameters are gathered collectively, and written."""
    path = out / "before.json"
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("start") == start:
            logger.info("start model's figures from %s", path)
            return saved
    if device is not None and not any(hasattr(p, "ds_id") for p in model.parameters()):  # ZeRO-3 places itself
        model.to(device)
    was = model.training
    with gathered_params(model):
        before = {"start": start, **evaluate(model.eval(), None)}
    model.train(was)
    if is_main_process():  # every rank has the same figures; one writes them
        write_json(path, before)
    return before


def run_stage(
    stage: str,
    configs: tuple[Any, ...],
    make_trainer: Callable[[], Trainer],
    tokenizer: Any,
    *,
    start: str,
    start_model: PreTrainedModel | None = None,
    evaluate: Evaluate | None = None,
    head: str = "causal",
    data: dict[str, Any] | None = None,
    trainer_eval: bool = False,
    save: Callable[[Trainer, Path], Path] | None = None,
    save_kwargs: dict[str, Any] | None = None,
    log: Callable[[StageResult], None] | None = None,
) -> StageResult:
    """Run one training stage (see the module doc). ``configs[-1]`` is the trainer's config (``output_dir``,
    ``seed``, ``resume_from_checkpoint``); ``evaluate`` is None for a stage that evaluates nothing.
    ``trainer_eval``: also the trainer's own metrics on its eval set (TRL's reward accuracy for preference
    trainers). ``save(trainer, final_dir)`` replaces ``save_final`` (PPO saves its policy without the critic)."""
    t0 = time.time()
    args = configs[-1]
    out = Path(args.output_dir)
    if is_main_process():
        write_config(out, *configs)
    before = (start_figures(out, start, start_model, evaluate, args.device)
              if evaluate and start_model is not None else None)

    trainer = make_trainer()
    t = time.time()
    train_out = trainer.train(resume_from_checkpoint=resume_checkpoint(out, args.resume_from_checkpoint))
    train_seconds = time.time() - t
    has_eval_set = trainer.eval_dataset is not None and len(trainer.eval_dataset) > 0
    trl_eval = trainer.evaluate() if trainer_eval and has_eval_set else {}
    if save is not None:
        final = save(trainer, out / "final")
    else:
        final = save_final(trainer, tokenizer, out / "final", adapter_dir=out / "adapter", **(save_kwargs or {}))
    result = StageResult(stage, out, final, train_out.training_loss, trainer.state.global_step,
                         round(train_seconds, 1), data=data or {})
    if not trainer.is_world_process_zero():
        return result

    if evaluate is not None:
        with zero3_init_disabled():  # the evaluation's own loads (a reference) are whole too: rank 0 is alone here
            model = load(final, head, device=trainer.args.device)
            result.eval = evaluate(model, before)
        del model
    if trl_eval:
        result.eval = (result.eval or {}) | {v: trl_eval[k] for k, v in _TRL_METRICS.items() if k in trl_eval}
        result.eval["trl_eval"] = trl_eval
    result.before = before
    result.wall_seconds = round(time.time() - t0, 1)
    if log is not None:  # plots, log lines and the stage's own facts (result.extra), before the files
        log(result)
    if result.eval is not None:
        write_json(out / "eval.json", {**result.eval, "before": before})
    write_json(out / "summary.json", result.summary())
    return result


def log_figures(result: StageResult, keys: tuple[str, ...]) -> None:
    """One log line per figure: before -> after."""
    def f(d: dict | None, k: str) -> str:
        return f"{d[k]:.3f}" if d and isinstance(d.get(k), (int, float)) else "-"

    for k in keys:
        if (result.eval or {}).get(k) is not None:
            logger.info("%s %-22s before %s  after %s", result.stage, k, f(result.before, k), f(result.eval, k))
    logger.info("%s done in %.0fs (%d steps) -> %s", result.stage, result.wall_seconds, result.steps, result.final)
