"""What every run writes to its ``output_dir``: the resolved config, ``metrics.jsonl``, PNG plots,
checkpoints (by the trainer) and ``final/``; and resuming from the last checkpoint after a kill."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable

import yaml
from transformers import TrainerCallback

from align.config import to_dict

logger = logging.getLogger("align")


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=level)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub implicitly
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def write_config(output_dir: str | os.PathLike, *configs: Any) -> Path:
    """Write the resolved config (every field of every dataclass, one flat mapping) to config.yaml."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    merged: dict[str, Any] = {}
    for c in configs:
        merged.update(to_dict(c))
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(merged, sort_keys=True, allow_unicode=True))
    return path


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=_json_default) + "\n")
    return path


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def resume_checkpoint(output_dir: str | os.PathLike, resume_from_checkpoint: str | bool | None) -> str | None:
    """The checkpoint to resume from: an explicit path, else the last ``checkpoint-*`` in output_dir.

    Resuming is automatic so that re-running a killed command carries on where it stopped; pass
    ``--resume_from_checkpoint false`` to start over (the old checkpoints are then overwritten).
    """
    if isinstance(resume_from_checkpoint, str) and resume_from_checkpoint.lower() not in ("true", "false"):
        return resume_from_checkpoint
    if resume_from_checkpoint is False or str(resume_from_checkpoint).lower() == "false":
        return None
    if not Path(output_dir).is_dir():
        return None
    # Trainer writes trainer_state.json last: a checkpoint without it was cut short by the kill.
    checkpoints = sorted(Path(output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1])
                         if p.name.split("-")[-1].isdigit() else -1, reverse=True)
    for ckpt in checkpoints:
        if (ckpt / "trainer_state.json").exists():
            logger.info("resuming from %s", ckpt)
            return str(ckpt)
        logger.warning("skipping %s: incomplete (killed while saving)", ckpt)
    return None


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_metrics(
    metrics_path: str | os.PathLike,
    out_png: str | os.PathLike,
    keys: Iterable[str] | None = None,
    title: str = "",
) -> Path | None:
    """One small panel per numeric metric over steps (or the chosen keys) in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    series: dict[str, tuple[list[float], list[float]]] = {}
    for r in rows:
        step = r.get("step")
        if step is None:
            continue
        for k, v in r.items():
            if k in ("step", "epoch") or not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            if not math.isfinite(v) or (keys is not None and k not in keys):
                continue
            xs, ys = series.setdefault(k, ([], []))
            xs.append(step)
            ys.append(v)
    series = {k: s for k, s in series.items() if len(s[0]) >= 1}
    if not series:
        return None
    names = sorted(series, key=lambda k: (not k.endswith("loss"), k))[:16]
    ncol = min(4, len(names))
    nrow = math.ceil(len(names) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.6 * ncol, 2.6 * nrow), squeeze=False)
    for ax, name in zip(axes.flat, names):
        xs, ys = series[name]
        ax.plot(xs, ys, marker="." if len(xs) < 30 else None, linewidth=1.2)
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


class MetricsCallback(TrainerCallback):
    """Appends every trainer log to ``metrics.jsonl`` (with tokens/s where known) and plots at the end."""

    def __init__(self, output_dir: str | os.PathLike, title: str = ""):
        self.dir = Path(output_dir)
        self.path = self.dir / "metrics.jsonl"
        self.title = title
        self._t0 = None
        self._tokens0 = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._t0 = time.time()
        self._tokens0 = state.num_input_tokens_seen or 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        row = {"step": state.global_step, "epoch": state.epoch, **logs}
        seen = state.num_input_tokens_seen or 0
        if seen and self._t0 is not None and time.time() > self._t0:
            row["tokens_per_second"] = round((seen - self._tokens0) / (time.time() - self._t0), 1)
        self.dir.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(row, default=_json_default) + "\n")

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            plot_metrics(self.path, self.dir / "metrics.png", title=self.title)
