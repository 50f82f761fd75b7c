"""The closed loop: ``python -m align.loop configs/loop.yaml`` (after ``make quickstart``).

Each round, with the policy and reward model of the round before:

1. the policy answers fresh prompts (the built-in world's, or ``dataset_name``: any prompts file
   ``align.grpo`` reads), ``candidates_per_prompt`` samples each at T=1;
2. the reward model scores every candidate and picks each prompt's pair (``selection``):
   ``extremes``, its best against its worst candidate (the on-policy pairs of iterative DPO);
   ``uncertainty``, the pair it is least sure about (smallest |r_a - r_b|: uncertainty sampling, Settles 2009);
   ``disagreement``, with an ensemble (``reward_ensemble`` > 1), the pair its members disagree on most (the
   largest std of r_a - r_b over members: query by committee, Seung et al. 1992);
   ``random``. The comparisons go to the store with ``priority = -|margin|`` (``disagreement``: the spread), so
   the app shows annotators the most uncertain first;
3. labels: ``labeller: world`` lets the world's rule checker label them as a simulated annotator (``world-oracle``,
   kind ``rule``): a preferred reply beats a correct one, which beats a wrong one; equal replies are a tie,
   or "both bad" when both are wrong. ``labeller: human`` stops after step 2 and says how many comparisons
   wait in the app for a human label; run the loop again once they are labelled and it carries on (or, with
   ``wait_for_labels``, it keeps running and polls the store until they are). ``labeller: gold_rm`` lets a gold
   reward model label them (``align.gold``: kind ``ai``, with human-like noise) and judge the policy on held-out
   prompts each round (the gold-labeller method of Gao et al. 2022, https://arxiv.org/abs/2210.10760). A round
   waits for and trains on its labeller's labels only (the oracle's, the gold model's, or those of annotators of
   kind human);
4. a new reward model trains on every label in the store (``configs/reward.yaml``); with ``reward_ensemble: n``,
   n - 1 more beside it (``reward_1`` ...), each with its own seed on a bootstrap resample of the labels
   (``align.score.RewardEnsemble``). Then the policy learns (``policy_trainer``):
   ``dpo``, ``dpo_epochs`` epochs of DPO on this round's labelled pairs (exported to ``round_<k>/pairs.jsonl``,
   ``configs/dpo.yaml``; ties and "both bad" are dropped), i.e. iterative, on-policy DPO
   (Xiong et al. 2024, https://arxiv.org/abs/2312.11456);
   ``ppo`` or ``grpo``, online RL with the new reward model as the only reward (``configs/ppo.yaml`` /
   ``configs/grpo.yaml``, on the world's RL prompts or ``dataset_name``'s): the RLHF loop of Christiano et al.
   2017 and Stiennon et al. 2020 (https://arxiv.org/abs/2009.01325), labels -> reward model -> policy -> new
   candidates to label. With an ensemble the reward is its mean minus ``rm_uncertainty_penalty`` x its std
   (a guard against over-optimising one RM, Coste et al. 2023, https://arxiv.org/abs/2310.02743);
5. both are evaluated by their commands; ``report.json``, ``metrics.jsonl`` and ``loop.png`` hold every round.

A round whose ``<policy_trainer>/final`` exists is skipped, so a killed loop carries on where it stopped.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from align import gold
from align.config import parse, run_command
from align.gold import GoldNoise
from align.loop_round import (
    label_with_oracle,
    labelled_comparisons,
    policy_dir,
    queue_comparisons,
    release_memory,
    reward_dirs,
    train_round,
    unlabelled,
    wait_for_labels,
)
from align.models import check_exists
from align.runs import plot_metrics, setup_logging, write_config, write_json

logger = logging.getLogger("align.loop")

SELECTIONS = ("extremes", "uncertainty", "disagreement", "random")
POLICY_TRAINERS = ("dpo", "ppo", "grpo")
LABELLERS = ("world", "human", "gold_rm")


@dataclass
class LoopArguments:
    output_dir: str = field(
        default="runs/loop", metadata={"help": "round_<k>/{reward,<policy_trainer>} and report.json go here."})
    store_url: str = field(default="sqlite:///data/preferences.db", metadata={"help": "The preference store."})
    policy_path: str = field(default="runs/quickstart/dpo/final", metadata={"help": "The policy of round 0."})
    reward_model_path: str | list[str] | None = field(
        default="runs/quickstart/reward/final",
        metadata={"help": "The reward model of round 0 (picks the pairs), or a list of dirs: an ensemble. None "
                          "(labeller gold_rm): no labels yet, so round 1's pairs are random."},
    )
    reward_base_path: str = field(
        default="runs/quickstart/sft/final", metadata={"help": "What each round's reward model trains from."}
    )
    configs_dir: str = field(
        default="configs", metadata={"help": "Where reward.yaml and dpo.yaml (ppo.yaml, grpo.yaml) live."})
    dataset_name: str = field(
        default="world", metadata={"help": "Prompts: 'world', or a file / datasets dir with a 'prompt' field."}
    )
    rounds: int = field(default=2, metadata={"help": "Rounds of generate -> select -> label -> train."})
    prompts_per_round: int = field(default=256, metadata={"help": "Fresh world prompts per round (one pair each)."})
    candidates_per_prompt: int = field(default=4, metadata={"help": "Samples per prompt to choose the pair from."})
    selection: str = field(default="extremes", metadata={"help": "'extremes' (RM best vs worst), 'uncertainty' "
                                                         "(smallest RM margin), 'disagreement' (largest spread "
                                                         "of the ensemble's margins) or 'random'."})
    labeller: str = field(default="world", metadata={"help": "'world' (simulated annotator), 'human' (the app) or "
                                                         "'gold_rm' (gold_model_path labels, align.gold)."})
    gold_model_path: str | list[str] | None = field(
        default=None, metadata={"help": "labeller gold_rm: the gold reward model dir (a list: their mean). It labels "
                                        "the pairs and judges the policy; nothing the loop trains sees it."})
    gold_flip_rate: float = field(default=0.0, metadata={"help": "gold_rm: P(a decided pair gets gold's loser)."})
    gold_tie_band: float = field(
        default=0.0, metadata={"help": "gold_rm: pairs with |gold margin| below this get gold_tie_label."})
    gold_tie_label: str = field(default="tie", metadata={"help": "gold_rm: 'tie' or 'skip' inside the tie band."})
    gold_left_bias: float = field(
        default=0.0, metadata={"help": "gold_rm: P(the label is whichever reply was shown on the left)."})
    gold_temperature: float = field(
        default=0.0, metadata={"help": "gold_rm: > 0 draws the winner with P(a) = sigmoid((r_a - r_b) / this), a "
                                       "Bradley-Terry annotator, instead of taking gold's sign."})
    soft_labels: bool = field(
        default=False, metadata={"help": "The round's reward models learn soft labels (store_soft): P(chosen "
                                         "better) = (1 + confidence) / 2, from the app's confidence or gold's, "
                                         "|2 sigmoid(r_a - r_b) - 1|; a label without one counts as sure."})
    heldout_fraction: float = field(
        default=0.0, metadata={"help": "Share of dataset_name's prompts (by align.data.prompts.split_of) never queued: "
                                       "labeller gold_rm judges the policy on them."})
    gold_eval_prompts: int = field(
        default=64, metadata={"help": "gold_rm: held-out prompts the gold model judges the policy on each round."})
    gold_eval_max_new_tokens: int = field(
        default=64, metadata={"help": "gold_rm: reply length limit of the gold evaluation."})
    wait_for_labels: bool = field(
        default=False, metadata={"help": "labeller human: keep running and train each round as soon as it is "
                                         "labelled, instead of stopping (polls the store)."})
    wait_minutes: float = field(default=24 * 60, metadata={"help": "wait_for_labels: stop after this long."})
    poll_seconds: float = field(default=10.0, metadata={"help": "wait_for_labels: seconds between store polls."})
    policy_trainer: str = field(
        default="dpo", metadata={"help": "How the policy learns each round: 'dpo' (on the round's labelled pairs), "
                                         "or 'ppo' / 'grpo' (online RL against the round's new reward model)."})
    reward_ensemble: int = field(
        default=1, metadata={"help": "Reward models trained per round; beyond the first, each has its own seed and a "
                                     "bootstrap resample of the labels (for 'disagreement' and "
                                     "rm_uncertainty_penalty)."})
    rm_uncertainty_penalty: float | None = field(
        default=None, metadata={"help": "ppo / grpo with reward_ensemble > 1: the reward is the ensemble's mean minus "
                                        "this times its std. None: 1.0 there (on SmolLM2's RL step it gave more gold "
                                        "reward per nat of KL than the plain mean, docs/loop.md), else 0."})
    dpo_epochs: float = field(default=2.0, metadata={"help": "DPO epochs per round, over that round's pairs."})
    dpo_learning_rate: float = field(
        default=5e-4, metadata={"help": "DPO learning rate per round (configs/dpo.yaml's 2e-3 is for 80 steps)."}
    )
    max_new_tokens: int = field(default=32, metadata={"help": "Candidate length limit."})
    first_round_source: str = field(
        default="", metadata={"help": "labeller human: round 1 trains on the comparisons of this store source that "
                                      "people have labelled when it starts (the app's Prompts -> pairs: "
                                      "'app:generate') instead of queueing the policy's candidates; later rounds "
                                      "queue as usual."})
    stage_args: dict[str, dict[str, Any]] = field(
        default_factory=dict,
        metadata={"help": "Keys for a stage on top of configs_dir's <stage>.yaml, e.g. {reward: {max_steps: 2}} "
                          "(a CPU budget); the stage's parser checks them; the loop's paths, data and seed win."})
    keep_models: str = field(
        default="last", metadata={"help": "'last': once a round is judged, the earlier rounds' models (final/, "
                                          "adapter/) and every stage's checkpoint-* go (a SmolLM2 round writes "
                                          "~1.8 GB); figures, pairs and configs stay. 'all': keep them."})
    seed: int = field(default=0, metadata={"help": "Seed of the world, sampling and every stage."})

    def __post_init__(self):
        if self.keep_models not in ("last", "all"):
            raise ValueError(f"keep_models must be 'last' or 'all', got {self.keep_models!r}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if self.policy_trainer not in POLICY_TRAINERS:
            raise ValueError(f"policy_trainer must be one of {POLICY_TRAINERS}, got {self.policy_trainer!r}")
        if self.labeller not in LABELLERS:
            raise ValueError(f"labeller must be one of {LABELLERS}, got {self.labeller!r}")
        if (self.labeller == "gold_rm") != bool(self.gold_model_path):
            raise ValueError(f"labeller gold_rm and gold_model_path go together, got labeller {self.labeller!r}, "
                             f"gold_model_path {self.gold_model_path!r}")
        if self.labeller == "gold_rm":
            self.gold_noise()  # checks the rates
            # the world keeps its held-out prompts apart itself; a file's are split off by heldout_fraction
            split = self.dataset_name == "world" or 0 < self.heldout_fraction < 1
            if not split or self.gold_eval_prompts < 1:
                raise ValueError(f"labeller gold_rm judges the policy on held-out prompts: heldout_fraction must be "
                                 f"in (0, 1) and gold_eval_prompts >= 1, got {self.heldout_fraction}, "
                                 f"{self.gold_eval_prompts}")
        elif not self.reward_model_path:
            raise ValueError("reward_model_path is needed (only labeller gold_rm starts with no reward model)")
        if self.labeller == "world" and self.dataset_name != "world":
            raise ValueError(f"labeller 'world' knows only the world's answers; dataset_name {self.dataset_name!r} "
                             "needs labeller: human")
        if self.wait_for_labels and self.labeller != "human":
            raise ValueError(f"wait_for_labels needs labeller: human (labeller is {self.labeller!r})")
        if self.poll_seconds <= 0 or self.wait_minutes < 0:
            raise ValueError(f"poll_seconds must be > 0 and wait_minutes >= 0, got {self.poll_seconds}, "
                             f"{self.wait_minutes}")
        if self.dpo_epochs <= 0:
            raise ValueError(f"dpo_epochs must be > 0, got {self.dpo_epochs}")
        for name in ("rounds", "prompts_per_round"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.rm_uncertainty_penalty is None:
            self.rm_uncertainty_penalty = float(self.reward_ensemble > 1 and self.policy_trainer != "dpo")
        if self.reward_ensemble < 1 or self.rm_uncertainty_penalty < 0:
            raise ValueError(f"reward_ensemble must be >= 1 and rm_uncertainty_penalty >= 0, got "
                             f"{self.reward_ensemble}, {self.rm_uncertainty_penalty}")
        if self.reward_ensemble == 1 and (self.selection == "disagreement" or self.rm_uncertainty_penalty):
            raise ValueError("selection 'disagreement' and rm_uncertainty_penalty need reward_ensemble >= 2 (members "
                             f"to disagree), got selection {self.selection!r}, rm_uncertainty_penalty "
                             f"{self.rm_uncertainty_penalty}, reward_ensemble 1")
        if self.rm_uncertainty_penalty and self.policy_trainer == "dpo":
            raise ValueError("rm_uncertainty_penalty shapes the RL reward: it needs policy_trainer ppo or grpo, "
                             "not dpo")
        if self.first_round_source and self.labeller != "human":
            raise ValueError(f"first_round_source takes the pairs people labelled: it needs labeller: human "
                             f"(labeller is {self.labeller!r})")
        bad = [s for s in self.stage_args if s not in ("reward", *POLICY_TRAINERS)]
        if bad or not all(isinstance(v, dict) for v in self.stage_args.values()):
            raise ValueError(f"stage_args maps reward / dpo / ppo / grpo to keys, got {self.stage_args!r}")
        if self.candidates_per_prompt < 2:
            raise ValueError(f"candidates_per_prompt must be >= 2 (a pair), got {self.candidates_per_prompt}")

    def gold_noise(self) -> GoldNoise:
        return GoldNoise(self.gold_flip_rate, self.gold_tie_band, self.gold_tie_label, self.gold_left_bias,
                         self.gold_temperature)


CONFIG_TYPES = (LoopArguments,)


def as_list(paths: str | list[str] | None) -> list[str]:
    return [] if not paths else [paths] if isinstance(paths, str) else list(paths)


def log_round(root: Path, k: int, r: dict[str, Any], selection: str) -> None:
    """One metrics.jsonl row per round (0 = the start) and loop.png over them."""
    row = {f"{part}/{a}": b for part in ("policy", "reward", "gold") for a, b in r.get(part, {}).items()}
    with open(root / "metrics.jsonl", "a") as f:  # (a gold loop has no world figures: no null columns)
        f.write(json.dumps({"step": k, **{a: b for a, b in row.items() if b is not None}}) + "\n")
    plot_metrics(root / "metrics.jsonl", root / "loop.png", title=f"align loop ({selection} selection)")


def gold_round(args: LoopArguments, root: Path, policy: Path, start: Path, proxy: list[Path], k: int,
               rounds: dict | None = None, r: dict | None = None) -> dict[str, Any]:
    """Round k's gold figures (``align.gold.evaluate``) and the labels the loop has used so far: every comparison
    the labeller was shown (a tie or skip costs a label too) and those with a winner."""
    prompts = gold.heldout_prompts(args)
    shown = [x["queue"]["comparisons"] for x in (rounds or {}).values()] + ([r["queue"]["comparisons"]] if r else [])
    decided = [x["pairs"] for x in (rounds or {}).values()] + ([r["pairs"]] if r else [])
    figures = gold.evaluate(root, policy, start, args.gold_model_path, proxy, prompts, args.gold_eval_max_new_tokens,
                            args.seed)
    release_memory()
    return {"labels": sum(shown), "labels_decided": sum(decided), **figures}


@dataclass
class GoldLoopResult:
    """A gold-labelled loop, round by round (index 0 = the start): what ``align.bench labels`` aggregates."""

    selection: str
    seed: int
    labels: list[int]
    gold_reward_greedy: list[float]
    gold_reward_sampled: list[float]
    win_rate_vs_start_greedy: list[float]
    win_rate_vs_start_sampled: list[float]
    proxy_reward_sampled: list[float | None]
    proxy_accuracy_vs_gold: list[float | None]
    kl_to_start: list[float]


def gold_result(args: LoopArguments, report: dict[str, Any]) -> GoldLoopResult:
    rows = [report["start"]["gold"]] + [report["rounds"][str(k)]["gold"] for k in range(1, len(report["rounds"]) + 1)]
    keys = [f.name for f in fields(GoldLoopResult) if f.name not in ("selection", "seed")]
    return GoldLoopResult(args.selection, args.seed, **{key: [row.get(key) for row in rows] for key in keys})


def prune_models(root: Path, k: int) -> None:
    """Round k is judged: the rounds before it need no weights (the next round starts from k's), and no finished
    stage needs its checkpoints. A shared round 1 is hard-linked (align.bench labels): only the links go."""
    for j in range(1, k + 1):
        for d in (root / f"round_{j}").glob("*/*"):
            if d.is_dir() and (d.name.startswith("checkpoint-") or (j < k and d.name in ("final", "adapter"))):
                shutil.rmtree(d)


@contextlib.contextmanager
def exclusive(root: Path):
    """One loop at a time per output_dir: a second one fails at once. The lock dies with its process."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise RuntimeError(f"another loop is running on {root} (pid {f.read().strip() or '?'})") from None
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
        yield


def running(root: Path) -> bool:
    """Whether a loop holds ``root``'s lock now."""
    if not (root / ".lock").exists():
        return False
    try:
        with exclusive(root):
            return False
    except RuntimeError:
        return True


def read_report(root: Path) -> dict[str, Any]:
    """``report.json`` of the rounds so far (``{"rounds": {}}`` before the first)."""
    path = root / "report.json"
    return json.loads(path.read_text()) if path.exists() else {"rounds": {}}


def run(args: LoopArguments) -> dict[str, Any]:
    with exclusive(Path(args.output_dir)):
        return _run(args)


def _run(args: LoopArguments) -> dict[str, Any]:
    root = Path(args.output_dir)
    write_config(root, args)
    report_path = root / "report.json"
    report = read_report(root)
    policy = Path(args.policy_path)
    rm = [Path(p) for p in as_list(args.reward_model_path)]
    check_exists(policy, "policy_path")
    for p in rm if not args.first_round_source else []:  # round 1's pairs are people's: no judge picks them
        check_exists(p, "reward_model_path", "reward model")
    for p in as_list(args.gold_model_path):
        check_exists(Path(p), "gold_model_path", "reward model")
    start_policy = policy
    for other in POLICY_TRAINERS:
        done = sorted(root.glob(f"round_*/{other}"))  # (its final/ may be pruned: keep_models)
        if other != args.policy_trainer and done:
            raise ValueError(f"{done[0].parent} was trained with policy_trainer {other}, and this run asks for "
                             f"{args.policy_trainer}: keep {other}, or start in another output_dir")
    t0 = time.time()
    for k in range(1, args.rounds + 1):
        out = root / f"round_{k}"
        if str(k) in report["rounds"]:  # in the report: trained and judged
            logger.info("== round %d: already done, skipping", k)
            policy, rm = policy_dir(args, out) / "final", reward_dirs(args, out)
            continue
        out.mkdir(parents=True, exist_ok=True)
        if (out / "comparisons.json").exists():  # queued before a stop (e.g. waiting for the app's labels)
            queued = json.loads((out / "comparisons.json").read_text())
        elif k == 1 and args.first_round_source:
            queued = labelled_comparisons(args, out)
            logger.info("== round 1: the %d labelled comparisons of source %r", len(queued), args.first_round_source)
        else:
            logger.info("== round %d: candidates from %s, pairs picked by %s (%s)", k, policy,
                        ", ".join(map(str, rm)), args.selection)
            queued = queue_comparisons(args, k, policy, rm, out)
        margins = [q["margin"] for q in queued if q["margin"] is not None]  # None: not picked by an RM
        r: dict[str, Any] = {"queue": {"comparisons": len(queued),
                                       "mean_abs_margin": sum(margins) / len(margins) if margins else None}}
        if args.labeller == "world":
            r["labels"] = label_with_oracle(args, queued)
        elif args.labeller == "gold_rm":
            r["labels"] = gold.label(args.store_url, args.gold_model_path, args.gold_noise(), queued,
                                     seed=f"{args.seed}:{k}")
            release_memory()
        waiting = unlabelled(args, queued) if args.labeller == "human" else 0
        if waiting and args.wait_for_labels:
            waiting = wait_for_labels(args, k, queued, waiting)
        if waiting:
            print(f"\nRound {k}: {waiting} comparisons wait in the store {args.store_url}. Label them in the app:\n"
                  f"  .venv/bin/python -m app configs/app.yaml --db {args.store_url}\n"
                  f"then run the loop again; it carries on from here.")
            report["waiting"] = {"round": k, "comparisons": waiting}
            write_json(report_path, report)
            return report
        report.pop("waiting", None)
        r |= train_round(args, k, queued, policy, out)
        start = r.pop("start")
        if k == 1:  # round 0: the start policy, and the start RM where its run left an eval.json
            rm_eval = rm[0].parent / "eval.json" if rm else None
            rm0 = json.loads(rm_eval.read_text()) if rm_eval and rm_eval.exists() else {}
            report["start"] = {"policy": start, "reward": {key: rm0.get(key) for key in r["reward"]}}
            if args.labeller == "gold_rm":
                report["start"]["gold"] = gold_round(args, root, start_policy, start_policy, rm, 0)
            log_round(root, 0, report["start"], args.selection)
        policy, rm = policy_dir(args, out) / "final", reward_dirs(args, out)
        if args.labeller == "gold_rm":
            r["gold"] = gold_round(args, root, policy, start_policy, rm, k, report["rounds"], r)
        report["rounds"][str(k)] = r
        write_json(report_path, report)
        log_round(root, k, r, args.selection)
        logger.info("== round %d: %s", k, json.dumps(r))
        if args.keep_models == "last":
            prune_models(root, k)
    report["wall_seconds"] = round(time.time() - t0, 1)
    report["policy_path"] = str(policy)
    report["reward_model_path"] = str(rm[0]) if len(rm) == 1 else [str(p) for p in rm]
    if args.labeller == "gold_rm":
        write_json(root / "result.json", asdict(gold_result(args, report)))
    write_json(report_path, report)
    return report


def status(args: LoopArguments) -> dict[str, Any]:
    """Where the loop stands (for the app): ``report.json``, the rounds done, and the round waiting for
    labels with how many of its comparisons are still unlabelled, counted in the store now."""
    root = Path(args.output_dir)
    report = read_report(root)
    done = len(report["rounds"])
    out: dict[str, Any] = {"report": report, "rounds_done": done, "rounds": args.rounds, "running": running(root),
                           "plot": str(root / "loop.png") if (root / "loop.png").exists() else None}
    queued_path = root / f"round_{done + 1}" / "comparisons.json"
    if done < args.rounds and queued_path.exists():
        queued = json.loads(queued_path.read_text())
        out["waiting"] = {"round": done + 1, "comparisons": len(queued), "unlabelled": unlabelled(args, queued)}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    setup_logging()
    (args,) = parse(CONFIG_TYPES, argv)
    return run(args)


if __name__ == "__main__":
    run_command(main)
