"""align.score: batched scoring == per-example, rank, the command line, clear errors (tiny models, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_reward import build_assets

from align.models import NotARewardModel, check_reward_model
from align.score import RewardScorer, encode, main

torch.set_num_threads(1)

# fp32 rewards of batches of different shapes differ by vendor (Intel vs AMD: 1.4e-6 seen on an ensemble): rel 1e-4
TOL = {"rel": 1e-4, "abs": 1e-5}
PROMPTS = ["What is 3 + 4?",
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sort the digits 3 1 2."}],
           "Repeat the word cat 3 times.", "How many words are in: ant bee cow dog?", "hi"]
RESPONSES = ["The answer is 7.", "1 2 3", "Ugh, cat cat cat. Stop wasting my time.",
             "The answer is 4. Hope that helps!", ""]


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory) -> Path:
    return build_assets(tmp_path_factory.getbasetemp() / "rm_assets")[1]


def make_rm_dir(lm_dir: Path, out: Path, seed: int = 0) -> Path:
    """A reward-model dir as align.reward writes it (score head with a non-trivial weight)."""
    from align.models import load, load_tokenizer
    from align.reward import head_kwargs

    tok = load_tokenizer(lm_dir)
    torch.manual_seed(seed)
    model = load(str(lm_dir), "reward", **head_kwargs(str(lm_dir), tok))
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def rm_dir(lm_dir, tmp_path_factory) -> Path:
    return make_rm_dir(lm_dir, tmp_path_factory.mktemp("rm") / "final")


@pytest.fixture(scope="module")
def scorer(rm_dir) -> RewardScorer:
    return RewardScorer(rm_dir, device="cpu", batch_size=3)


def test_batched_equals_per_example(scorer, rm_dir):
    batched = scorer.score(PROMPTS, RESPONSES)
    one = RewardScorer(rm_dir, device="cpu", batch_size=1)
    single = [one.score_one(p, r) for p, r in zip(PROMPTS, RESPONSES)]
    assert batched == pytest.approx(single, **TOL)
    assert len(set(round(x, 4) for x in batched)) > 1


def test_scores_match_a_plain_hf_forward(scorer):
    """Same template and read-out as a straightforward loop: tokenize one, forward, read the logit."""
    ids = encode(scorer.tokenizer, PROMPTS[0], RESPONSES[0])
    text = scorer.tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPTS[0]}, {"role": "assistant", "content": RESPONSES[0]}], tokenize=False)
    assert ids == scorer.tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        ref = scorer.model(input_ids=torch.tensor([ids])).logits[0, 0].item()
    assert scorer.score_one(PROMPTS[0], RESPONSES[0]) == pytest.approx(ref, **TOL)


def test_message_list_response_and_broadcast_prompt(scorer):
    r1 = scorer.score("What is 3 + 4?", ["The answer is 7.", "7"])
    r2 = scorer.score(["What is 3 + 4?"] * 2, [[{"role": "assistant", "content": "The answer is 7."}], "7"])
    assert r1 == pytest.approx(r2, **TOL)
    assert scorer(["What is 3 + 4?"], ["7"]) == pytest.approx([r1[1]], **TOL)  # TRL reward_funcs signature
    assert scorer.__name__ == "reward_model"


def test_rank_sorts_best_first(scorer):
    responses = ["7", "The answer is 7.", "Ugh, 7.", "The answer is 8.", "seven"]
    ranked = scorer.rank("What is 3 + 4?", responses)
    assert sorted(t for t, _ in ranked) == sorted(responses)
    rewards = [r for _, r in ranked]
    assert rewards == sorted(rewards, reverse=True)
    assert dict(ranked) == pytest.approx(dict(zip(responses, scorer.score("What is 3 + 4?", responses))), **TOL)


def test_long_sequences_keep_their_end(rm_dir):
    s = RewardScorer(rm_dir, device="cpu", max_length=16)
    long = "word " * 100
    r = s.score_one("hi", long + "end")
    assert s.truncated == 1
    ids = encode(s.tokenizer, "hi", long + "end")[-16:]
    with torch.no_grad():
        ref = s.model(input_ids=torch.tensor([ids])).logits[0, 0].item()
    assert r == pytest.approx(ref, **TOL)


def test_cli_scores_a_jsonl(rm_dir, scorer, tmp_path, capsys):
    recs = [
        {"prompt": "What is 3 + 4?", "response": "The answer is 7.", "id": 1},
        {"prompt": [{"role": "user", "content": "What is 3 + 4?"}],
         "completion": [{"role": "assistant", "content": "7"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Ugh, hi."}]},
    ]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in recs))
    main(["--model", str(rm_dir), "--input", str(inp), "--output", str(out), "--device", "cpu"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows[:1]] == [1] and all("reward" in r for r in rows)
    expected = scorer.score(["What is 3 + 4?", "What is 3 + 4?", "hi"], ["The answer is 7.", "7", "Ugh, hi."])
    assert [r["reward"] for r in rows] == pytest.approx(expected, **TOL)

    r = main(["--model", str(rm_dir), "--prompt", "What is 3 + 4?", "--response", "7", "--device", "cpu"])
    assert float(capsys.readouterr().out.strip().splitlines()[-1]) == pytest.approx(r, **TOL)
    assert r == pytest.approx(expected[1], **TOL)


def test_cli_rank(rm_dir, scorer, tmp_path):
    inp, out = tmp_path / "bon.jsonl", tmp_path / "ranked.jsonl"
    recs = [{"prompt": "What is 3 + 4?", "responses": ["7", "The answer is 7.", "Ugh, 7."], "id": "a"},
            {"prompt": "hi", "responses": ["hello"]}]
    inp.write_text("".join(json.dumps(r) + "\n" for r in recs))
    main(["rank", "--model", str(rm_dir), "--input", str(inp), "--output", str(out), "--device", "cpu"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["id"] == "a" and len(rows[0]["responses"]) == 3
    rewards = [x["reward"] for x in rows[0]["responses"]]
    assert rewards == sorted(rewards, reverse=True)
    best = scorer.rank(recs[0]["prompt"], recs[0]["responses"])[0][0]
    assert rows[0]["best"] == rows[0]["responses"][0]["response"] == best


def test_cli_bad_record_names_line(rm_dir, tmp_path, capsys):
    inp = tmp_path / "bad.jsonl"
    inp.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n" + json.dumps({"prompt": "a"}) + "\n")
    assert main(["--model", str(rm_dir), "--input", str(inp), "--device", "cpu"]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err


def test_missing_score_head_is_a_clear_error(lm_dir, tmp_path, capsys):
    with pytest.raises(NotARewardModel, match=r"causal LM.*python -m align\.reward"):
        RewardScorer(lm_dir, device="cpu")
    with pytest.raises(NotARewardModel, match="python -m align.reward"):
        check_reward_model(lm_dir)
    assert main(["--model", str(lm_dir), "--prompt", "x", "--response", "y"]) == 2
    assert "python -m align.reward" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError):
        RewardScorer(tmp_path / "nope")


def test_ensemble_mean_and_spread_and_its_penalised_reward(lm_dir, rm_dir, scorer, tmp_path):
    from align import reward_funcs as R
    from align.score import RewardEnsemble

    other = make_rm_dir(lm_dir, tmp_path / "rm2", seed=1)
    members = torch.tensor([scorer.score(PROMPTS, RESPONSES),
                            RewardScorer(other, device="cpu").score(PROMPTS, RESPONSES)])
    assert not torch.allclose(members[0], members[1])  # two different judges
    ens = RewardEnsemble([rm_dir, other], device="cpu")
    mean, std = ens.score_std(PROMPTS, RESPONSES)
    assert mean == pytest.approx(members.mean(0).tolist(), **TOL)
    assert std == pytest.approx((members[0] - members[1]).abs().div(2).tolist(), **TOL)  # two members: |a-b|/2
    assert ens(PROMPTS, RESPONSES) == pytest.approx(mean, **TOL)

    # the 'rm' reward of an ensemble: its mean minus the penalty times its spread; one dir: that RM's own score
    (rm,) = R.build_reward_funcs(["rm"], [str(rm_dir), str(other)], rm_uncertainty_penalty=2.0)
    assert rm(PROMPTS, RESPONSES) == pytest.approx([m - 2.0 * s for m, s in zip(mean, std)], **TOL)
    (one,) = R.build_reward_funcs(["rm"], str(rm_dir), rm_uncertainty_penalty=2.0)
    assert one(PROMPTS, RESPONSES) == pytest.approx(members[0].tolist(), **TOL)
    with pytest.raises(FileNotFoundError, match=r"reward model '.*nope' does not exist"):
        R.build_reward_funcs(["rm"], [str(rm_dir), str(tmp_path / "nope")])

    # the command line: several --model dirs score with the ensemble, adding its spread
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in zip(PROMPTS, RESPONSES)))
    main(["--model", str(rm_dir), str(other), "--input", str(inp), "--output", str(out), "--device", "cpu"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["reward"] for r in rows] == pytest.approx(mean, **TOL)
    assert [r["reward_std"] for r in rows] == pytest.approx(std, **TOL)
