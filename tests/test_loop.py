"""align.loop: pair selection, the simulated annotator, and rounds end to end (human labels, resume)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import yaml

from align import loop, loop_round
from align.data import world


def test_pick_pair():
    scores = [[0.1, 2.0, -1.5, 0.3]]  # one reward model
    assert loop_round.pick_pair(scores, "extremes", random.Random(0)) == (1, 2)     # best vs worst
    assert loop_round.pick_pair(scores, "uncertainty", random.Random(0)) == (0, 3)  # |0.1 - 0.3| is the smallest
    i, j = loop_round.pick_pair(scores, "random", random.Random(0))
    assert i != j and {i, j} <= set(range(4))


def test_pick_pair_by_ensemble_disagreement():
    # two members agree on candidates 0 and 1 and disagree on 2: one ranks it far first, one ties it with 0
    members = [[0.0, 0.2, 4.0], [0.0, 0.2, 0.0]]
    assert loop_round.pick_pair(members, "disagreement", random.Random(0)) == (0, 2)  # margin std 2 (as (1, 2)), not 0
    assert loop_round.pick_pair(members, "uncertainty", random.Random(0)) == (0, 1)   # mean rewards 0, 0.2, 2
    assert loop_round.pick_pair(members, "extremes", random.Random(0)) == (2, 0)


def test_oracle_prefers_helpful_then_correct():
    ex = world.World(0).rl_prompts(1)[0]
    good, rude = world.render(ex, "helpful", True), world.render(ex, "rude", True)
    wrong, wrong2 = world.render(ex, "helpful", False), world.render(ex, "terse", False)
    assert loop_round.oracle_choice(ex, good, rude) == "a"
    assert loop_round.oracle_choice(ex, wrong, rude) == "b"
    assert loop_round.oracle_choice(ex, good, good + " ") == "tie"
    assert loop_round.oracle_choice(ex, wrong, wrong2) == "both_bad"


def test_bad_arguments_say_which():
    with pytest.raises(ValueError, match="selection"):
        loop.LoopArguments(selection="best")
    with pytest.raises(ValueError, match="candidates_per_prompt"):
        loop.LoopArguments(candidates_per_prompt=1)
    with pytest.raises(ValueError, match="needs labeller: human"):
        loop.LoopArguments(dataset_name="prompts.jsonl")
    with pytest.raises(ValueError, match="wait_for_labels needs labeller: human"):
        loop.LoopArguments(wait_for_labels=True)
    with pytest.raises(ValueError, match="policy_trainer must be one of .* got 'sft'"):
        loop.LoopArguments(policy_trainer="sft")
    with pytest.raises(ValueError, match="need reward_ensemble >= 2"):
        loop.LoopArguments(selection="disagreement")
    with pytest.raises(ValueError, match="needs policy_trainer ppo or grpo"):
        loop.LoopArguments(reward_ensemble=3, rm_uncertainty_penalty=1.0)
    with pytest.raises(ValueError, match="first_round_source .* needs labeller: human"):
        loop.LoopArguments(first_round_source="app:generate")
    with pytest.raises(ValueError, match="stage_args maps reward / dpo / ppo / grpo"):
        loop.LoopArguments(stage_args={"sft": {"max_steps": 1}})


def test_rl_with_an_ensemble_penalises_its_spread_by_default():
    """The loop's RL step against an ensemble is rewarded by mean - 1 x std unless told otherwise (docs/loop.md:
    more gold reward per nat of KL on SmolLM2); without an ensemble or with DPO there is no spread to penalise."""
    assert loop.LoopArguments(policy_trainer="grpo", reward_ensemble=2).rm_uncertainty_penalty == 1.0
    assert loop.LoopArguments(policy_trainer="ppo", reward_ensemble=3, rm_uncertainty_penalty=0.0
                              ).rm_uncertainty_penalty == 0.0
    assert loop.LoopArguments(policy_trainer="ppo").rm_uncertainty_penalty == 0.0
    assert loop.LoopArguments(reward_ensemble=2).rm_uncertainty_penalty == 0.0  # dpo


def test_first_round_trains_on_the_apps_labelled_pairs(tmp_path, tiny_loop_config):
    """first_round_source: round 1 is the app's labelled Prompts -> pairs (no judge needed: reward_model_path may be
    missing); the RM trains on the store's labels even when its config names a file; stage_args reach the stages;
    round 2 queues the new policy's candidates for people."""
    from align.store import Store

    url = f"sqlite:///{tmp_path / 'prefs.db'}"
    with Store(url).init() as store:
        store.ensure_annotator("alice", kind="human")
        app_pairs = [store.add_candidates(f"What is {i} + 1?", f"{i + 1}", f"It is {i + 2}.", source="app:generate")
                     for i in range(4)]
        other = store.add_candidates("Name a colour.", "Red.", "Blue.", source="import")
        for cid in [*app_pairs[:3], other]:
            store.submit_label(cid, "alice", "a")
    reward_yaml = tmp_path / "configs" / "reward.yaml"
    config = tiny_loop_config(rounds=2, prompts_per_round=3, candidates_per_prompt=2, labeller="human",
                              first_round_source="app:generate", reward_model_path=str(tmp_path / "no-judge"),
                              stage_args={"reward": {"max_steps": 1}, "dpo": {"logging_steps": 2}})
    reward_yaml.write_text(reward_yaml.read_text() + "dataset_name: no-such-file.jsonl\n")
    report = loop.main([str(config)])
    queued = json.loads((tmp_path / "loop/round_1/comparisons.json").read_text())
    assert [q["comparison_id"] for q in queued] == app_pairs[:3]  # labelled, of that source; not the import's
    r1 = report["rounds"]["1"]
    assert r1["pairs"] == 3 and r1["queue"]["mean_abs_margin"] is None
    rm_config = yaml.safe_load((tmp_path / "loop/round_1/reward/config.yaml").read_text())
    assert rm_config["dataset_name"] == "store" and rm_config["max_steps"] == 1
    assert yaml.safe_load((tmp_path / "loop/round_1/dpo/config.yaml").read_text())["logging_steps"] == 2
    assert report["waiting"]["round"] == 2
    with Store(url) as store:
        round2 = json.loads((tmp_path / "loop/round_2/comparisons.json").read_text())
        assert round2 and all(store.get_comparison(q["comparison_id"]).source == "loop-round-2" for q in round2)


