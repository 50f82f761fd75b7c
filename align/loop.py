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
   ``wait_for_labels``, it keeps running and polls the store until they are). A round
   waits for and trains on its labeller's labels only (the oracle's, or those of annotators of kind human);
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
import itertools
import json
import logging
import os
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from align.config import parse, run_command
from align.data import world
from align.models import check_exists
from align.runs import plot_metrics, setup_logging, write_config, write_json

logger = logging.getLogger("align.loop")

ORACLE = "world-oracle"
SELECTIONS = ("extremes", "uncertainty", "disagreement", "random")
POLICY_TRAINERS = ("dpo", "ppo", "grpo")


@dataclass
class LoopArguments:
    output_dir: str = field(
        default="runs/loop", metadata={"help": "round_<k>/{reward,<policy_trainer>} and report.json go here."})
    store_url: str = field(default="sqlite:///data/preferences.db", metadata={"help": "The preference store."})
    policy_path: str = field(default="runs/quickstart/dpo/final", metadata={"help": "The policy of round 0."})
    reward_model_path: str | list[str] = field(
        default="runs/quickstart/reward/final",
        metadata={"help": "The reward model of round 0 (picks the pairs), or a list of dirs: an ensemble."},
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
    labeller: str = field(default="world", metadata={"help": "'world' (simulated annotator) or 'human' (the app)."})
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
                                     "bootstrap resample of the labels (for 'disagreement' and rm_uncertainty_penalty)."})
    rm_uncertainty_penalty: float = field(
        default=0.0, metadata={"help": "ppo / grpo with reward_ensemble > 1: the reward is the ensemble's mean minus "
                                       "this times its std."})
    dpo_epochs: float = field(default=2.0, metadata={"help": "DPO epochs per round, over that round's pairs."})
    dpo_learning_rate: float = field(
        default=5e-4, metadata={"help": "DPO learning rate per round (configs/dpo.yaml's 2e-3 is for 80 steps)."}
    )
    max_new_tokens: int = field(default=32, metadata={"help": "Candidate length limit."})
    seed: int = field(default=0, metadata={"help": "Seed of the world, sampling and every stage."})

    def __post_init__(self):
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if self.policy_trainer not in POLICY_TRAINERS:
            raise ValueError(f"policy_trainer must be one of {POLICY_TRAINERS}, got {self.policy_trainer!r}")
        if self.labeller not in ("world", "human"):
            raise ValueError(f"labeller must be 'world' or 'human', got {self.labeller!r}")
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
        if self.candidates_per_prompt < 2:
            raise ValueError(f"candidates_per_prompt must be >= 2 (a pair), got {self.candidates_per_prompt}")


CONFIG_TYPES = (LoopArguments,)


# ----------------------------------------------------------------------------------------------- selection, labels


def pick_pair(members: Sequence[Sequence[float]], selection: str, rng: random.Random) -> tuple[int, int]:
    """Indices (i, j) of the two candidates to compare, from each ensemble member's rewards for them (one row
    per member): best vs worst, the closest mean rewards, the members' largest disagreement, or a random pair."""
    scores = [statistics.mean(col) for col in zip(*members)]
    if selection == "extremes":
        order = sorted(range(len(scores)), key=scores.__getitem__)
        return order[-1], order[0]
    pairs = list(itertools.combinations(range(len(scores)), 2))
    if selection == "random":
        return rng.choice(pairs)
    if selection == "disagreement":
        return max(pairs, key=lambda p: statistics.pstdev([m[p[0]] - m[p[1]] for m in members]))
    return min(pairs, key=lambda p: abs(scores[p[0]] - scores[p[1]]))


def oracle_choice(example: world.Example, reply_a: str, reply_b: str) -> str:
    """The simulated annotator: preferred > correct in another style > wrong; 'tie' / 'both_bad' when equal."""
    ra, rb = world.reward(example, reply_a), world.reward(example, reply_b)
    if ra == rb:
        return "both_bad" if ra == 0 else "tie"
    return "a" if ra > rb else "b"


