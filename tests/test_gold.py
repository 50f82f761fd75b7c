"""align.gold: the gold labeller's noise, best-of-n, and a gold-labelled loop end to end on tiny models."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from align import gold, loop


def test_noise_off_follows_the_gold_sign():
    rng, noise = random.Random(0), gold.GoldNoise()
    margins = [random.Random(1).gauss(0, 1) for _ in range(500)]
    assert all(noise.choice(m, rng)[0] == ("a" if m > 0 else "b") for m in margins)


def test_noise_rates_are_what_was_asked():
    n, rng = 20000, random.Random(0)
    margins = [random.Random(i).gauss(0, 1) for i in range(n)]
    noise = gold.GoldNoise(flip_rate=0.2, tie_band=0.5, tie_label="skip", left_bias=0.1)
    out = [noise.choice(m, rng) for m in margins]
    biased_share = 0.1
    in_band = sum(abs(m) < 0.5 for m in margins) / n
    skips = sum(c == "skip" for c, _ in out) / n
    assert skips == pytest.approx((1 - biased_share) * in_band, abs=0.015)
    decided = [(m, c, left) for m, (c, left) in zip(margins, out) if c in "ab"]
    wrong = sum((c == "a") != (m > 0) for m, c, _ in decided) / len(decided)
    # wrong labels: flips among the unbiased (and outside the band) plus half the left-biased ones
    unbiased = (1 - biased_share) * (1 - in_band)
    expected = (unbiased * 0.2 + biased_share * 0.5) / (unbiased + biased_share)
    assert wrong == pytest.approx(expected, abs=0.015)
    left = sum(c == side for _, c, side in decided) / len(decided)
    assert left == pytest.approx((unbiased * 0.5 + biased_share) / (unbiased + biased_share), abs=0.015)
    assert [noise.choice(m, random.Random(3)) for m in margins[:50]] == \
        [noise.choice(m, random.Random(3)) for m in margins[:50]]  # seeded


def test_bradley_terry_annotator_calls_close_pairs_by_their_probability():
    rng, noise = random.Random(0), gold.GoldNoise(temperature=0.5)
    for margin, p_a in ((0.0, 0.5), (0.5, gold.sigmoid(1.0)), (-1.0, gold.sigmoid(-2.0))):
        share = sum(noise.choice(margin, rng)[0] == "a" for _ in range(10000)) / 10000
        assert share == pytest.approx(p_a, abs=0.015)


def test_bad_noise_says_which():
    with pytest.raises(ValueError, match="gold_flip_rate"):
        gold.GoldNoise(flip_rate=1.5)
    with pytest.raises(ValueError, match="gold_tie_label"):
        gold.GoldNoise(tie_label="maybe")
    with pytest.raises(ValueError, match="gold_model_path"):
        loop.LoopArguments(labeller="gold_rm", dataset_name="p.jsonl", heldout_fraction=0.2)
    with pytest.raises(ValueError, match="heldout_fraction"):
        loop.LoopArguments(labeller="gold_rm", gold_model_path="g", dataset_name="p.jsonl")


def test_world_gold_loop_judges_on_prompts_it_never_queues():
    """On the world (the CPU variant, configs/loop_gold_world.yaml) the gold evaluation asks the world's own
    held-out prompts, which no round queues; no heldout_fraction is needed."""
    from align.loop_round import round_prompts

    args = loop.LoopArguments(labeller="gold_rm", gold_model_path="g", dataset_name="world", reward_model_path=None,
                              gold_eval_prompts=50, prompts_per_round=100)
    held = {p[0]["content"] for p in gold.heldout_prompts(args)}
    queued = {r["prompt"][0]["content"] for k in (1, 2, 3) for r in round_prompts(args, k)}
    assert len(held) == 50 and len(queued) > 250 and not held & queued  # (a few RL prompts repeat)


def test_best_of_n_is_exact_over_subsets():
    proxy, gold_r = [0.3, 0.1, 0.9, 0.5], [1.0, 2.0, 3.0, 4.0]
    assert gold.best_of_n_expected(proxy, gold_r, 1) == pytest.approx(2.5)  # the mean
    assert gold.best_of_n_expected(proxy, gold_r, 4) == pytest.approx(3.0)  # the proxy's best, always
    # n = 2: the best-by-proxy of each of the 6 pairs
    pairs = [(a, b) for a in range(4) for b in range(a + 1, 4)]
    brute = sum(gold_r[max((a, b), key=proxy.__getitem__)] for a, b in pairs) / len(pairs)
    assert gold.best_of_n_expected(proxy, gold_r, 2) == pytest.approx(brute)
    assert gold.best_of_n_kl(1) == 0 and gold.best_of_n_kl(64) == pytest.approx(math.log(64) - 63 / 64)


def test_gold_loop_labels_trains_and_judges(tmp_path, tiny_loop_config, tiny_rm_dir):
    """No start RM: round 1 is random; the gold model's labels (kind ai) train the proxy and DPO; each round is
    judged by gold on held-out prompts the loop never queued; result.json holds the curve."""
    from align.data.prompts import split_of
    from align.store import Store

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Name colour {i}, please."}) + "\n" for i in range(40)))
    cfg = tiny_loop_config(labeller="gold_rm", gold_model_path=tiny_rm_dir, reward_model_path=None,
                           dataset_name=str(prompts), heldout_fraction=0.3, gold_eval_prompts=4,
                           gold_eval_max_new_tokens=6, selection="uncertainty", rounds=2, gold_flip_rate=0.1,
                           soft_labels=True, keep_models="all")  # (round 1's models stay until 2 is judged)
    report = loop.main([str(cfg)])
    root = tmp_path / "loop"
    result = json.loads((root / "result.json").read_text())
    assert result["labels"][0] == 0 and result["labels"][2] == sum(report["rounds"][k]["queue"]["comparisons"]
                                                                   for k in ("1", "2"))
    assert len(result["gold_reward_greedy"]) == 3 and result["kl_to_start"][0] == 0
    assert result["proxy_accuracy_vs_gold"][0] is None and result["proxy_accuracy_vs_gold"][2] is not None
    assert result["win_rate_vs_start_greedy"][0] == 0.5
    url = f"sqlite:///{tmp_path / 'prefs.db'}"
    with Store(url) as store:
        assert {a["name"]: a["kind"] for a in store.list_annotators()}[gold.GOLD] == "ai"
        queued = [q for k in (1, 2) for q in json.loads((root / f"round_{k}/comparisons.json").read_text())]
        scorer = gold.gold_scorer(tiny_rm_dir)
        margins = (np.array(scorer.score([q["row"]["prompt"] for q in queued], [q["a"] for q in queued]))
                   - scorer.score([q["row"]["prompt"] for q in queued], [q["b"] for q in queued]))
        for q, m in zip(queued, margins):
            assert split_of(q["row"]["prompt"], 0.3) == "train"
            (lab,) = store.labels(q["comparison_id"], annotator=gold.GOLD)
            assert lab.choice in ("a", "b") and lab.left in ("a", "b")
            # gold's sureness of the pair, whatever the flip did: the soft label P = (1 + it) / 2
            assert lab.confidence == pytest.approx(abs(2 * gold.sigmoid(m) - 1), abs=1e-4)
    summary = json.loads((root / "round_2/reward/summary.json").read_text())
    assert summary["data"]["soft_labels"] is True  # the proxy learned p_chosen
    rows = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2] and "gold/gold_reward_greedy" in rows[2]

    # killed after round 2's policy was trained but before gold judged it: a restart judges it, not skips it
    del report["rounds"]["2"]
    (root / "report.json").write_text(json.dumps(report))
    (root / "result.json").unlink()
    again = loop.main([str(cfg)])
    assert "gold_reward_greedy" in again["rounds"]["2"]["gold"]
    assert len(json.loads((root / "result.json").read_text())["gold_reward_greedy"]) == 3


def test_labels_curve_stops_at_a_killed_round(tmp_path):
    """A run whose round 2 never reached the report (killed) counts to round 1: round 3 is not taken for round 2."""
    from align.bench.labels import curve

    g = {"labels": 0, "gold_reward_greedy": 0.0}
    rounds = {"1": {"gold": g | {"labels": 4}}, "3": {"gold": g | {"labels": 12}}}
    (tmp_path / "report.json").write_text(json.dumps({"start": {"gold": g}, "rounds": rounds}))
    assert curve(tmp_path)["labels"] == [0, 4]


def test_labels_bench_runs_selections_in_parallel_and_aggregates(tmp_path, tiny_loop_config, tiny_rm_dir):
    """``align.bench labels`` on tiny models: two selections in two subprocesses, then the table, plot, verdict."""
    from align.bench import labels

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Name colour {i}, please."}) + "\n" for i in range(30)))
    cfg = tiny_loop_config(labeller="gold_rm", gold_model_path=tiny_rm_dir, reward_model_path=None,
                           dataset_name=str(prompts), heldout_fraction=0.3, gold_eval_prompts=3,
                           gold_eval_max_new_tokens=6, rounds=2, prompts_per_round=4, reward_ensemble=2)
    out = tmp_path / "bench"
    assert labels.main(["--config", str(cfg), "--selections", "random", "disagreement", "--seeds", "0",
                        "--parallel", "2", "--cores", "2", "--out", str(out), "--set", "dpo_epochs=1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["runs"] == {"first-0": "done", "random-0": "done", "disagreement-0": "done"}
    # round 1 ran once (random pairs: no reward model yet) and both selections carried on from it
    first = (out / "first-0/round_1/comparisons.json").read_text()
    assert all((out / f"{s}-0/round_1/comparisons.json").read_text() == first for s in ("random", "disagreement"))
    assert (out / "disagreement-0/round_2/comparisons.json").read_text() != \
        (out / "random-0/round_2/comparisons.json").read_text()
    rows = summary["aggregate"]["disagreement"]
    assert [r["round"] for r in rows] == [0, 1, 2] and rows[2]["labels"] > rows[1]["labels"] > 0
    assert "gold_reward_greedy" in rows[2] and (out / "labels.png").exists()
    assert summary["verdict"]["answer"].startswith(("yes", "no"))
    # again: both runs are done, so nothing runs and the figures are the same
    assert labels.main(["--config", str(cfg), "--selections", "random", "disagreement", "--seeds", "0",
                        "--out", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["aggregate"] == summary["aggregate"]


def test_overopt_world_figures_are_the_checkers_means():
    """On the world's prompts the bench adds the world's checker (the truth behind both reward models): per
    sample column, then the mean, so k samples per prompt count equally."""
    from align.bench.overopt import world_figures
    from align.data import world
    from align.rl import heldout_examples

    exs = heldout_examples(0, 6)
    samples = [[world.render(e, "helpful"), world.render(e, "terse"), world.render(e, "helpful", correct=False)]
               for e in exs]
    assert world_figures(exs, samples) == pytest.approx({"exact_match": 2 / 3, "preferred_rate": 1 / 3})
    assert world_figures(exs, [[s[1]] for s in samples]) == pytest.approx({"exact_match": 1, "preferred_rate": 0})


def test_overopt_bench_best_of_n_and_checkpoints(tmp_path, tiny_loop_config, tiny_lm_dir, tiny_rm_dir):
    """``align.bench overopt`` on tiny models: best-of-n by a loop's last ensemble (with and without the std
    penalty) against gold, and the loop's rounds rescored by that fixed proxy."""
    from align.bench import overopt

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Name colour {i}, please."}) + "\n" for i in range(30)))
    cfg = tiny_loop_config(labeller="gold_rm", gold_model_path=tiny_rm_dir, reward_model_path=None,
                           dataset_name=str(prompts), heldout_fraction=0.3, gold_eval_prompts=3,
                           gold_eval_max_new_tokens=6, rounds=1, prompts_per_round=4, reward_ensemble=2)
    loop.main([str(cfg)])
    run = tmp_path / "loop"
    assert overopt.main(["--policy", tiny_lm_dir, "--gold", tiny_rm_dir, "--proxy", str(run), "--loop_runs",
                         str(run), "--dataset_name", str(prompts), "--heldout_fraction", "0.3", "--num_prompts",
                         "3", "--n_max", "8", "--max_new_tokens", "6", "--out", str(tmp_path / "oo"),
                         "--checkpoints", str(run / "round_1/dpo/final")]) == 0
    res = json.loads((tmp_path / "oo/overopt.json").read_text())
    assert [p.split("/")[-2] for p in res["proxy"]] == ["reward", "reward_1"]
    assert set(res["best_of_n"]) == {"0.0", "1.0"}
    rows = res["best_of_n"]["0.0"]["rows"]
    assert [r["n"] for r in rows] == [1, 2, 4, 8] and rows[0]["kl"] == 0
    assert rows[-1]["proxy"] >= rows[0]["proxy"] - 1e-9  # the proxy's own pick never lowers the proxy's mean
    assert [c["round"] for c in res["checkpoints"]] == [0, 1] and (tmp_path / "oo/overopt.png").exists()
    assert [c["checkpoint"] for c in res["rl_checkpoints"]] == [str(run / "round_1/dpo/final")]
    assert res["rl_checkpoints"][0]["gold_gain_ci95"] > 0  # one sample on each of 3 prompts: gains differ


