"""A gold reward model as the loop's labeller and its judge (``align.loop`` with ``labeller: gold_rm``).

The gold-labeller method (Gao, Schulman & Hilton 2022, https://arxiv.org/abs/2210.10760; AlpacaFarm, Dubois et
al. 2023, https://arxiv.org/abs/2305.14387): a strong reward model stands in for the people. It labels each
round's pairs, with noise modelled on people (``GoldNoise``), and the loop's *proxy* reward model learns only
from those labels. The policy is scored by the gold model, which it never trains on (``evaluate``).

    noise = GoldNoise(flip_rate=0.1, tie_band=0.2, left_bias=0.05)
    noise.choice(r_a - r_b, rng)     # -> ('a' | 'b' | 'tie' | 'skip', the side shown on the left)
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from align.loop import LoopArguments

GOLD = "gold-rm"  # the annotator's name in the store (kind 'ai')
TIE_LABELS = ("tie", "skip")


@dataclass
class GoldNoise:
    """How the simulated annotator departs from the gold model's sign (AlpacaFarm's simulated annotators flip
    ~25 % of labels to match people's disagreement; people also call close pairs even, and favour a side)."""

    flip_rate: float = 0.0   # P(the label is the gold model's loser), on decided pairs
    tie_band: float = 0.0    # |r_a - r_b| below this: no winner, the label is ``tie_label``
    tie_label: str = "tie"   # 'tie' (stored, dropped by training) or 'skip' (no label)
    left_bias: float = 0.0   # P(the annotator picks whatever was shown on the left, unread)
    temperature: float = 0.0  # > 0: the winner is drawn with P(a) = sigmoid((r_a - r_b) / temperature), a
    #                           Bradley-Terry annotator (close pairs are coin flips), instead of gold's sign

    def __post_init__(self):
        for name in ("flip_rate", "left_bias"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"gold_{name} must be in [0, 1], got {getattr(self, name)}")
        if self.tie_band < 0 or self.temperature < 0:
            raise ValueError(f"gold_tie_band and gold_temperature must be >= 0, got {self.tie_band}, "
                             f"{self.temperature}")
        if self.tie_label not in TIE_LABELS:
            raise ValueError(f"gold_tie_label must be one of {TIE_LABELS}, got {self.tie_label!r}")

    def choice(self, margin: float, rng: random.Random) -> tuple[str, str]:
        """The label of a pair whose gold margin is ``margin`` = r_a - r_b, and the side shown left."""
        left = rng.choice("ab")  # each draw happens on every call, so one seed gives one label sequence
        biased, flipped, u = rng.random() < self.left_bias, rng.random() < self.flip_rate, rng.random()
        if biased:
            return left, left
        if abs(margin) < self.tie_band or (margin == 0 and not self.temperature):
            return self.tie_label, left
        if self.temperature:
            win = "a" if u < sigmoid(margin / self.temperature) else "b"
        else:
            win = "a" if margin > 0 else "b"
        return ({"a": "b", "b": "a"}[win] if flipped else win), left


def gold_scorer(paths: str | Sequence[str]):
    """The gold model: one reward-model dir, or several (an ensemble's mean)."""
    from align.score import RewardEnsemble

    return RewardEnsemble([paths] if isinstance(paths, str) else list(paths))


def label(store_url: str, gold: str | Sequence[str], noise: GoldNoise, queued: list[dict], seed: str) -> dict:
    """Each queued comparison's gold label into the store (once: a restart keeps the labels it has). The counts
    of each choice, and how often the label agrees with the gold model's sign."""
    from align.store import Store

    scorer = gold_scorer(gold)
    prompts = [q["row"]["prompt"] for q in queued]
    r_a, r_b = scorer.score(prompts, [q["a"] for q in queued]), scorer.score(prompts, [q["b"] for q in queued])
    rng, counts = random.Random(seed), {}
    with Store(store_url).init() as store:
        store.ensure_annotator(GOLD, kind="ai")
        for q, ra, rb in zip(queued, r_a, r_b):
            choice, left = noise.choice(ra - rb, rng)
            if store.labels(q["comparison_id"], annotator=GOLD):
                continue  # labelled before a restart
            # how sure gold is of the pair, whatever the noise did to the label: a flip is an honest mistake
            sure = abs(2 * sigmoid(ra - rb) - 1) if choice in ("a", "b") else None
            store.submit_label(q["comparison_id"], GOLD, choice, left=left, confidence=sure)
            counts[choice] = counts.get(choice, 0) + 1
            if choice in ("a", "b"):
                counts["agree"] = counts.get("agree", 0) + ((choice == "a") == (ra > rb))
    return counts


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-max(min(x, 50.0), -50.0)))


