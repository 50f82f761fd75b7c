"""A reward model as a judge: the win rate of one policy's replies over another's on the same prompts.

DPO's ``win_rate_vs_sft`` (the start policy's replies against the trained one's, sampled at T=1 on held-out
prompts) and the loop's ``win_rate_vs_previous`` are this figure; the judge should never have seen the prompts.
"""

from __future__ import annotations

from typing import Any, Sequence

from align.generate import generate


def win_rate(rewards_new: Sequence[float], rewards_old: Sequence[float]) -> float:
    """Share of prompts where the new policy's reply scores higher; ties count half."""
    pairs = list(zip(rewards_new, rewards_old, strict=True))
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / max(len(pairs), 1)


def sample_replies(model, tokenizer, prompts: list[Any], max_new_tokens: int, seed: int) -> list[str]:
    """One reply per prompt, sampled at T=1 (the model's train/eval mode is kept)."""
    was = model.training
    model.eval()
    out = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, do_sample=True, temperature=1.0,
                   seed=seed)
    model.train(was)
    return [r[0] for r in out]


def judge(rm_path: str | list[str], prompts: list[Any], old: list[str], new: list[str]) -> dict[str, Any]:
    """Win rate of ``new`` over ``old`` replies to the same prompts, their mean rewards and a few examples."""
    from align.score import RewardEnsemble, RewardScorer

    scorer = RewardEnsemble(rm_path) if isinstance(rm_path, list) else RewardScorer(rm_path)
    r_new, r_old = scorer.score(prompts, new), scorer.score(prompts, old)
    return {
        "win_rate_vs_sft": win_rate(r_new, r_old),
        "win_rate_num_prompts": len(prompts),
        "mean_reward": sum(r_new) / len(r_new),
        "mean_reward_sft": sum(r_old) / len(r_old),
        "reply_chars": sum(map(len, new)) / len(new),
        "reply_chars_sft": sum(map(len, old)) / len(old),
        "win_rate_samples": [{"prompt": p, "sft": a, "dpo": b, "reward_sft": ra, "reward_dpo": rb}
                             for p, a, b, ra, rb in list(zip(prompts, old, new, r_old, r_new))[:8]],
    }