def test_labels_verdict_counts_only_rounds_where_the_selection_acted():
    from align.bench.labels import aggregate, verdict

    def run(*gold_r):
        return {"labels": [0, 48, 96, 144, 192][: len(gold_r)], "gold_reward_greedy": list(gold_r),
                **{k: [None] * len(gold_r) for k in ("gold_reward_sampled", "win_rate_vs_start_greedy",
                                                      "win_rate_vs_start_sampled", "proxy_accuracy_vs_gold",
                                                      "proxy_reward_sampled", "kl_to_start")}}

    agg = aggregate({"random": {0: run(1.0, 1.3, 1.1, 1.1, 1.2), 1: run(1.0, 1.3, 1.1, 1.1, 1.2)},
                     "extremes": {0: run(1.0, 1.3, 1.25, 1.4, 1.4), 1: run(1.0, 1.3, 1.15, 1.4, 1.4)}})
    assert agg["extremes"][2]["gold_reward_greedy"] == pytest.approx(1.2) and agg["random"][4]["seeds"] == 2
    sd = 0.1 / math.sqrt(2)  # of 1.25 and 1.15
    assert agg["extremes"][2]["gold_reward_greedy_ci95"] == pytest.approx(12.706 * sd / math.sqrt(2))
    v = verdict(agg, first_selected=2)  # round 1 (48 labels) was random for both: it does not count
    assert v["selections"]["extremes"]["labels_to_reach"] == 96 and v["answer"].startswith("yes")
    assert verdict(agg, first_selected=1)["selections"]["extremes"]["labels_to_reach"] == 48


def test_labels_bench_runs_a_loop_again_after_cuda_out_of_memory(tmp_path):
    """A run that dies of CUDA OOM (a crowded GPU) runs again once, with fewer runs at a time; other failures not."""
    import sys

    from align.bench.labels import BenchArgs, launch

    script = ("import pathlib, sys; m = pathlib.Path(sys.argv[1]); first = not m.exists(); m.touch(); "
              "print('torch.OutOfMemoryError: CUDA out of memory' if first and 'oom' in m.name else 'ok'); "
              "sys.exit(1 if first else 0)")
    jobs = [(name, [sys.executable, "-c", script, str(tmp_path / f"{name}.mark")]) for name in ("oom", "bug")]
    state = launch(jobs, BenchArgs(parallel=2, cores=2), tmp_path, 0.0)
    assert state == {"oom": "done", "bug": "failed (1)"}
    assert (tmp_path / "oom.log").read_text().count("\n") == 2  # the failed run's line and the retry's
