"""``python -m align.bench overopt``: where the proxy reward model stops telling the truth (Gao et al. 2022).

    python -m align.bench overopt --policy /tmp/smol --gold /tmp/gold/final --proxy runs/labels/random-0 \\
        --loop_runs runs/labels/*-* --out runs/overopt

Best-of-n: the start policy samples ``n_max`` replies to each held-out prompt (the loop's split: ``dataset_name``,
``heldout_fraction``); the proxy (``--proxy``: reward-model dirs, or a loop run's dir, whose last round's
ensemble it takes) and the gold model score them. For n = 1, 2, 4, ... n_max the expected gold (and proxy) reward
of the proxy's pick among n is exact over all n-subsets (``align.gold.best_of_n_expected``), against the analytic
KL of best-of-n, log n - (n - 1)/n. With an ensemble, the pick is by mean - penalty x std, for each ``penalties``
(Coste et al. 2023): does the penalty move the peak of gold reward? Checkpoints: each ``--loop_runs`` round's
sampled held-out replies (``round_<k>/gold_eval.json``) rescored by the same fixed proxy, against their KL to the
start. Rewards are shown as gains over the start's mean (n = 1), so proxy and gold share an axis.
Writes ``overopt.json`` and ``overopt.png``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class BenchArgs:
    """best-of-n and the loop's checkpoints: proxy vs gold reward against KL to the start policy"""

    policy: str = field(default="models/smollm2-135m-instruct", metadata={"help": "the start policy"})
    gold: list[str] = field(default_factory=lambda: ["runs/smollm2/gold/final"], metadata={"help": "gold RM dir(s)"})
    proxy: list[str] = field(default_factory=list, metadata={
        "help": "proxy RM dirs (an ensemble), or a loop run's dir: its last round's reward models"})
    loop_runs: list[str] = field(default_factory=list, metadata={"help": "loop run dirs whose rounds to rescore"})
    checkpoints: list[str] = field(default_factory=list, metadata={
        "help": "policy dirs (RL runs' checkpoint-*, each run's in order): each samples the held-out prompts, "
                "scored by the proxy and gold against its KL to --policy; one line per run (the parent dir)"})
    dataset_name: str = field(default="../shared/data/preference/hh-helpful-base-test.jsonl.gz",
                              metadata={"help": "prompts file (its held-out split is used), or 'world' "
                                              "(the world's held-out prompts)"})
    heldout_fraction: float = field(default=0.1, metadata={"help": "as the loop's: the same held-out prompts"})
    num_prompts: int = field(default=64, metadata={"help": "held-out prompts"})
    n_max: int = field(default=64, metadata={"help": "samples per prompt (a power of 2)"})
    max_new_tokens: int = 64
    batch_size: int = field(default=8, metadata={"help": "prompts per generate call (x n_max sequences)"})
    penalties: list[float] = field(default_factory=lambda: [0.0, 1.0],
                                   metadata={"help": "ensemble: pick by mean - penalty x std"})
    seed: int = 0
    out: str = field(default="runs/bench_overopt", metadata={"help": "overopt.json, overopt.png"})

    def __post_init__(self):
        for name in ("gold", "proxy", "loop_runs", "checkpoints", "penalties"):
            v = getattr(self, name)
            setattr(self, name, [v] if isinstance(v, (str, float, int)) else v)
        if self.n_max < 1 or self.n_max & (self.n_max - 1):
            raise ValueError(f"n_max must be a power of 2, got {self.n_max}")
        if not self.proxy:
            raise ValueError("give --proxy: reward-model dirs or a loop run's dir")


def proxy_dirs(paths: list[str]) -> list[str]:
    """Reward-model dirs as given; a loop run's dir -> its last trained round's reward*/final."""
    out = []
    for p in map(Path, paths):
        rounds = sorted(p.glob("round_*/reward/final"), key=lambda d: int(d.parent.parent.name.split("_")[1]))
        out += sorted(map(str, rounds[-1].parent.parent.glob("reward*/final"))) if rounds else [str(p)]
    return out


