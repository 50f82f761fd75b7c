"""The main job: ``python -m align.quickstart configs/quickstart.yaml`` (``make quickstart``).

Runs the whole loop on the built-in default, each stage being the ordinary command with its own
config file and the quickstart's paths filled in:

    tokenizer -> pretrain -> sft -> store (rule-labelled pairs) -> reward -> dpo -> grpo -> ppo -> loop

into ``runs/quickstart/<stage>/``, and writes ``runs/quickstart/report.json`` with each stage's
held-out figures and the wall time. A stage whose ``final/`` already exists is skipped unless
``--overwrite true``, so a killed quickstart carries on where it stopped.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from align.config import configure, parse, run_command
from align.runs import setup_logging, write_config, write_json

logger = logging.getLogger("align.quickstart")

STAGES = ("tokenizer", "pretrain", "sft", "store", "reward", "dpo", "grpo", "ppo", "loop")


@dataclass
class QuickstartArguments:
    output_dir: str = field(default="runs/quickstart", metadata={"help": "Where every stage writes its run."})
    stages: list[str] = field(
        default_factory=lambda: list(STAGES),
        metadata={"help": f"Stages to run, in order; any of {STAGES}."},
    )
    configs_dir: str = field(default="configs", metadata={"help": "Where each stage's <stage>.yaml lives."})
    store_url: str = field(
        default="sqlite:///data/preferences.db", metadata={"help": "The preference store the loop fills and reads."}
    )
    grpo_from: str = field(default="dpo", metadata={"help": "Policy GRPO/PPO start from: 'dpo' or 'sft'."})
    overwrite: bool = field(default=False, metadata={"help": "Re-run stages whose final/ already exists."})
    seed: int = field(default=0, metadata={"help": "Seed passed to every stage."})
    stage_args: dict[str, dict[str, Any]] = field(
        default_factory=dict,
        metadata={"help": "Keys for a stage on top of its configs/<stage>.yaml, e.g. {grpo: {max_steps: 1400}} "
                          "(configs/quickstart_gpu.yaml); given on the command line, it replaces the file's. The "
                          "stage's own parser checks them; the quickstart's paths and seed win."},
    )

    def __post_init__(self):
        bad = [s for s in [*self.stages, *self.stage_args] if s not in STAGES]
        if bad:
            raise ValueError(f"stages / stage_args: unknown {bad}; choose from {list(STAGES)}")
        for name, keys in self.stage_args.items():
            if name == "store":
                raise ValueError("stage_args.store: the store stage has no config file to add keys to")
            if not isinstance(keys, dict):
                raise ValueError(f"stage_args.{name} must be a mapping of keys to values, got {keys!r}")
        if self.grpo_from not in ("dpo", "sft"):
            raise ValueError(f"grpo_from must be 'dpo' or 'sft', got {self.grpo_from!r}")


CONFIG_TYPES = (QuickstartArguments,)


def stage_configs(q: QuickstartArguments, name: str, **keys: Any) -> tuple:
    """Stage ``name``'s configs: configs/<name>.yaml, its stage_args, then the quickstart's output dir and ``keys``."""
    from importlib import import_module

    types = import_module(f"align.{name}").CONFIG_TYPES
    return configure(types, Path(q.configs_dir) / f"{name}.yaml",
                     **(q.stage_args.get(name, {}) | {"output_dir": str(Path(q.output_dir) / name)} | keys))


def run(q: QuickstartArguments) -> dict[str, Any]:
    t0 = time.time()
    root = Path(q.output_dir)
    write_config(root, q)
    d = {s: root / s for s in STAGES}
    report_path = root / "report.json"
    report: dict[str, Any] = json.loads(report_path.read_text()) if report_path.exists() and not q.overwrite else {}

    def stage(name: str, fn: Callable[[], Any], done: Path) -> None:
        if name not in q.stages:
            return
        if done.exists() and not q.overwrite:
            logger.info("== %s: already done (%s), skipping", name, done)
            return
        if q.overwrite and d[name].exists():
            shutil.rmtree(d[name])
        logger.info("== %s", name)
        s = time.time()
        fn()
        report.setdefault("stage_seconds", {})[name] = round(time.time() - s, 1)
        write_json(report_path, report)

    def run_tokenizer():
        from align import tokenizer

        tokenizer.train_tokenizer(*stage_configs(q, "tokenizer"))

    def run_pretrain():
        from align import pretrain

        pretrain.train(*stage_configs(q, "pretrain", tokenizer_name_or_path=str(d["tokenizer"]), seed=q.seed))

    def run_sft():
        from align import sft

        result = sft.train(*stage_configs(q, "sft", model_name_or_path=str(d["pretrain"] / "final"), seed=q.seed))
        report["sft"] = _figures(result.eval)
        report["pretrain"] = _figures(_eval_pretrained(d["pretrain"] / "final", q.seed))

    def run_store():
        report["store"] = fill_store(q, d["sft"] / "final", d["store"])

    def run_reward():
        from align import reward

        result = reward.train(*stage_configs(q, "reward", model_name_or_path=str(d["sft"] / "final"),
                                             store_url=q.store_url, seed=q.seed))
        report["reward"] = {k: v for k, v in result.eval.items() if k.startswith("accuracy") or k == "mean_margin"}

    def run_dpo():
        from align import dpo

        result = dpo.train(*stage_configs(q, "dpo", model_name_or_path=str(d["sft"] / "final"), store_url=q.store_url,
                                          reward_model_path=str(d["reward"] / "final"), seed=q.seed))
        report["dpo"] = _figures(result.eval) | {"win_rate_vs_sft": result.eval.get("win_rate_vs_sft")}

    def run_rl(name: str):
        from importlib import import_module

        policy = d["dpo" if q.grpo_from == "dpo" and (d["dpo"] / "final").exists() else "sft"] / "final"
        result = import_module(f"align.{name}").train(*stage_configs(
            q, name, model_name_or_path=str(policy), reward_model_path=str(d["reward"] / "final"), seed=q.seed))
        report[name] = _figures(result.eval) | {"start": str(policy)}
        sampled, sft = result.eval.get("exact_match_sampled"), report.get("sft", {}).get("exact_match_sampled")
        if sampled is not None and sft is not None:  # RL's yardstick: the gain over SFT's sampled EM (docs/rl.md)
            report[name]["exact_match_sampled_vs_sft"] = round(sampled - sft, 4)

    def run_loop():
        from align import loop

        summary = loop.run(*stage_configs(
            q, "loop", policy_path=str(d["dpo"] / "final"), reward_model_path=str(d["reward"] / "final"),
            reward_base_path=str(d["sft"] / "final"), store_url=q.store_url, seed=q.seed,
        ))
        report["loop"] = {k: r["policy"] | {"rm_correctness": r["reward"]["accuracy_correctness"]}
                          for k, r in summary["rounds"].items()}
        if "waiting" not in summary:  # labeller: human stops for the app's labels; the next run goes on
            write_json(d["loop"] / "done.json", report["loop"])

    stage("tokenizer", run_tokenizer, d["tokenizer"] / "tokenizer_config.json")
    stage("pretrain", run_pretrain, d["pretrain"] / "final")
    stage("sft", run_sft, d["sft"] / "final")
    stage("store", run_store, d["store"] / "done.json")
    stage("reward", run_reward, d["reward"] / "final")
    stage("dpo", run_dpo, d["dpo"] / "final")
    stage("grpo", lambda: run_rl("grpo"), d["grpo"] / "final")
    stage("ppo", lambda: run_rl("ppo"), d["ppo"] / "final")
    stage("loop", run_loop, d["loop"] / "done.json")

    report["wall_seconds"] = round(time.time() - t0, 1)
    write_json(report_path, report)
    logger.info("report: %s\n%s", report_path, json.dumps(report, indent=2))
    if "store" in q.stages:
        print(
            f"\nThe store {q.store_url} holds the loop's pairs. Label them in the app:\n"
            f"  .venv/bin/python -m app configs/app.yaml --db {q.store_url} "
            f"--create_admin admin:CHANGE-ME --serve false\n"
            f"  .venv/bin/python -m app configs/app.yaml --db {q.store_url}\n"
            f"then open http://127.0.0.1:7860 and log in."
        )
    if q.output_dir == "runs/quickstart":  # configs/evaluate.yaml reads the default run's dirs
        print("Compare the stages' models side by side: .venv/bin/python -m align.evaluate configs/evaluate.yaml")
    return report


def fill_store(q: QuickstartArguments, policy: Path, out: Path, n_candidates: int = 40) -> dict[str, Any]:
    """Put the world's rule-labelled pairs in the store (the labels the RM and DPO train on), and
    pairs of SFT candidates for annotators to label in the app."""
    from align.data.world import World
    from align.generate import generate
    from align.models import default_device, load, load_tokenizer
    from align.store import Store

    w = World(seed=q.seed)
    with Store(q.store_url).init() as store:
        report = store.import_pairs(w.preference_pairs(), source="world", labeller="world-rule", labeller_kind="rule")
        model, tok = load(policy, device=default_device()), load_tokenizer(policy)
        prompts = [ex.prompt for ex in w.rl_prompts(n_candidates)]
        settings = {"do_sample": True, "temperature": 1.0, "max_new_tokens": 32}
        replies = generate(model, tok, prompts, num_return_sequences=2, seed=q.seed, **settings)
        queued = sum(store.add_candidates(prompt, a, b, model_a=str(policy), settings=settings,
                                          source="quickstart") is not None for prompt, (a, b) in zip(prompts, replies))
    summary = {"pairs_imported": report.new_labels, "comparisons_queued": queued, "url": q.store_url}
    write_json(out / "done.json", summary)
    return summary


def _figures(ev: dict[str, Any]) -> dict[str, Any]:
    keys = ("exact_match", "exact_match_sampled", "maj_at_k", "pass_at_k", "preferred_rate", "mean_length")
    return {k: ev[k] for k in keys if k in ev}


def _eval_pretrained(path: Path, seed: int) -> dict[str, Any]:
    """The pretrained-only model on the same held-out prompts, to show what SFT added."""
    from align.evaluate import evaluate
    from align.models import default_device, load, load_tokenizer

    model, tok = load(path, device=default_device()), load_tokenizer(path)
    ev = evaluate(model, tok, seed=seed)
    write_json(path.parent / "eval.json", ev)
    return ev


def main(argv: list[str] | None = None) -> dict[str, Any]:
    setup_logging()
    (q,) = parse(CONFIG_TYPES, argv)
    return run(q)


if __name__ == "__main__":
    run_command(main)
