"""``python -m align.bench labels``: gold reward per label, for each pair selection of the gold-labelled loop.

    python -m align.bench labels --config configs/smollm2/loop_gold.yaml --seeds 0 1 2 --parallel 12 \\
        --set policy_path=/tmp/smol reward_base_path=/tmp/smol gold_model_path=/tmp/gold/final --out runs/labels

Runs ``python -m align.loop CONFIG --selection S --seed K`` for every selection x seed (``labeller: gold_rm``,
``align.gold``), ``--parallel`` at a time, each in ``OUT/S-K/`` with its own store and ``OMP_NUM_THREADS`` =
``cores / parallel`` (on a GPU they share the card: ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``). A run
whose ``result.json`` exists is kept. Past ``--timeout_s`` the runs still going are stopped and what their rounds
finished is aggregated. Then, per selection and round: the mean over seeds and a 95 % t-interval of the gold
reward of the policy's greedy replies (and of the other figures), against the labels used so far; ``labels.png``,
``summary.json``, ``summary.md``, and whether some selection reaches random's final gold reward with at most half
of random's labels.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

SELECTIONS = ["random", "uncertainty", "disagreement", "extremes"]
FIGURES = ("gold_reward_greedy", "gold_reward_sampled", "win_rate_vs_start_greedy", "win_rate_vs_start_sampled",
           "proxy_accuracy_vs_gold", "proxy_reward_sampled", "kl_to_start")
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}  # t(0.975, df)


@dataclass
class BenchArgs:
    """gold reward per label, for each pair selection of the gold-labelled loop (align.gold)"""

    config: str = field(default="configs/smollm2/loop_gold.yaml", metadata={"help": "the loop's config"})
    selections: list[str] = field(default_factory=lambda: list(SELECTIONS), metadata={"help": "selections to run"})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "seeds to run each selection with"})
    set: list[str] = field(default_factory=list, metadata={"help": "loop keys for every run, as key=value words"})
    out: str = field(default="runs/bench_labels", metadata={"help": "OUT/<selection>-<seed>/, labels.png, summary.*"})
    parallel: int = field(default=1, metadata={"help": "loops at once"})
    cores: int = field(default=0, metadata={"help": "cores to share among the parallel loops (0: all of them)"})
    timeout_s: float = field(default=0.0, metadata={"help": "stop runs still going after this long (0: never)"})
    aggregate_only: bool = field(default=False, metadata={"help": "run nothing: aggregate and plot OUT as it is"})
    share_first_round: bool = field(default=True, metadata={
        "help": "with no start reward model, round 1 is the same for every selection: run it once per seed"})

    def __post_init__(self):
        self.selections = [self.selections] if isinstance(self.selections, str) else self.selections
        self.seeds = [self.seeds] if isinstance(self.seeds, int) else self.seeds
        self.set = [self.set] if isinstance(self.set, str) else self.set
        bad = [s for s in self.selections if s not in SELECTIONS]
        if bad or not self.selections or not self.seeds:
            raise ValueError(f"selections must be some of {SELECTIONS} and seeds non-empty, got {self.selections}, "
                             f"{self.seeds}")
        if any("=" not in kv for kv in self.set):
            raise ValueError(f"set takes key=value words, got {self.set}")
        if self.parallel < 1 or self.timeout_s < 0:
            raise ValueError(f"parallel must be >= 1 and timeout_s >= 0, got {self.parallel}, {self.timeout_s}")


def command(a: BenchArgs, selection: str, seed: int, run_dir: Path, *extra: str) -> list[str]:
    sets = [w for kv in a.set for w in (f"--{kv.split('=', 1)[0]}", kv.split("=", 1)[1])]
    return [sys.executable, "-m", "align.loop", a.config, "--selection", selection, "--seed", str(seed),
            "--output_dir", str(run_dir), "--store_url", f"sqlite:///{run_dir.resolve()}/store.db", *sets, *extra]


def loop_args(a: BenchArgs):
    """The loops' arguments (the config and ``set``), checked before anything runs."""
    from align.config import parse
    from align.loop import CONFIG_TYPES

    (args,) = parse(CONFIG_TYPES, command(a, "random", 0, Path(a.out) / "x")[3:])
    if args.labeller != "gold_rm":
        raise ValueError(f"{a.config}: the bench needs labeller: gold_rm, got {args.labeller!r}")
    return args