def distinct(replies: Sequence[str]) -> list[str]:
    """The different replies, in order, as the store keeps them (``storable``)."""
    from align.store.store import storable

    return list(dict.fromkeys(map(storable, replies)))


# ----------------------------------------------------------------------------------------------- one round


def queue_comparisons(args: LoopArguments, k: int, policy: Path, reward_models: list[Path], out: Path) -> list[dict]:
    """Steps 1-2: candidates from the policy; per prompt, the pair ``selection`` picks goes to the store."""
    from align.generate import generate
    from align.models import default_device, load, load_tokenizer
    from align.rl import prompt_dataset
    from align.score import RewardEnsemble
    from align.store import Store

    n = args.prompts_per_round
    rows = prompt_dataset(args.dataset_name, k * n, args.seed).to_list()[(k - 1) * n :]  # fresh prompts each round
    if not rows:
        raise ValueError(f"{args.dataset_name}: no prompts left for round {k} ({n} per round)")
    model, tok = load(policy, device=default_device()), load_tokenizer(policy)
    settings = {"do_sample": True, "temperature": 1.0, "max_new_tokens": args.max_new_tokens}
    samples = generate(model, tok, [row["prompt"] for row in rows], num_return_sequences=args.candidates_per_prompt,
                       seed=args.seed + k, **settings)
    del model
    candidates = [(row, distinct(rs)) for row, rs in zip(rows, samples)]
    candidates = [(row, rs) for row, rs in candidates if len(rs) >= 2]  # identical samples: nothing to compare
    selection = args.selection
    if selection == "disagreement" and len(reward_models) == 1:  # round 0's judge is one model: nothing to disagree
        logger.warning("round %d: one reward model (%s), so 'uncertainty' picks this round's pairs", k, reward_models[0])
        selection = "uncertainty"
    scorer = RewardEnsemble(reward_models)
    flat = scorer.score_members([row["prompt"] for row, rs in candidates for _ in rs],
                                [r for _, rs in candidates for r in rs]).tolist()  # (members, candidates)
    rng, queued, start = random.Random(f"{args.seed}:{k}"), [], 0
    with Store(args.store_url).init() as store:
        for row, rs in candidates:
            members, start = [m[start : start + len(rs)] for m in flat], start + len(rs)
            i, j = pick_pair(members, selection, rng)
            margins = [m[i] - m[j] for m in members]
            margin, disagreement = abs(statistics.mean(margins)), statistics.pstdev(margins)
            priority = disagreement if selection == "disagreement" else -margin
            cid = store.add_candidates(row["prompt"], rs[i], rs[j], model_a=str(policy), settings=settings,
                                       priority=priority, source=source(k))
            queued.append({"comparison_id": cid, "row": row, "a": rs[i], "b": rs[j], "margin": margin,
                           "disagreement": disagreement})
    write_json(out / "comparisons.json", queued)
    return queued


def label_with_oracle(args: LoopArguments, queued: list[dict]) -> dict[str, int]:
    """Step 3 with ``labeller: world``: the rule checker labels each queued comparison once."""
    from align.store import Store

    counts: dict[str, int] = {}
    with Store(args.store_url).init() as store:
        store.ensure_annotator(ORACLE, kind="rule")
        for q in queued:
            if store.labels(q["comparison_id"], annotator=ORACLE):
                continue  # labelled before a restart
            row = q["row"]  # the checker reads only the task and the reference answer
            ex = world.Example(str(q["comparison_id"]), row["task"], row["prompt"][-1]["content"], row["answer"],
                               "train")
            choice = oracle_choice(ex, q["a"], q["b"])
            store.submit_label(q["comparison_id"], ORACLE, choice)
            counts[choice] = counts.get(choice, 0) + 1
    return counts


def labellers(args: LoopArguments, store) -> set[str]:
    """Whose labels a round waits for and trains on: the simulated annotator's, or every human's."""
    if args.labeller == "world":
        return {ORACLE}
    return {a["name"] for a in store.list_annotators() if a["kind"] == "human"}


