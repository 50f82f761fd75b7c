"""align.bench's GPU benches at tiny sizes on CPU: they run end to end and measure what they say."""

from __future__ import annotations

import json
import math

import pytest
import torch

from align.bench import generate as gen_bench
from align.bench import model as model_bench
from align.bench import train as train_bench


def test_generate_bench_rows_and_greedy_match(tmp_path):
    out = tmp_path / "gen.jsonl"
    rows = gen_bench.run(size="small", batches=(1, 3), prompt_len=8, new_tokens=6, repeats=1, json_path=str(out))
    methods = ("hf", "ours", "ours-on-llama")
    assert {(r["batch"], r["method"]) for r in rows} == {(b, m) for b in (1, 3) for m in methods}
    assert len(out.read_text().splitlines()) == len(rows)
    for r in rows:
        assert r["tokens_per_s"] > 0 and math.isclose(r["ms_per_step"], 1e3 * r["batch"] / r["tokens_per_s"])
        assert r["match_hf"] == 1.0, r  # fp32 on CPU: the fast loop's greedy tokens are HF's


def test_peak_flops_is_looked_up_by_device_name(monkeypatch):
    assert model_bench.peak_flops("cpu") is None
    for name, peak in [("NVIDIA H200", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA A100-SXM4-80GB", 312e12),
                       ("Some Future GPU", None)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None, n=name: n)
        assert model_bench.peak_flops("cuda") == peak


def test_train_flops_per_token_counts_matmul_parameters():
    from align.model import DecoderConfig, DecoderForCausalLM

    config = DecoderConfig(**model_bench.SIZES["small"])
    model = DecoderForCausalLM(config)
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))  # incl. lm head
    assert model_bench.train_flops_per_token(config, seq=0) == 6 * matmul


def test_sft_bench_packing_trains_more_real_tokens_per_step():
    rows = train_bench.run("sft", size="small", batch=2, max_length=256, steps=3, warmup=1, variants=["trl", "align"])
    trl, ours = rows
    assert trl["variant"] == "trl" and trl["vs_trl"] == 1.0
    # packed rows carry several examples: more real tokens in the same (batch, max_length)
    assert ours["tokens_per_step"] > 1.3 * trl["tokens_per_step"], (ours, trl)
    assert all(math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in rows)
    # --align_batch: fewer packed rows for align (equal tokens a step), TRL keeps its batch
    trl1, ours1 = train_bench.run("sft", size="small", batch=2, max_length=256, steps=3, warmup=1,
                                  variants=["trl", "align"], align_batch=1)
    assert (trl1["batch"], ours1["batch"]) == (2, 1) and trl1["tokens_per_step"] == trl["tokens_per_step"]
    assert ours1["tokens_per_step"] < 0.7 * ours["tokens_per_step"], (ours1, ours)


def test_dpo_bench_precomputes_reference_for_align_only():
    rows = train_bench.run("dpo", size="small", batch=2, max_length=48, steps=3, warmup=1, variants=["trl", "align"])
    trl, ours = rows
    assert trl["pre_pass_s"] == 0 and ours["pre_pass_s"] > 0
    assert trl["tokens_per_step"] == ours["tokens_per_step"]  # the same pairs, unpacked
    for r in rows:  # policy == reference at step 0: the DPO loss starts at log 2
        assert r["loss"] == pytest.approx(math.log(2), abs=0.05)


def test_word_tokenizer_round_trips_ids():
    tok = train_bench.word_tokenizer(100)
    assert tok("w5 w99 w3", add_special_tokens=False)["input_ids"] == [5, 99, 3]
    assert (tok.pad_token_id, tok.eos_token_id) == (0, 1)


def test_grpo_bench_routes_align_generation_through_the_fast_loop(monkeypatch):
    import align.fastgen as F

    calls = []
    real = F.fast_generate
    monkeypatch.setattr(F, "fast_generate", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    from align.bench import grpo

    rows = grpo.run(size="small", n_prompts=2, num_generations=2, max_completion_length=6, steps=2, warmup=1,
                    variants=("trl", "align", "align-nogc"))
    assert [r["variant"] for r in rows] == ["trl", "align", "align-nogc"]
    assert all(0 < r["gen_s"] < r["step_s"] and r["completions_per_s"] > 0 for r in rows)
    assert len(calls) == 4 and all(kw["do_sample"] and kw["max_new_tokens"] == 6 for kw in calls)  # one per step
    rows = grpo.run(size="small", n_prompts=2, num_generations=2, max_completion_length=6, steps=2, warmup=1,
                    variants=("align",), lora=True)
    assert rows[0]["lora"] and len(calls) == 6  # LoRA's rollouts take the fast loop too


def test_generate_like_hf_keeps_the_generate_contract(tiny_lm_dir):
    from transformers import AutoModelForCausalLM, GenerationConfig

    from align.fastgen import use_fast_generate

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    gc = GenerationConfig(max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    plain = model.generate(input_ids=ids, attention_mask=mask, generation_config=gc)
    stop = GenerationConfig(max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=[int(plain[1, 9])])
    plain_stop = model.generate(input_ids=ids, attention_mask=mask, generation_config=stop)
    assert use_fast_generate(model) and model.generate._align_fast
    assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, generation_config=gc), plain)
    assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, generation_config=stop), plain_stop)


