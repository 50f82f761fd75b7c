"""align.evaluate: the sampled figures, pass@k and maj@k."""

from align.data.world import Example
from align.evaluate import sample_agreement, score_replies


def _ex(answer: str, task: str = "add") -> Example:
    return Example(id="x", task=task, prompt="What is 3 + 4?", answer=answer, split="heldout")


def test_pass_and_majority_at_k_read_answers_across_styles():
    exs = [_ex("7")] * 4
    samples = [
        ["The answer is 7.", "8", "Ugh, 7. Stop wasting my time."],  # 7 twice, in two styles: majority right
        ["8", "The answer is 8. Happy to help!", "7"],                # right once, majority wrong
        ["7.", "Ugh, obviously 7.", "8"],                             # "7." and "7" are one answer
        ["The answer is", "9", "The answer is"],                     # unreadable replies don't vote
    ]
    assert sample_agreement(exs, samples) == {"pass_at_k": 3 / 4, "maj_at_k": 2 / 4}


def test_score_replies_counts_each_sample():
    exs = [_ex("7"), _ex("7")]
    s = score_replies(exs, ["The answer is 7.", "7"])
    assert s["exact_match"] == 1.0 and s["preferred_rate"] == 0.5
    assert s["styles"] == {"helpful": 0.5, "terse": 0.5}