def unlabelled(args: LoopArguments, queued: list[dict]) -> int:
    """Queued comparisons that no labeller of this loop has labelled yet (a skip is no label)."""
    from align.store import Store

    with Store(args.store_url).init() as store:
        who = labellers(args, store)
        return sum(not any(lab.annotator in who and lab.choice != "skip" for lab in store.labels(q["comparison_id"]))
                   for q in queued)


def wait_for_labels(args: LoopArguments, k: int, queued: list[dict], waiting: int) -> int:
    """``wait_for_labels``: poll the store until round k is labelled (0) or ``wait_minutes`` pass (what is left)."""
    deadline = time.monotonic() + 60 * args.wait_minutes
    logger.info("round %d: waiting for %d labels in %s (up to %g min)", k, waiting, args.store_url, args.wait_minutes)
    while waiting and time.monotonic() < deadline:
        time.sleep(min(args.poll_seconds, max(deadline - time.monotonic(), 0)))
        left = unlabelled(args, queued)
        if left != waiting:
            logger.info("round %d: %d of %d comparisons still need a label", k, left, len(queued))
        waiting = left
    return waiting


def export_pairs(args: LoopArguments, queued: list[dict], out: Path) -> int:
    """Round k's comparisons whose labels (by this loop's labellers) have a winner -> ``out/pairs.jsonl``, what
    DPO trains on; how many. By id, not by source: a comparison the store already had (the same two replies)
    keeps its first source and its old labels, which count only if they are this loop's labellers'."""
    from align.store import Store

    with Store(args.store_url).init() as store:
        who = labellers(args, store)
        if not who:  # (an empty list would select every annotator)
            return 0
        done = store.export(out / "pairs.jsonl", comparison_ids=[q["comparison_id"] for q in queued],
                            annotators=sorted(who))
    return done["files"][str(out / "pairs.jsonl")]


def source(k: int) -> str:
    return f"loop-round-{k}"


# ----------------------------------------------------------------------------------------------- the loop


def train_round(args: LoopArguments, k: int, queued: list[dict], policy: Path, out: Path) -> dict[str, Any]:
    """Steps 4-5: a new RM on every label in the store, then the policy's step (DPO on round k's pairs, or RL
    against the new RM); their figures."""
    from align import dpo, grpo, ppo, reward
    from align.config import configure

    pairs = export_pairs(args, queued, out)
    if not pairs and args.policy_trainer == "dpo":
        raise ValueError(f"round {k}: no comparison has a winner (all ties or both bad); nothing to train on")
    judges = reward_dirs(args, out)
    rms = [reward.train(*configure(
        reward.CONFIG_TYPES, Path(args.configs_dir) / "reward.yaml", output_dir=str(d.parent),
        model_name_or_path=args.reward_base_path, store_url=args.store_url, seed=args.seed + m, bootstrap=m > 0,
    )) for m, d in enumerate(judges)]
    config = Path(args.configs_dir) / f"{args.policy_trainer}.yaml"
    common = {"output_dir": str(policy_dir(args, out)), "model_name_or_path": str(policy), "seed": args.seed}
    if args.policy_trainer == "dpo":  # the round's RM judges the win rate
        step = dpo.train(*configure(
            dpo.config_types("dpo"), config, **common, reward_model_path=str(judges[0]),
            dataset_name=str(out / "pairs.jsonl"), max_steps=-1, num_train_epochs=args.dpo_epochs, warmup_steps=0,
            learning_rate=args.dpo_learning_rate,
        ))
    else:  # RLHF proper: the reward model the labels just made is the only reward
        rl = {"ppo": ppo, "grpo": grpo}[args.policy_trainer]
        rm = str(judges[0]) if len(judges) == 1 else [str(d) for d in judges]
        data = {"dataset_name": args.dataset_name} if args.dataset_name != "world" else {}
        step = rl.train(*configure(rl.CONFIG_TYPES, config, **common, reward_model_path=rm,
                                   rm_uncertainty_penalty=args.rm_uncertainty_penalty, reward_funcs=["rm"],
                                   reward_weights=[1.0], **data))
    ev, before = step.eval or {}, step.before or {}
    keys = ("exact_match", "exact_match_sampled", "maj_at_k", "preferred_rate")
    return {
        "pairs": pairs,
        "policy": {key: ev.get(key) for key in keys} | {"win_rate_vs_previous": ev.get("win_rate_vs_sft")},
        "reward": {key: rms[0].eval.get(key) for key in ("accuracy", "accuracy_style", "accuracy_correctness")},
        **({"reward_ensemble": [{key: x.eval.get(key) for key in ("accuracy", "accuracy_correctness")}
                                for x in rms]} if len(rms) > 1 else {}),
        "start": {key: before.get(key) for key in keys},
    }