def _store_with_world_labels(url: str) -> None:
    """The labels each round's RM trains on, besides the loop's, as the quickstart leaves the store."""
    from align.store import Store

    with Store(url).init() as store:
        store.import_pairs(world.World(0).preference_pairs()[:40], source="world", labeller="world-rule")


def test_rounds_wait_for_human_labels_then_resume(tmp_path, tiny_loop_config, monkeypatch):
    from align.store import Store

    url = f"sqlite:///{tmp_path / 'prefs.db'}"
    _store_with_world_labels(url)
    argv = [str(tiny_loop_config())]

    # round 1, human labeller: candidates are queued (most uncertain first) and the loop waits
    report = loop.main([*argv, "--rounds", "1", "--labeller", "human", "--selection", "uncertainty"])
    assert report["rounds"] == {} and report["waiting"]["round"] == 1
    queued = json.loads((tmp_path / "loop/round_1/comparisons.json").read_text())
    assert queued and not (tmp_path / "loop/round_1/reward").exists()
    with Store(url) as store:
        store.ensure_annotator("alice", kind="human")
        for q in queued:
            c = store.get_comparison(q["comparison_id"])
            assert c.priority == pytest.approx(-q["margin"]) and c.source == "loop-round-1"
            store.submit_label(q["comparison_id"], "alice", "a" if len(q["a"]) <= len(q["b"]) else "b")

    # labelled in the app: the same command carries on and trains round 1
    report = loop.main([*argv, "--rounds", "1", "--labeller", "human"])
    r1 = report["rounds"]["1"]
    assert "waiting" not in report
    assert r1["pairs"] == r1["queue"]["comparisons"] == len(queued)
    assert len((tmp_path / "loop/round_1/pairs.jsonl").read_text().splitlines()) == len(queued)  # what DPO read
    assert {"exact_match", "preferred_rate", "win_rate_vs_previous"} <= set(r1["policy"])
    assert (tmp_path / "loop/round_1/dpo/final/config.json").exists()

    # a second round with the simulated annotator; round 1 is not redone
    monkeypatch.setattr(loop_round, "oracle_choice", lambda ex, a, b: "a" if len(a) < len(b) else "b")
    report = loop.main([*argv, "--rounds", "2"])
    assert set(report["rounds"]) == {"1", "2"} and report["rounds"]["1"] == r1
    assert report["policy_path"].endswith("round_2/dpo/final")
    with Store(url) as store:
        assert len(store.labels(annotator=loop_round.ORACLE)) == report["rounds"]["2"]["pairs"]
    assert (tmp_path / "loop/loop.png").exists()
    steps = [json.loads(line)["step"] for line in (tmp_path / "loop/metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2]  # the start, then each round

    # keep_models 'last': round 1's models and every finished stage's checkpoints are gone, its figures are not;
    # running again skips both rounds without them
    left = sorted(str(p.relative_to(tmp_path / "loop")) for p in (tmp_path / "loop").glob("round_*/*/*")
                  if p.is_dir())
    assert left == ["round_2/dpo/adapter", "round_2/dpo/final", "round_2/reward/adapter", "round_2/reward/final"]
    assert (tmp_path / "loop/round_1/dpo/eval.json").exists() and (tmp_path / "loop/round_1/pairs.jsonl").exists()
    assert loop.main([*argv, "--rounds", "2"])["rounds"] == report["rounds"]

    # another loop on the same store (its own output_dir and seed; the same source names): its own pairs only
    other = loop.main([*argv, "--rounds", "1", "--seed", "1", "--output_dir", str(tmp_path / "loop-b")])
    assert other["rounds"]["1"]["pairs"] == other["rounds"]["1"]["queue"]["comparisons"]


@pytest.mark.parametrize("trainer", ["ppo", "grpo"])
def test_rl_rounds_learn_from_the_new_reward_model(tmp_path, tiny_loop_config, trainer):
    """policy_trainer ppo/grpo: each round's RL has the RM the round's labels made as its only reward."""
    _store_with_world_labels(f"sqlite:///{tmp_path / 'prefs.db'}")
    report = loop.main([str(tiny_loop_config(policy_trainer=trainer)), "--rounds", "2"])
    assert set(report["rounds"]) == {"1", "2"} and report["policy_path"].endswith(f"round_2/{trainer}/final")
    for k in (1, 2):
        run = tmp_path / f"loop/round_{k}/{trainer}"
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        assert cfg["reward_funcs"] == ["rm"] and cfg["reward_model_path"].endswith(f"round_{k}/reward/final")
        start = tmp_path / f"loop/round_{k - 1}/{trainer}/final" if k > 1 else None
        assert start is None or cfg["model_name_or_path"] == str(start)  # round 2 starts from round 1's policy
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert any("rewards/rm/mean" in r for r in rows)
        assert {"exact_match", "preferred_rate"} <= set(report["rounds"][str(k)]["policy"])
    with pytest.raises(ValueError,
                       match=f"round_1 was trained with policy_trainer {trainer}, and this run asks for dpo"):
        loop.main([str(tiny_loop_config()), "--rounds", "3"])  # a 3rd round with another step: refused


def test_ensemble_rounds_pick_by_disagreement_and_penalise_it(tmp_path, tiny_loop_config):
    """reward_ensemble 2: a second RM per round (its own seed, bootstrap labels); the next round's pairs are those
    the two disagree on most, and PPO's reward is their mean minus the penalty times their spread."""
    from align.store import Store

    url = f"sqlite:///{tmp_path / 'prefs.db'}"
    _store_with_world_labels(url)
    config = tiny_loop_config(policy_trainer="ppo", reward_ensemble=2, selection="disagreement",
                              rm_uncertainty_penalty=1.0)
    report = loop.main([str(config), "--rounds", "2"])
    assert report["reward_model_path"] == [str(tmp_path / "loop/round_2" / d / "final") for d in ("reward", "reward_1")]
    for k in (1, 2):
        out = tmp_path / f"loop/round_{k}"
        member = yaml.safe_load((out / "reward_1/config.yaml").read_text())
        assert member["bootstrap"] is True and member["seed"] == 1
        data = json.loads((out / "reward_1/summary.json").read_text())["data"]
        assert data["distinct_train_pairs"] < data["train_pairs"]  # a resample, with repeats
        cfg = yaml.safe_load((out / "ppo/config.yaml").read_text())
        assert cfg["reward_model_path"] == [str(out / "reward/final"), str(out / "reward_1/final")]
        assert cfg["rm_uncertainty_penalty"] == 1.0
        assert len(report["rounds"][str(k)]["reward_ensemble"]) == 2
    queued = json.loads((tmp_path / "loop/round_2/comparisons.json").read_text())
    assert any(q["disagreement"] > 0 for q in queued)  # round 1's two RMs differ
    with Store(url) as store:
        for q in queued:
            assert store.get_comparison(q["comparison_id"]).priority == pytest.approx(q["disagreement"])


def test_own_prompts_go_to_the_app(tmp_path, tiny_lm_dir, tiny_rm_dir):
    """A prompts file and human labels: the loop queues the pairs and waits, and says when prompts run out."""
    from align.store import Store

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Name a colour, please ({i})."}) + "\n" for i in range(3)))
    url = f"sqlite:///{tmp_path / 'prefs.db'}"
    argv = ["--output_dir", str(tmp_path / "loop"), "--store_url", url, "--policy_path", tiny_lm_dir,
            "--reward_model_path", tiny_rm_dir, "--dataset_name", str(prompts), "--labeller", "human",
            "--prompts_per_round", "3", "--candidates_per_prompt", "2", "--max_new_tokens", "6"]
    report = loop.main(argv)
    queued = json.loads((tmp_path / "loop/round_1/comparisons.json").read_text())
    assert report["waiting"] == {"round": 1, "comparisons": len(queued)} and queued
    with Store(url) as store:
        texts = {store.get_prompt(store.get_comparison(q["comparison_id"]).prompt_id)["messages"][-1]["content"]
                 for q in queued}
    assert texts <= {f"Name a colour, please ({i})." for i in range(3)}
    with pytest.raises(ValueError, match="no prompts left for round 2"):
        args = loop.LoopArguments(dataset_name=str(prompts), labeller="human", prompts_per_round=3, store_url=url)
        loop_round.queue_comparisons(args, 2, Path(tiny_lm_dir), Path(tiny_rm_dir), tmp_path)


def test_app_runs_the_loop_on_its_labels(tmp_path, tiny_loop_config):
    """Admin → Loop: a run queues round 1 in the app's store and stops; once labelled, the next run trains it."""
    from align.store import Store
    from app.loop_runner import LoopRunner, rounds_table, status_markdown

    url = f"sqlite:///{tmp_path / 'app.db'}"  # the app's store, not the config's: the runner passes it on
    _store_with_world_labels(url)
    cfg = tiny_loop_config(rounds=1, prompts_per_round=5, labeller="world")  # the runner makes it human
    runner = LoopRunner(str(cfg), url)
    st = runner.status()
    assert st["rounds_done"] == 0 and "waiting" not in st and not st["running"]
    assert "Run the loop" in status_markdown(st)

    runner.start()
    with pytest.raises(RuntimeError, match="already running"):
        runner.start()
    assert runner.wait(300) == 0
    st = runner.status()
    w = st["waiting"]
    assert w["round"] == 1 and w["unlabelled"] == w["comparisons"] > 1 and st["rounds_done"] == 0
    queued = json.loads((tmp_path / "loop/round_1/comparisons.json").read_text())
    with Store(url) as store:  # neither a rule's label nor a human's skip is the human label the round waits for
        store.ensure_annotator(loop_round.ORACLE, kind="rule")
        store.submit_label(queued[0]["comparison_id"], loop_round.ORACLE, "b")
        store.ensure_annotator("bob", kind="human")
        store.submit_label(queued[1]["comparison_id"], "bob", "skip")
        assert runner.status()["waiting"]["unlabelled"] == w["comparisons"]
        store.ensure_annotator("alice", kind="human")
        store.submit_label(queued[0]["comparison_id"], "alice", "a")
        assert runner.status()["waiting"]["unlabelled"] == w["comparisons"] - 1  # counted live in the store
        for q in queued[1:]:
            store.submit_label(q["comparison_id"], "alice", "b")
    assert "all" in status_markdown(runner.status())

    runner.start()
    assert runner.wait(300) == 0, runner.status()["log"]
    st = runner.status()
    assert st["rounds_done"] == 1 and "waiting" not in st and Path(st["plot"]).exists()
    table = rounds_table(st["report"])
    assert table["round"].tolist() == [0, 1] and "RM accuracy" in table and "gold sampled" not in table
    assert st["report"]["rounds"]["1"]["pairs"] == len(queued)  # alice's labels; the oracle's "b" did not count
    pairs = [json.loads(line) for line in (tmp_path / "loop/round_1/pairs.jsonl").read_text().splitlines()]
    assert pairs[0]["chosen"][-1]["content"] == queued[0]["a"]
    assert "All rounds are done" in status_markdown(st) and "align.loop" in st["log"]


def test_one_loop_per_output_dir(tmp_path, tiny_loop_config):
    cfg = tiny_loop_config()
    root = tmp_path / "loop"
    assert not loop.running(root)
    with loop.exclusive(root):  # as if another process ran the loop here
        assert loop.running(root)
        with pytest.raises(RuntimeError, match=f"another loop is running on {root} \\(pid {os.getpid()}\\)"):
            loop.main([str(cfg)])
    assert not loop.running(root)


def test_app_says_when_a_loop_run_failed(tmp_path, tiny_loop_config):
    from app.loop_runner import LoopRunner, status_markdown

    cfg = tiny_loop_config(policy_path=str(tmp_path / "no-such-policy"))
    runner = LoopRunner(str(cfg), f"sqlite:///{tmp_path}/a.db")
    runner.start()
    assert runner.wait(120) == 2  # bad input: one line on stderr, exit status 2
    st = runner.status()
    assert st["exit_code"] == 2 and not st["running"]
    assert "failed (exit code 2)" in status_markdown(st) and "error: " in st["log"]
    assert "policy_path: model '" in st["log"] and "no-such-policy' not found" in st["log"]
    assert "Traceback" not in st["log"]


def test_waiting_loop_trains_once_humans_label(tmp_path, tiny_loop_config):
    """wait_for_labels: the loop polls the store and trains round 1 as soon as its pairs are labelled."""
    import threading
    import time

    from align.store import Store

    url = f"sqlite:///{tmp_path / 'prefs.db'}"
    _store_with_world_labels(url)
    argv = [str(tiny_loop_config(rounds=1, labeller="human", wait_for_labels=True, poll_seconds=0.2))]
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(loop.main(argv)))
    t.start()
    queued_path = tmp_path / "loop/round_1/comparisons.json"
    for _ in range(600):
        if queued_path.exists() or not t.is_alive():
            break
        time.sleep(0.1)
    queued = json.loads(queued_path.read_text())
    assert t.is_alive() and loop.running(tmp_path / "loop")  # waiting, not stopped
    with Store(url) as store:
        store.ensure_annotator("alice", kind="human")
        for q in queued:
            store.submit_label(q["comparison_id"], "alice", "a")
    t.join(300)
    assert not t.is_alive() and "waiting" not in result and result["rounds"]["1"]["pairs"] == len(queued)