def launch(jobs: list[tuple[str, list[str]]], a: BenchArgs, out: Path, t0: float) -> dict[str, str]:
    """Run ``(name, argv)`` jobs ``parallel`` at a time (logs: ``OUT/<name>.log``) until done or ``timeout_s``
    after ``t0``; the state each ended in. A job that dies of CUDA out of memory runs again once, later, with
    one job fewer at a time from then on (a loop carries on from its last finished round)."""
    threads = max(1, (a.cores or os.cpu_count() or 1) // a.parallel)
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                        "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", "PYTHONUNBUFFERED": "1"}
    todo, state, going, limit, retried = list(jobs), {}, {}, a.parallel, set()
    while todo or going:
        while todo and len(going) < limit:
            name, argv = todo.pop(0)
            log = open(out / f"{name}.log", "a")
            going[name] = (subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT), log)
            print(f"[{time.monotonic() - t0:5.0f} s] started {name} ({threads} threads)", flush=True)
        for name, (p, log) in list(going.items()):
            if p.poll() is not None:
                log.close()
                state[name] = "done" if p.returncode == 0 else f"failed ({p.returncode})"
                if p.returncode and name not in retried and out_of_memory(out / f"{name}.log"):
                    retried.add(name)
                    todo.append((name, p.args))
                    limit = max(1, limit - 1)
                    state[name] += f": CUDA out of memory, runs again with {limit} at a time"
                print(f"[{time.monotonic() - t0:5.0f} s] {name}: {state[name]}", flush=True)
                del going[name]
        if a.timeout_s and time.monotonic() - t0 > a.timeout_s:
            for name, (p, log) in going.items():
                p.terminate()
                p.wait()
                log.close()
                state[name] = "stopped at timeout_s"
            state |= {name: "not started (timeout_s)" for name, _ in todo}
            print(f"[{time.monotonic() - t0:5.0f} s] timeout_s: stopped {len(going)}, {len(todo)} not started")
            break
        time.sleep(1)
    return state


def out_of_memory(log: Path) -> bool:
    """Whether a run's log ends in CUDA running out of memory (its last 64 KB)."""
    with open(log, "rb") as f:
        f.seek(max(0, log.stat().st_size - 65536))
        return b"OutOfMemoryError" in f.read()


def copy_first_round(src: Path, dst: Path) -> None:
    """A selection's run dir from the shared round 1: round_1/ hard-linked (never written again), the files the
    loop appends to or writes (report, metrics, the store) copied."""
    dst.mkdir(parents=True)
    shutil.copytree(src / "round_1", dst / "round_1", copy_function=os.link)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith("lock") and f.name != "result.json":  # (its result is a 1-round one)
            shutil.copy2(f, dst / f.name)


def run_all(a: BenchArgs, out: Path) -> dict[str, str]:
    """Every selection x seed not done yet, ``parallel`` at a time; the state each run ended in. A gold loop that
    starts with no reward model picks round 1's pairs at random whatever its selection, so round 1 runs once per
    seed (``first-<seed>``) and each selection carries on from a copy of it (``share_first_round``)."""
    t0, state = time.monotonic(), {}
    todo = [(s, k) for k in a.seeds for s in a.selections if not (out / f"{s}-{k}").exists()]
    share = a.share_first_round and loop_args(a).reward_model_path is None
    if share:
        firsts = sorted({k for _, k in todo if not (out / f"first-{k}" / "round_1" / "dpo" / "final").exists()})
        state |= launch([(f"first-{k}", command(a, "random", k, out / f"first-{k}", "--rounds", "1"))
                         for k in firsts], a, out, t0)
        for s, k in todo:
            if (out / f"first-{k}" / "round_1" / "dpo" / "final").exists():
                copy_first_round(out / f"first-{k}", out / f"{s}-{k}")
    jobs = [(f"{s}-{k}", command(a, s, k, out / f"{s}-{k}")) for k in a.seeds for s in a.selections
            if not (out / f"{s}-{k}" / "result.json").exists() and not (share and not (out / f"{s}-{k}").exists())]
    return state | launch(jobs, a, out, t0)


