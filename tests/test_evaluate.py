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


def test_evaluate_command_compares_models_on_the_same_prompts(tmp_path, tiny_lm_dir, tiny_rm_dir):
    import json

    import pytest
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.evaluate import evaluate, main

    argv = ["configs/evaluate.yaml", "--output_dir", str(tmp_path / "ev"),
            "--models", f"[a={tiny_lm_dir}, b={tiny_lm_dir}]",
            "--reward_model_path", tiny_rm_dir, "--reference_model_path", tiny_lm_dir, "--num_prompts", "6",
            "--kl_prompts", "3", "--max_new_tokens", "6"]
    results = main(argv)
    assert list(results) == ["a", "b"]
    assert json.loads((tmp_path / "ev" / "eval.json").read_text()).keys() == {"a", "b"}
    for r in results.values():
        assert abs(r["kl_to_reference"]) < 1e-4  # each model is its own reference here
        assert {"mean_rm_reward", "reward/correct", "reward/polite", "maj_at_k"} <= set(r)
    assert results["a"]["exact_match_sampled"] == results["b"]["exact_match_sampled"]  # same prompts, same samples
    model, tok = AutoModelForCausalLM.from_pretrained(tiny_lm_dir), AutoTokenizer.from_pretrained(tiny_lm_dir)
    alone = evaluate(model, tok, num_prompts=6, max_new_tokens=6)
    assert results["a"]["exact_match"] == alone["exact_match"]  # the figures every stage's eval.json has
    assert "| a |" in (tmp_path / "ev" / "eval.md").read_text() and (tmp_path / "ev" / "eval.png").exists()

    with pytest.raises(FileNotFoundError, match=r"models: nowhere=\./nowhere/final not found"):
        main([*argv[:3], "--models", "[./nowhere/final]", "--output_dir", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ValueError, match="two share a label"):
        main([*argv[:3], "--models", f"[{tiny_lm_dir}, {tiny_lm_dir}]"])