def main(argv: list[str] | None = None) -> int:
    from align.config import parse, run_command

    (a,) = run_command(parse, [BenchArgs], argv, prog="python -m align.bench overopt")
    from align.bench.labels import interval
    from align.data.prompts import as_messages
    from align.generate import generate
    from align.gold import best_of_n_expected, best_of_n_kl, gold_scorer, mean, replies
    from align.models import default_device, load, load_tokenizer
    from align.rl import file_prompts, heldout_examples
    from align.score import RewardEnsemble

    t0 = time.perf_counter()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    proxy_paths = proxy_dirs(a.proxy)
    examples = heldout_examples(0, a.num_prompts) if a.dataset_name == "world" else None
    if examples:  # the built-in world's held-out prompts, as its RL stages see them; its checker is the truth
        prompts = [as_messages(e.prompt) for e in examples]
    else:
        prompts = [r["prompt"] for r in file_prompts(a.dataset_name, "test", a.heldout_fraction)[: a.num_prompts]]
    model, tok = load(a.policy, device=default_device()), load_tokenizer(a.policy)
    samples = generate(model, tok, prompts, max_new_tokens=a.max_new_tokens, do_sample=True,
                       num_return_sequences=a.n_max, batch_size=a.batch_size, seed=a.seed)
    del model
    flat_p = [p for p, rs in zip(prompts, samples) for _ in rs]
    flat_r = [r for rs in samples for r in rs]
    gold_rm = gold_scorer(a.gold)
    gold = gold_rm.score(flat_p, flat_r)
    proxy = RewardEnsemble(proxy_paths)
    p_mean, p_std = proxy.score_std(flat_p, flat_r)
    ns = [2**i for i in range(a.n_max.bit_length()) if 2**i <= a.n_max]
    bon = {}
    for lam in a.penalties if len(proxy.members) > 1 else [0.0]:
        pick = [m - lam * s for m, s in zip(p_mean, p_std)]
        rows = []
        for n in ns:
            g, p = [], []
            for i in range(len(prompts)):
                sl = slice(i * a.n_max, (i + 1) * a.n_max)
                g.append(best_of_n_expected(pick[sl], gold[sl], n))
                p.append(best_of_n_expected(pick[sl], p_mean[sl], n))
            rows.append({"n": n, "kl": best_of_n_kl(n), "gold": mean(g), "proxy": mean(p)})
        peak = max(rows, key=lambda r: r["gold"])
        bon[str(lam)] = {"rows": rows, "gold_peak_n": peak["n"], "gold_peak_kl": peak["kl"]}
    checkpoints = []
    for run in map(Path, a.loop_runs):
        if (run / "gold_start.json").exists():  # round 0: the start's replies, rescored by the same proxy
            e = json.loads((run / "gold_start.json").read_text())
            pm = proxy.score(e["prompts"], e["sampled"])
            checkpoints.append({"run": run.name, "round": 0, "kl": 0.0, "gold": mean(e["gold_sampled"]),
                                "proxy": mean(pm)})
        for ev in sorted(run.glob("round_*/gold_eval.json"), key=lambda d: int(d.parent.name.split("_")[1])):
            e = json.loads(ev.read_text())
            pm = proxy.score(e["prompts"], e["sampled"])
            checkpoints.append({"run": run.name, "round": int(ev.parent.name.split("_")[1]), "kl": mean(e["kl"]),
                                "gold": mean(e["gold_sampled"]), "proxy": mean(pm)})
    rl = []
    start_gold = [mean(gold[i * a.n_max:(i + 1) * a.n_max]) for i in range(len(prompts))]  # each prompt's, n_max
    for ckpt in a.checkpoints:  # an RL run against the proxy: where does gold turn down?
        e = replies(Path(ckpt), prompts, a.max_new_tokens, a.seed, ref=Path(a.policy))
        pm, g = proxy.score(prompts, e["sampled"]), gold_rm.score(prompts, e["sampled"])
        # one sample per prompt: the 95 % half-width of its gold gain, paired by prompt with the start's mean
        _, ci = interval([x - s for x, s in zip(g, start_gold)])
        rl.append({"checkpoint": ckpt, "run": Path(ckpt).parent.name, "kl": mean(e["kl"]),
                   "gold": mean(g), "gold_gain_ci95": ci, "proxy": mean(pm),
                   **({"world": world_figures(examples, [[r] for r in e["sampled"]])} if examples else {})})
    base = {"gold": bon["0.0"]["rows"][0]["gold"], "proxy": bon["0.0"]["rows"][0]["proxy"],  # n = 1: the start
            **({"world": world_figures(examples, samples)} if examples else {})}
    result = {"proxy": proxy_paths, "gold": a.gold, "prompts": len(prompts), "n_max": a.n_max, "best_of_n": bon,
              "start": base, "checkpoints": checkpoints, "rl_checkpoints": rl,
              "seconds": round(time.perf_counter() - t0, 1)}
    (out / "overopt.json").write_text(json.dumps(result, indent=1))
    plot(result, out / "overopt.png")
    for lam, b in bon.items():
        print(f"best-of-n, pick by proxy mean - {lam} x std: gold peaks at n = {b['gold_peak_n']} "
              f"(KL {b['gold_peak_kl']:.2f}); " + ", ".join(f"n={r['n']}: gold {r['gold'] - base['gold']:+.3f} "
                                                             f"proxy {r['proxy'] - base['proxy']:+.3f}"
                                                             for r in b["rows"]))
    for c in rl:
        print(f"{c['checkpoint']}: KL {c['kl']:.2f}, gold {c['gold'] - base['gold']:+.3f} ± {c['gold_gain_ci95']:.3f}, "
              f"proxy {c['proxy'] - base['proxy']:+.3f}" + "".join(
                  f", {k} {v:.3f} (start {base['world'][k]:.3f})" for k, v in c.get("world", {}).items()))
    print(f"{len(checkpoints)} loop checkpoints rescored; wrote {out}/overopt.png, overopt.json "
          f"({result['seconds']:.0f} s)")
    return 0