def test_plot_writes_a_png_and_rejects_files_without_generate_rows(tmp_path):
    from align.bench import plot

    data = tmp_path / "g.jsonl"
    for plen in (4, 8):
        gen_bench.run(size="small", batches=(1, 2), prompt_len=plen, new_tokens=2, repeats=1, json_path=str(data),
                      only=["ours"])
    out = tmp_path / "g.png"
    assert plot.main(["--files", str(data), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    empty = tmp_path / "e.jsonl"
    empty.write_text('{"bench": "sft"}\n')
    assert plot.main(["--files", str(empty), "--out", str(out)]) == 2


def test_model_bench_json_draws_throughput_against_batch_and_sequence_length(tmp_path, capsys):
    from align.bench import plot

    data = tmp_path / "train.jsonl"
    for batch, seq in ((2, 16), (4, 16), (2, 32)):
        argv = ["--steps", "1", "--repeats", "1", "--batch", str(batch), "--seq", str(seq), "--new_tokens", "2"]
        assert model_bench.main([*argv, "--json", str(data)]) == 0
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    assert [(r["model"], r["batch"], r["seq"]) for r in rows[:2]] == [("ours", 2, 16), ("hf", 2, 16)]
    assert len(rows) == 6 and all(r["train_tokens_per_s"] > 0 and r["compile"] is False for r in rows)
    out = tmp_path / "train.png"
    assert plot.main(["--bench", "model", "--files", str(data), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot.main(["--files", str(data), "--out", str(out)]) == 2  # no generate rows there
    # the rows name the attention the step reached: align_fa4 sends steps under MIN_TOKENS tokens to SDPA
    from align.model import flash

    assert model_bench.training_attention("align_fa4", flash.MIN_TOKENS) == "align_fa4"
    assert "sdpa" in model_bench.training_attention("align_fa4", flash.MIN_TOKENS - 1)
    assert model_bench.training_attention("sdpa", 1) == "sdpa"


def test_score_bench_scores_as_the_per_example_loop(capsys):
    from align.bench import score

    assert score.main(["--n", "16", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "RewardScorer (batch 64)" in out
    assert float(out.rsplit("max |reward difference| ", 1)[1].split()[0]) < 1e-4


def test_annotator_aware_labels_beat_majority_vote_with_careless_annotators(capsys):
    """bench annotators: 5 careful, 3 random and 2 length-biased simulated annotators on world pairs."""
    import re

    from align.bench import annotators

    assert annotators.main(["--pairs", "120", "--gold", "10", "--seed", "0"]) == 0
    out = capsys.readouterr().out
    acc = {m: float(a) for m, a in re.findall(r"^(majority|reliability): \d+ pairs exported, label accuracy ([\d.]+)",
                                              out, re.M)}
    assert acc["reliability"] > acc["majority"], out


def test_app_bench_loses_no_label(capsys):
    """bench app, flat out with two annotators against a real server: every acknowledged label is stored."""
    from align.bench import app as app_bench

    assert app_bench.main(["--annotators", "2", "--labels", "3", "--phases", "flat"]) == 0
    assert "lost 0" in capsys.readouterr().out


def test_store_bench_writes_as_processes_raw_and_threads(capsys):
    """bench store --writes_only --threads: the store's writer processes, raw sqlite3 and batched threads."""
    from align.bench import store as store_bench

    argv = ["--writers", "1", "3", "--labels", "12", "--writes_only", "--threads", "--pg_url", ""]
    assert store_bench.main(argv) == 0
    out = capsys.readouterr().out
    for what in ("label write (Store.submit_label), processes: 3", "raw sqlite3 (reference), processes: 3",
                 "label write, threads of one process (batch_labels): 3"):
        assert f"| sqlite | {what} writer(s) | p50 " in out, out
    assert "(12 labels)" in out
