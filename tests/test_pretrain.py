"""Pretraining: packing with eos separators, loss that ignores padding, a falling loss, resume after kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from align.data.world import World
from align.pretrain import pack


def test_pack_separates_documents_with_eos_and_masks_padding():
    blocks = pack([[5, 6, 7], [8, 9]], block_size=4, eos_id=1, pad_id=0)
    assert [b["input_ids"] for b in blocks] == [[5, 6, 7, 1], [8, 9, 1, 0]]
    assert blocks[1]["attention_mask"] == [1, 1, 1, 0]
    assert blocks[1]["labels"] == [8, 9, 1, -100]


def test_loss_ignores_padding(tiny_lm_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    ids = torch.tensor([[11, 12, 13, 14, 15]])
    padded = pack([[11, 12, 13, 14]], block_size=8, eos_id=15, pad_id=0)[0]
    with torch.no_grad():
        ref = model(input_ids=ids, labels=ids).loss
        out = model(**{k: torch.tensor([v]) for k, v in padded.items()}).loss
    torch.testing.assert_close(out, ref)


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    docs = World(seed=0).pretrain_corpus()[:300]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return str(path)


def _argv(tokenizer_dir: str, corpus: str, out: Path, **over) -> list[str]:
    args = {
        "tokenizer_name_or_path": tokenizer_dir, "dataset_name": corpus, "output_dir": str(out),
        "block_size": 64, "max_steps": 30, "per_device_train_batch_size": 8, "learning_rate": 3e-3,
        "logging_steps": 5, "save_steps": 10, "report_to": "none", "seed": 0, "eval_fraction": 0.05,
        "model_config": '{"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, '
        '"num_attention_heads": 4, "num_key_value_heads": 2}',
        "dataloader_num_workers": 0, "use_cpu": True,
    }
    args.update(over)
    argv = []
    for k, v in args.items():
        argv += [f"--{k}", str(v).lower() if isinstance(v, bool) else str(v)]
    return argv


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_pretraining_loss_falls_and_run_dir_is_complete(tokenizer_dir, corpus_file, tmp_path):
    from align.pretrain import main

    out = tmp_path / "run"
    summary = main(_argv(tokenizer_dir, corpus_file, out))
    losses = _losses(out)
    assert losses[max(losses)] < losses[min(losses)] - 1.0, losses
    assert summary["eval_loss"] < 6.0
    for name in ("config.yaml", "metrics.jsonl", "metrics.png", "summary.json", "final/config.json"):
        assert (out / name).exists(), name
    assert (out / "checkpoint-30").is_dir()
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(str(out / "final")).config.model_type == "llama"  # dense: Llama format


def test_resume_after_kill_reaches_the_same_loss(tokenizer_dir, corpus_file, tmp_path):
    """kill -9 mid-run, re-run the same command: it resumes and ends where an uninterrupted run ends."""
    from align.pretrain import main

    ref = tmp_path / "uninterrupted"
    main(_argv(tokenizer_dir, corpus_file, ref))

    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "align.pretrain", *_argv(tokenizer_dir, corpus_file, out)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not (out / "checkpoint-10" / "trainer_state.json").exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    time.sleep(0.5)  # let the checkpoint's last files land
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "final").exists(), "killed too late to test resuming"

    # a checkpoint cut short by a kill while saving is skipped, not loaded
    (out / "checkpoint-999").mkdir()
    main(_argv(tokenizer_dir, corpus_file, out))
    a, b = _losses(ref), _losses(out)
    assert max(b) == 30
    assert b[30] == pytest.approx(a[30], rel=1e-4)