def world_figures(examples: list, samples: list[list[str]]) -> dict[str, float]:
    """The world's checker on sampled replies (several per prompt: their mean): right answers in any style, and
    right in the preferred style, the truth behind both reward models."""
    from align.evaluate import score_replies
    from align.gold import mean

    per = [score_replies(examples, [s[i] for s in samples]) for i in range(len(samples[0]))]
    return {k: mean([f[k] for f in per]) for k in ("exact_match", "preferred_rate")}


def plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = result["start"]
    truth = "world" in base  # the world's checker: a third panel
    fig, axes = plt.subplots(1, 3 if truth else 2, figsize=(16.5 if truth else 11, 4.2))
    ax1, ax2 = axes[:2]
    for i, (lam, b) in enumerate(result["best_of_n"].items()):
        kl = [r["kl"] for r in b["rows"]]
        tag = f" (pick by mean - {lam} std)" if len(result["best_of_n"]) > 1 else ""
        ax1.plot(kl, [r["gold"] - base["gold"] for r in b["rows"]], marker="o", color=f"C{i}", label=f"gold{tag}")
        ax1.plot(kl, [r["proxy"] - base["proxy"] for r in b["rows"]], marker="x", linestyle="--", color=f"C{i}",
                 alpha=0.6, label=f"proxy{tag}")
    ax1.set(xlabel="KL(best-of-n || start) = log n - (n-1)/n", ylabel="reward gain over the start",
            title=f"best-of-n, n = 1..{result['n_max']}, {result['prompts']} held-out prompts")
    runs: dict[str, list] = {}
    for c in result["checkpoints"]:
        runs.setdefault(c["run"], []).append(c)
    for i, (name, cs) in enumerate(sorted(runs.items())):
        cs = sorted(cs, key=lambda c: c["round"])
        if cs[0]["round"] != 0:
            continue
        kl = [c["kl"] for c in cs]
        ax2.plot(kl, [c["gold"] - cs[0]["gold"] for c in cs], marker="o", color=f"C{i % 10}", label=f"{name} gold")
        ax2.plot(kl, [c["proxy"] - cs[0]["proxy"] for c in cs], marker="x", linestyle="--", color=f"C{i % 10}",
                 alpha=0.6)
    rl_runs: dict[str, list] = {}
    for c in result["rl_checkpoints"]:  # one line per RL run (the checkpoints' parent dir), from the start
        rl_runs.setdefault(c.get("run", "RL"), []).append(c)
    color = {name: f"C{(i + len(runs)) % 10}" for i, name in enumerate(rl_runs)}  # after the loop runs' colours
    for name, cs in rl_runs.items():
        kl = [0.0] + [c["kl"] for c in cs]
        ax2.errorbar(kl, [0.0] + [c["gold"] - base["gold"] for c in cs], marker="s", color=color[name], capsize=2,
                     yerr=[0.0] + [c.get("gold_gain_ci95", 0.0) for c in cs], label=f"{name} gold (± 95 %)")
        ax2.plot(kl, [0.0] + [c["proxy"] - base["proxy"] for c in cs], marker="x", linestyle="--",
                 color=color[name], alpha=0.6)
    ax2.set(xlabel="KL(policy || start), sampled held-out replies", ylabel="reward gain over the start",
            title="checkpoints: gold (solid), the fixed proxy (dashed)")
    if truth:
        for name, cs in rl_runs.items():
            kl = [0.0] + [c["kl"] for c in cs]
            for key, style in (("exact_match", "-"), ("preferred_rate", ":")):
                axes[2].plot(kl, [base["world"][key]] + [c["world"][key] for c in cs], marker="s", linestyle=style,
                             color=color[name], label=f"{name} {key}")
        axes[2].set(xlabel="KL(policy || start), sampled held-out replies", ylabel="share of sampled replies",
                    title="world checker: right (solid), right + preferred style (dotted)")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
