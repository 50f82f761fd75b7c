"""The admin's Loop tab without Gradio: run ``python -m align.loop`` on this app's store, and say where it is.

The loop runs in a child process, so the server keeps serving labels while a round trains, and with
``labeller: human``: a round queues its pairs here and stops; once the annotators have labelled them,
the next run trains the round (a new reward model, the policy's DPO or RL step) and queues the next one.
One run at a time (``align.loop`` locks its output_dir); the runs' output goes to ``<output_dir>/app_runs.log``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import pandas as pd

LOG = "app_runs.log"  # in the loop's output_dir


class LoopRunner:
    def __init__(self, config: str, store_url: str):
        self.config, self.store_url = config, store_url
        self.rounds: int | None = None  # the admin's choice, else the config's
        self._proc: subprocess.Popen | None = None
        self._started = 0.0
        self._waits = False  # whether the current run waits for labels
        self._lock = threading.Lock()

    def args(self):
        """The loop's ``LoopArguments``: its config, with this app's store and human labels."""
        from align.config import parse
        from align.loop import CONFIG_TYPES

        if not Path(self.config).exists():
            raise FileNotFoundError(f"loop config {self.config} not found (set loop_config in configs/app.yaml)")
        (args,) = parse(CONFIG_TYPES, self._argv())
        return args

    def _argv(self, wait: bool = False) -> list[str]:
        argv = [self.config, "--labeller", "human", "--store_url", self.store_url]
        return argv + (["--rounds", str(self.rounds)] if self.rounds else []) + (
            ["--wait_for_labels", "true"] if wait else [])

    def _mine_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, rounds: int | None = None, wait: bool = False) -> str:
        """Start a run; refused while one runs (this app's, or any loop on the same output_dir, e.g. one
        started before the app restarted). ``wait``: the run waits for each round's labels and goes on
        (``wait_for_labels``) instead of stopping. Returns what was started."""
        from align.loop import running

        with self._lock:
            root = Path(self.args().output_dir)
            if self._mine_running() or running(root):
                raise RuntimeError(f"the loop is already running on {root}; wait for it to finish")
            self.rounds, self._waits = rounds or self.rounds, wait
            total = self.args().rounds
            log = root / LOG
            log.parent.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "align.loop", *self._argv(wait)]
            with open(log, "a", encoding="utf-8") as f:
                f.write(f"\n$ {' '.join(cmd)}   # {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
                f.flush()
                self._proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                              env=os.environ | {"TQDM_DISABLE": "1"})  # log lines, not bars
            self._started = time.monotonic()
            return f"started the loop (pid {self._proc.pid}, up to {total} rounds)"

    def wait(self, timeout: float | None = None) -> int | None:
        """Exit code of the current run once it ends (None: no run started)."""
        return None if self._proc is None else self._proc.wait(timeout)

    def status(self, log_lines: int = 12) -> dict[str, Any]:
        """``align.loop.status`` plus the run: running, its seconds, the last exit code and the log's tail."""
        from align.loop import status

        args = self.args()
        out = status(args)
        mine = self._mine_running()
        out["running"] = out["running"] or mine
        out["waits"] = mine and self._waits
        out["seconds"] = round(time.monotonic() - self._started) if mine else None
        out["exit_code"] = None if self._proc is None or mine else self._proc.returncode
        log = Path(args.output_dir) / LOG
        if log.exists():
            with open(log, encoding="utf-8", errors="replace") as f:
                out["log"] = "".join(deque(f, maxlen=log_lines))
        else:
            out["log"] = ""
        return out


def status_markdown(st: dict[str, Any]) -> str:
    """One paragraph for the tab: what runs, what waits for labels, what to do next."""
    done, total = st["rounds_done"], st["rounds"]
    parts = [f"**{done} of {total}** rounds trained."]
    w = st.get("waiting")
    if st["running"]:
        parts.append("**Running**" + (f" ({st['seconds']} s)." if st["seconds"] is not None else "."))
    elif st["exit_code"]:
        parts.append(f"⚠️ The last run failed (exit code {st['exit_code']}); its log is below.")
    if w and st.get("waits") and w["unlabelled"]:
        parts.append(f"Round {w['round']}: **{w['unlabelled']} of {w['comparisons']}** pairs still need a label; the "
                     "loop trains on them as soon as they have one.")
    elif w and not st["running"]:
        left = w["unlabelled"]
        if left:
            parts.append(f"Round {w['round']}: **{left} of {w['comparisons']}** pairs still need a label "
                         "(they are in the Label tab's queue). Run the loop once they are labelled.")
        else:
            parts.append(f"Round {w['round']}: all {w['comparisons']} pairs are labelled — **run the loop** to "
                         "train on them.")
    elif not st["running"] and done >= total:
        parts.append("All rounds are done; raise *rounds* to go on.")
    elif not st["running"]:
        parts.append(f"Run the loop: round {done + 1}'s candidates will be queued here for labelling.")
    return " ".join(parts)


# (header, part of a round's report, key): the world's figures mean nothing on a real model's prompts, so a column
# that no round has a value for is left out (rounds_table)
COLUMNS = [("EM greedy", "policy", "exact_match"), ("EM sampled", "policy", "exact_match_sampled"),
           ("maj@k", "policy", "maj_at_k"), ("preferred", "policy", "preferred_rate"),
           ("win rate", "policy", "win_rate_vs_previous"), ("gold greedy", "gold", "gold_reward_greedy"),
           ("gold sampled", "gold", "gold_reward_sampled"), ("RM accuracy", "reward", "accuracy")]


def rounds_table(report: dict[str, Any]) -> pd.DataFrame:
    """One row per round (0 is the start): its pairs and the held-out figures any round reports. The win rate is vs
    the round before, judged by the round's RM; gold is the gold labeller's mean reward (labeller gold_rm)."""
    rounds = ({"0": report["start"]} if "start" in report else {}) | report.get("rounds", {})
    rows = [[int(k), r.get("pairs")] + [_r(r.get(part, {}).get(key)) for _, part, key in COLUMNS]
            for k, r in rounds.items()]
    keep = [i for i in range(len(COLUMNS)) if any(row[2 + i] is not None for row in rows)]
    return pd.DataFrame([row[:2] + [row[2 + i] for i in keep] for row in rows],
                        columns=["round", "pairs"] + [COLUMNS[i][0] for i in keep], dtype=object)


def _r(x: Any) -> Any:
    return round(x, 3) if isinstance(x, float) else x
