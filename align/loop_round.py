"""One round of the closed loop (``align.loop``): candidates -> pairs -> labels -> a new RM and policy.

``queue_comparisons`` (steps 1-2): the policy's candidates, scored by the round's reward model(s), and per prompt
the pair ``selection`` picks (active learning), queued in the store; ``label_with_oracle`` (step 3 with the
world's rule checker as the annotator) or the app's annotators label them; ``train_round`` (steps 4-5) trains the
reward model(s) on every label and the policy's step on the round's pairs, and returns their figures.
"""

from __future__ import annotations

import itertools
import logging
import random
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from align.data import world
from align.gold import GOLD
from align.runs import write_json

if TYPE_CHECKING:
    from align.loop import LoopArguments

logger = logging.getLogger("align.loop")

ORACLE = "world-oracle"


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


def queue_comparisons(args: LoopArguments, k: int, policy: Path, reward_models: list[Path], out: Path) -> list[dict]:
    """Steps 1-2: candidates from the policy; per prompt, the pair ``selection`` picks goes to the store."""
    from align.generate import generate
    from align.models import default_device, load, load_tokenizer
    from align.score import RewardEnsemble
    from align.store import Store

    n = args.prompts_per_round
    rows = round_prompts(args, k)
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
        logger.warning("round %d: one reward model (%s), so 'uncertainty' picks this round's pairs",
                       k, reward_models[0])
        selection = "uncertainty"
    if not reward_models:  # a gold loop's start: no labels, no reward model
        if selection != "random":
            logger.warning("round %d: no reward model yet, so 'random' picks this round's pairs", k)
        selection = "random"
        flat = [[0.0] * sum(len(rs) for _, rs in candidates)]
    else:
        flat = RewardEnsemble(reward_models).score_members(
            [row["prompt"] for row, rs in candidates for _ in rs],
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
    release_memory()
    return queued


def labelled_comparisons(args: LoopArguments, out: Path) -> list[dict]:
    """Round 1 with ``first_round_source``: the comparisons of that store source that this loop's labellers
    (people) have labelled, as queued pairs (no RM picked them: margin None)."""
    from align.store import Store

    with Store(args.store_url).init() as store:
        who = labellers(args, store)
        ids = sorted({lab.comparison_id for lab in store.labels() if lab.annotator in who and lab.choice != "skip"})
        comps = [c for c in map(store.get_comparison, ids) if c.source == args.first_round_source]
    if not comps:
        raise ValueError(f"first_round_source {args.first_round_source!r}: no comparison of that source in "
                         f"{args.store_url} has a human label yet; label them in the app first")
    queued = [{"comparison_id": c.id, "row": {"prompt": c.prompt}, "a": c.text_a, "b": c.text_b, "margin": None,
               "disagreement": None} for c in comps]
    write_json(out / "comparisons.json", queued)
    return queued


def release_memory() -> None:
    """Hand the GPU memory of the stage that just ended back to the driver: a round runs several stages in one
    process, and loops run side by side on one card (``align.bench labels``), where one loop's cached blocks
    would starve the others."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def round_prompts(args: LoopArguments, k: int) -> list[dict]:
    """Round k's fresh prompts: the k-th ``prompts_per_round`` of the world's, or of ``dataset_name``'s distinct
    prompts outside the held-out split (``heldout_fraction``)."""
    from align.rl import file_prompts, prompt_dataset

    n = args.prompts_per_round
    if args.dataset_name == "world":
        return prompt_dataset(args.dataset_name, k * n, args.seed).to_list()[(k - 1) * n :]
    return file_prompts(args.dataset_name, "train", args.heldout_fraction)[(k - 1) * n : k * n]


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
    if args.labeller == "gold_rm":
        return {GOLD}
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


def policy_dir(args: LoopArguments, out: Path) -> Path:
    """Where round ``out``'s policy step writes (its ``final/`` is the next round's policy)."""
    return out / args.policy_trainer


def reward_dirs(args: LoopArguments, out: Path) -> list[Path]:
    """Round ``out``'s reward models (the next round's judges): ``reward/final``, then ``reward_<m>/final``."""
    return [out / (f"reward_{m}" if m else "reward") / "final" for m in range(args.reward_ensemble)]


def train_round(args: LoopArguments, k: int, queued: list[dict], policy: Path, out: Path) -> dict[str, Any]:
    """Steps 4-5: a new RM on every label in the store, then the policy's step (DPO on round k's pairs, or RL
    against the new RM); their figures."""
    from align import dpo, grpo, ppo, reward
    from align.config import configure

    pairs = export_pairs(args, queued, out)
    if not pairs and args.policy_trainer == "dpo":
        raise ValueError(f"round {k}: no comparison has a winner (all ties or both bad); nothing to train on")
    judges = reward_dirs(args, out)
    extra = args.stage_args
    # gold_rm: the proxy learns every gold label in the store, and only the gold model judges (align.gold);
    # dataset_name store: a config made for a file (configs/smollm2/reward.yaml) still trains on the labels
    gold = args.labeller == "gold_rm"
    proxy = {"store_soft": args.soft_labels} | ({"store_annotators": [GOLD], "test_fraction": 0.0} if gold else {})
    rms = []
    for m, d in enumerate(judges):
        rms.append(reward.train(*configure(reward.CONFIG_TYPES, Path(args.configs_dir) / "reward.yaml", **(
            extra.get("reward", {}) | {"output_dir": str(d.parent), "model_name_or_path": args.reward_base_path,
                                       "dataset_name": "store", "store_url": args.store_url, "seed": args.seed + m,
                                       "bootstrap": m > 0} | proxy))))
        release_memory()
    config = Path(args.configs_dir) / f"{args.policy_trainer}.yaml"
    common = {**extra.get(args.policy_trainer, {}), "output_dir": str(policy_dir(args, out)),
              "model_name_or_path": str(policy), "seed": args.seed}
    if args.policy_trainer == "dpo":  # the round's RM judges the win rate
        step = dpo.train(*configure(dpo.config_types("dpo"), config, **(common | {
            "reward_model_path": str(judges[0]), "dataset_name": str(out / "pairs.jsonl"), "max_steps": -1,
            "num_train_epochs": args.dpo_epochs, "warmup_steps": 0, "learning_rate": args.dpo_learning_rate,
            **({"win_rate_num_prompts": 0, "eval_num_prompts": 0, "test_fraction": 0.0} if gold else {})})))
    else:  # RLHF proper: the reward model the labels just made is the only reward
        rl = {"ppo": ppo, "grpo": grpo}[args.policy_trainer]
        rm = str(judges[0]) if len(judges) == 1 else [str(d) for d in judges]
        data = {"dataset_name": args.dataset_name} if args.dataset_name != "world" else {}
        if args.dataset_name != "world":  # RL never trains on the held-out prompts either (the same hash split)
            data["test_fraction"] = args.heldout_fraction
        step = rl.train(*configure(rl.CONFIG_TYPES, config, **(common | {
            "reward_model_path": rm, "rm_uncertainty_penalty": args.rm_uncertainty_penalty, "reward_funcs": ["rm"],
            "reward_weights": [1.0], **data, **({"eval_num_prompts": 0} if gold else {})})))
    release_memory()
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