def curve(run_dir: Path) -> dict[str, list] | None:
    """A run's figures per round (0 = the start) from its report.json, as far as its rounds got."""
    path = run_dir / "report.json"
    if not path.exists():
        return None
    rep = json.loads(path.read_text())
    if "gold" not in rep.get("start", {}):
        return None
    rows = [rep["start"]["gold"]]
    for k in range(1, len(rep["rounds"]) + 1):  # the rounds in a row: a gap (a killed round) ends the curve
        if "gold" not in rep["rounds"].get(str(k), {}):
            break
        rows.append(rep["rounds"][str(k)]["gold"])
    return {key: [r.get(key) for r in rows] for key in ("labels", *FIGURES)}


def seeds_label(rows: list[dict]) -> str:
    """'3 seeds', or '3 -> 1 seeds' where fewer seeds reached the last rounds (their interval widens)."""
    first, last = rows[0]["seeds"] if rows else 0, rows[-1]["seeds"] if rows else 0
    return f"{first} seeds" if first == last else f"{first} -> {last} seeds"


def interval(xs: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % t-interval (0 for one value)."""
    m = statistics.mean(xs)
    if len(xs) < 2:
        return m, 0.0
    return m, T975.get(len(xs) - 1, 1.96) * statistics.stdev(xs) / math.sqrt(len(xs))


def aggregate(curves: dict[str, dict[int, dict]]) -> dict[str, list[dict]]:
    """Per selection, per round: the seeds that got there, mean labels and each figure's mean and 95 % half-width."""
    out = {}
    for s, by_seed in curves.items():
        rounds = max(len(c["labels"]) for c in by_seed.values())
        rows = []
        for k in range(rounds):
            have = [c for c in by_seed.values() if len(c["labels"]) > k]
            row = {"round": k, "seeds": len(have), "labels": statistics.mean(c["labels"][k] for c in have)}
            for key in FIGURES:
                xs = [c[key][k] for c in have if c[key][k] is not None]
                if xs:
                    row[key], row[f"{key}_ci95"] = interval(xs)
            rows.append(row)
        out[s] = rows
    return out


def verdict(agg: dict[str, list[dict]], first_selected: int = 1, key: str = "gold_reward_greedy") -> dict:
    """Whether some selection reaches random's final mean ``key`` with at most half of random's labels, counting
    only rounds from ``first_selected`` on (before it every selection's pairs were random: a hit there is noise)."""
    if "random" not in agg or len(agg["random"]) < 2:
        return {"answer": "no random baseline with a trained round"}
    start, final = agg["random"][0], agg["random"][-1]
    out = {"random_final": final.get(key), "random_labels": final["labels"], "random_gain": final[key] - start[key],
           "first_selected_round": first_selected, "selections": {}}
    for s, rows in agg.items():
        if s == "random":
            continue
        hit = next((r for r in rows[first_selected:] if r.get(key) is not None and r[key] >= final[key]), None)
        out["selections"][s] = {"labels_to_reach": hit["labels"] if hit else None,
                                "share_of_random": hit["labels"] / final["labels"] if hit else None,
                                "final": rows[-1].get(key), "final_round": rows[-1]["round"]}
    wins = [s for s, v in out["selections"].items() if v["share_of_random"] is not None and v["share_of_random"] <= 0.5]
    out["answer"] = (f"yes: {', '.join(wins)} reach random's final {key} with <= half its labels" if wins else
                     f"no: no selection reaches random's final {key} ({final[key]:.3f} at {final['labels']:.0f} "
                     "labels) with half its labels or fewer")
    if out["random_gain"] <= 0:
        out["answer"] += f" (random's own {key} did not rise above the start's: {out['random_gain']:+.3f})"
    return out


def plot(agg: dict[str, list[dict]], png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("gold_reward_greedy", "labels", "gold reward, greedy replies"),
              ("win_rate_vs_start_sampled", "labels", "win rate vs start (gold, sampled)"),
              ("proxy_accuracy_vs_gold", "labels", "proxy RM accuracy vs gold labels"),
              ("gold_reward_sampled", "kl_to_start", "gold reward (sampled) vs KL to start")]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    axes = axes.ravel()
    for ax, (key, x, name) in zip(axes, panels):
        for s, rows in agg.items():
            pts = [r for r in rows if r.get(key) is not None and r.get(x) is not None]
            xs = [r[x] for r in pts]
            ys, ci = [r[key] for r in pts], [r.get(f"{key}_ci95", 0.0) for r in pts]
            ax.plot(xs, ys, marker="o", label=f"{s} ({seeds_label(rows)})")
            ax.fill_between(xs, [y - c for y, c in zip(ys, ci)], [y + c for y, c in zip(ys, ci)], alpha=0.15)
        ax.set(xlabel="labels used" if x == "labels" else "KL to the start policy (nats)", title=name)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def markdown(agg: dict[str, list[dict]]) -> str:
    lines = ["| selection | round | seeds | labels | gold reward greedy (± 95 %) | gold sampled | win rate vs start "
             "(sampled) | proxy acc. vs gold | KL |", "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]

    def f(r, key, ci=False):
        if r.get(key) is None:
            return "–"
        return f"{r[key]:.3f} ± {r[f'{key}_ci95']:.3f}" if ci else f"{r[key]:.3f}"

    for s, rows in agg.items():
        for r in rows:
            lines.append(f"| {s} | {r['round']} | {r['seeds']} | {r['labels']:.0f} "
                         f"| {f(r, 'gold_reward_greedy', True)} | {f(r, 'gold_reward_sampled')} "
                         f"| {f(r, 'win_rate_vs_start_sampled')} "
                         f"| {f(r, 'proxy_accuracy_vs_gold')} | {f(r, 'kl_to_start')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from align.config import parse, run_command

    (a,) = run_command(parse, [BenchArgs], argv, prog="python -m align.bench labels")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    state = {} if a.aggregate_only else run_all(a, out)
    curves: dict[str, dict[int, dict]] = {}
    for s in a.selections:
        for k in a.seeds:
            c = curve(out / f"{s}-{k}")
            if c:
                curves.setdefault(s, {})[k] = c
    if not curves:
        print(f"error: no run in {out} finished a round (logs: {out}/*.log)", file=sys.stderr)
        return 1
    agg = aggregate(curves)
    v = verdict(agg, 2 if a.share_first_round and loop_args(a).reward_model_path is None else 1)
    summary = {"runs": state, "aggregate": agg, "verdict": v, "seconds": round(time.perf_counter() - t0, 1),
               "command": command(a, "SELECTION", 0, out / "SELECTION-SEED")[2:]}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    table = markdown(agg)
    (out / "summary.md").write_text(table + f"\n{v['answer']}\n")
    plot(agg, out / "labels.png", f"gold-labelled loop: {a.config}")
    bad = {name: how for name, how in state.items() if how != "done"}
    print(table + f"\n{v['answer']}\n" + "".join(f"\n{name}: {how} (log: {out}/{name}.log)"
                                                 for name, how in bad.items())
          + f"\n\nwrote {out}/labels.png, summary.json, summary.md ({summary['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