def policy_dir(args: LoopArguments, out: Path) -> Path:
    """Where round ``out``'s policy step writes (its ``final/`` is the next round's policy)."""
    return out / args.policy_trainer


def reward_dirs(args: LoopArguments, out: Path) -> list[Path]:
    """Round ``out``'s reward models (the next round's judges): ``reward/final``, then ``reward_<m>/final``."""
    return [out / (f"reward_{m}" if m else "reward") / "final" for m in range(args.reward_ensemble)]


def log_round(root: Path, k: int, r: dict[str, Any], selection: str) -> None:
    """One metrics.jsonl row per round (0 = the start) and loop.png over them."""
    with open(root / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": k, **{f"policy/{a}": b for a, b in r["policy"].items()},
                            **{f"reward/{a}": b for a, b in r["reward"].items()}}) + "\n")
    plot_metrics(root / "metrics.jsonl", root / "loop.png", title=f"align loop ({selection} selection)")


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
    rm = [Path(p) for p in ([args.reward_model_path] if isinstance(args.reward_model_path, str)
                            else args.reward_model_path)]
    check_exists(policy, "policy_path")
    for p in rm:
        check_exists(p, "reward_model_path", "reward model")
    for other in POLICY_TRAINERS:
        done = sorted(root.glob(f"round_*/{other}/final"))
        if other != args.policy_trainer and done:
            raise ValueError(f"{done[0].parent.parent} was trained with policy_trainer {other}, and this run asks for "
                             f"{args.policy_trainer}: keep {other}, or start in another output_dir")
    t0 = time.time()
    for k in range(1, args.rounds + 1):
        out = root / f"round_{k}"
        if (policy_dir(args, out) / "final").exists():
            logger.info("== round %d: already done, skipping", k)
            policy, rm = policy_dir(args, out) / "final", reward_dirs(args, out)
            continue
        out.mkdir(parents=True, exist_ok=True)
        if (out / "comparisons.json").exists():  # queued before a stop (e.g. waiting for the app's labels)
            queued = json.loads((out / "comparisons.json").read_text())
        else:
            logger.info("== round %d: candidates from %s, pairs picked by %s (%s)", k, policy,
                        ", ".join(map(str, rm)), args.selection)
            queued = queue_comparisons(args, k, policy, rm, out)
        margins = [q["margin"] for q in queued]
        r: dict[str, Any] = {"queue": {"comparisons": len(queued),
                                       "mean_abs_margin": sum(margins) / max(len(margins), 1)}}
        if args.labeller == "world":
            r["labels"] = label_with_oracle(args, queued)
        waiting = unlabelled(args, queued)
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
            rm_eval = rm[0].parent / "eval.json"
            rm0 = json.loads(rm_eval.read_text()) if rm_eval.exists() else {}
            report["start"] = {"policy": start, "reward": {key: rm0.get(key) for key in r["reward"]}}
            log_round(root, 0, report["start"], args.selection)
        policy, rm = policy_dir(args, out) / "final", reward_dirs(args, out)
        report["rounds"][str(k)] = r
        write_json(report_path, report)
        log_round(root, k, r, args.selection)
        logger.info("== round %d: %s", k, json.dumps(r))
    report["wall_seconds"] = round(time.time() - t0, 1)
    report["policy_path"] = str(policy)
    report["reward_model_path"] = str(rm[0]) if len(rm) == 1 else [str(p) for p in rm]
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