# ------------------------------------------------------------------------------------------ evaluation
def heldout_prompts(args: LoopArguments) -> list[Any]:
    """The first ``gold_eval_prompts`` distinct prompts of the loop's held-out split (``heldout_fraction``; the
    world's own held-out prompts): the loop never queues them or trains on them, and the gold evaluation asks only
    them."""
    from align.data.prompts import as_messages
    from align.rl import file_prompts, heldout_examples

    if args.dataset_name == "world":
        return [as_messages(e.prompt) for e in heldout_examples(args.seed, args.gold_eval_prompts)]
    rows = file_prompts(args.dataset_name, "test", args.heldout_fraction)
    return [row["prompt"] for row in rows[: args.gold_eval_prompts]]


def replies(policy: Path, prompts: list, max_new_tokens: int, seed: int, ref: Path | None = None) -> dict:
    """Greedy replies and a sample at T=1 per prompt, with its KL(policy || ref) where ``ref`` is given, else (the
    start) a second sample: the pairs the proxy's accuracy is measured on."""
    from align.generate import generate
    from align.logprobs import sample_with_kl
    from align.models import default_device, load, load_tokenizer

    model, tok = load(policy, device=default_device()), load_tokenizer(policy)
    greedy = [r[0] for r in generate(model, tok, prompts, max_new_tokens=max_new_tokens)]
    if ref is not None:
        sampled, kl = sample_with_kl(model, tok, prompts, str(ref), max_new_tokens=max_new_tokens, seed=seed)
        return {"greedy": greedy, "sampled": sampled, "kl": kl}
    two = generate(model, tok, prompts, max_new_tokens=max_new_tokens, do_sample=True, num_return_sequences=2,
                   seed=seed)
    return {"greedy": greedy, "sampled": [r[0] for r in two], "sampled_2": [r[1] for r in two],
            "kl": [0.0] * len(prompts)}


def evaluate(root: Path, policy: Path, start: Path, gold: str | Sequence[str], proxy: Sequence[Path],
             prompts: list, max_new_tokens: int, seed: int) -> dict[str, float]:
    """The round's figures by the gold model on held-out prompts: its mean reward of the policy's greedy and
    sampled replies, their win rates against the start policy's, the proxy's mean reward of the same sampled
    replies, the KL to the start, and the proxy's accuracy on pairs of the start's samples labelled by gold's
    sign (noise-free). The start's replies and their gold rewards are kept in ``root/gold_start.json``."""
    from align.judge import win_rate
    from align.score import RewardEnsemble

    gold_rm = gold_scorer(gold)
    cache = root / "gold_start.json"
    if cache.exists():
        base = json.loads(cache.read_text())
    else:
        base = replies(start, prompts, max_new_tokens, seed) | {"prompts": prompts}
        for key in ("greedy", "sampled", "sampled_2"):
            base[f"gold_{key}"] = gold_rm.score(prompts, base[key])
        cache.write_text(json.dumps(base))
    now = base if policy == start else replies(policy, prompts, max_new_tokens, seed, ref=start)
    g_greedy, g_sampled = gold_rm.score(prompts, now["greedy"]), gold_rm.score(prompts, now["sampled"])
    if policy != start:  # the replies, for rescoring with a fixed proxy (align.bench overopt)
        (policy.parent.parent / "gold_eval.json").write_text(json.dumps(
            {"prompts": prompts, "sampled": now["sampled"], "kl": now["kl"], "gold_sampled": g_sampled}))
    out = {
        "gold_reward_greedy": mean(g_greedy), "gold_reward_sampled": mean(g_sampled),
        "win_rate_vs_start_greedy": win_rate(g_greedy, base["gold_greedy"]),
        "win_rate_vs_start_sampled": win_rate(g_sampled, base["gold_sampled"]),
        "kl_to_start": mean(now["kl"]), "reply_chars": mean([len(r) for r in now["sampled"]]),
    }
    del gold_rm
    if proxy:
        rm = RewardEnsemble([str(p) for p in proxy])
        out["proxy_reward_sampled"] = mean(rm.score(prompts, now["sampled"]))
        pa, pb = rm.score(prompts, base["sampled"]), rm.score(prompts, base["sampled_2"])
        pairs = [(x - y, g1 - g2) for x, y, g1, g2 in zip(pa, pb, base["gold_sampled"], base["gold_sampled_2"])
                 if g1 != g2]
        out["proxy_accuracy_vs_gold"] = mean([(p > 0) == (g > 0) for p, g in pairs])
    return out


def mean(xs: Sequence[float]) -> float:
    xs = list(xs)
    return sum(xs) / max(len(xs), 1)


# ------------------------------------------------------------------------------------------ best-of-n
def best_of_n_expected(proxy: Sequence[float], gold: Sequence[float], n: int) -> float:
    """E[gold reward of the proxy's best of ``n``] over all n-subsets of the N samples (exact, no resampling):
    the i-th lowest by proxy (1-based) is the best of a random n-subset with probability C(i-1, n-1) / C(N, n)."""
    order = sorted(range(len(proxy)), key=lambda i: proxy[i])
    total = math.comb(len(order), n)
    return sum(math.comb(i, n - 1) * gold[j] for i, j in enumerate(order)) / total


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || policy) = log n - (n - 1) / n (Stiennon et al. 2020, Gao et al. 2022)."""
    return math.log(n) - (n - 1) / n
