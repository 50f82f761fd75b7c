"""align.reward_funcs: rule rewards on the world's replies, names, weights, the reward model, bad rewards."""

from __future__ import annotations

import math

import pytest

from align import reward_funcs as R
from align.data import world

EX = world.World(0, n_rl=40).rl_prompts(40)


def _cols(exs):
    return {"task": [e.task for e in exs], "answer": [e.answer for e in exs]}


def _prompts(exs):
    return [[{"role": "user", "content": e.prompt}] for e in exs]


def test_rule_rewards_on_rendered_replies():
    exs = EX[:11]
    for style in world.STYLES:
        for ok in (True, False):
            replies = [[{"role": "assistant", "content": world.render(e, style, ok)}] for e in exs]
            c = R.correct(_prompts(exs), replies, **_cols(exs))
            p = R.polite(_prompts(exs), replies, **_cols(exs))
            w = R.world_reward(_prompts(exs), replies, **_cols(exs))
            f = R.well_formed(_prompts(exs), replies, **_cols(exs))
            assert f == [1.0] * len(exs)  # right or wrong, every rendered reply is well formed
            assert c == [float(ok)] * len(exs)
            assert p == [float(style == "helpful")] * len(exs)
            assert w == [1.0 if ok and style == "helpful" else 0.5 if ok else 0.0] * len(exs)


def test_answer_reward_reads_the_final_answer_of_free_text():
    exs = [e for e in EX if e.task in ("add", "sub", "first_letter", "sort_digits")][:8]
    said = [f"Let me think. The result is {e.answer}." for e in exs]
    wrong = [f"Let me think. The result is {'9 9 9' if ' ' in e.answer else 'q' if e.answer.isalpha() else 99}."
             for e in exs]
    assert R.answer(_prompts(exs), said, **_cols(exs)) == [1.0] * len(exs)
    assert R.answer(_prompts(exs), wrong, **_cols(exs)) == [0.0] * len(exs)
    assert R.correct(_prompts(exs), said, **_cols(exs)) == [0.0] * len(exs)  # not the world's exact form
    assert [f.__name__ for f in R.build_reward_funcs(["answer", "correct"])] == ["answer", "correct"]


def test_format_reward_rejects_broken_replies():
    replies = ["The answer is 7.", "n o i l", "Ugh, 12. Stop wasting my time.",  # well formed
               "The answer is", "Ugh, are in in in in", "The answer is 7. Happy to", "7 apples", ""]
    assert R.well_formed(["p"] * len(replies), replies) == [1.0] * 3 + [0.0] * 5


def test_length_reward():
    f = R.make_length(target=4)
    assert f(["p"] * 3, ["a", "b", "c"], completion_ids=[[1] * 3, [1] * 4, [1] * 12]) == [0.0, 0.0, -2.0]
    assert f(["p"], ["one two three four five six"]) == [-0.5]  # no ids: whitespace words


def test_build_names_and_weights():
    fs = R.build_reward_funcs(["correct", "polite", "world", "format", "length", "align.reward_funcs:polite"])
    assert [f.__name__ for f in fs] == ["correct", "polite", "world", "format", "length", "polite"]
    total, per = R.score_all(fs[:2], [1.0, 0.5], _prompts(EX[:1]), ["The answer is " + EX[0].answer + "."],
                             **_cols(EX[:1]))
    assert total == [1.5] and per == {"correct": [1.0], "polite": [1.0]}
    with pytest.raises(ValueError, match="unknown reward 'nice'"):
        R.build_reward_funcs(["nice"])
    with pytest.raises(ValueError, match="reward_weights has 1 values for 2"):
        R.validate_weights(["correct", "polite"], [1.0])


def test_rule_reward_without_answer_column_says_so():
    (f,) = R.build_reward_funcs(["correct"])
    with pytest.raises(R.RewardError, match="reward 'correct' needs the dataset columns 'task' and 'answer'"):
        f(["What is 1 + 1?"], ["2"])


def test_raising_and_nan_rewards_name_reward_and_sample():
    def boom(prompts, completions, **kw):
        return [1.0 / (len(c) - 3) for c in completions]  # ZeroDivisionError on a 3-character reply

    def nan_on_second(prompts, completions, **kw):
        return [0.0, math.nan, 1.0]

    with pytest.raises(R.RewardError, match=r"reward 'boom' raised ZeroDivisionError"):
        R.checked(boom)(["a", "b"], ["long reply", "abc"])
    with pytest.raises(R.RewardError, match=r"reward 'nan_on_second' returned nan for sample 1: "
                                            r"prompt='q2', completion='r2'"):
        R.checked(nan_on_second)(["q1", "q2", "q3"], ["r1", "r2", "r3"])
    with pytest.raises(R.RewardError, match=r"returned 1 values for 2 completions"):
        R.checked(lambda prompts, completions, **kw: [1.0])(["a", "b"], ["x", "y"])
    with pytest.raises(R.RewardError, match=r"returned None for sample 0"):
        R.checked(lambda prompts, completions, **kw: [None])(["a"], ["x"])


def test_missing_reward_model_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist; train one first with `python -m align\.reward "
                                                r"configs/reward\.yaml`"):
        R.build_reward_funcs(["rm"], tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"needs reward_model_path.*python -m align\.reward"):
        R.build_reward_funcs(["rm"], None)
    with pytest.raises(FileNotFoundError, match="not a model dir"):
        R.check_reward_model_dir(tmp_path)


def test_reward_model_reward():
    pytest.importorskip("align.score")  # align/score.py (RewardScorer) is written concurrently
    from test_grpo import tiny_dirs

    (rm,) = R.build_reward_funcs(["rm"], tiny_dirs()["rm"])
    vals = rm(_prompts(EX[:3]), ["The answer is 3.", "Ugh, 4.", "5"])
    assert rm.__name__ == "rm" and len(vals) == 3 and all(math.isfinite(v) for v in vals)
    assert len(set(vals)) > 1
