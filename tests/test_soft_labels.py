"""Soft labels from the store's annotator-aware export: the reward model's soft Bradley-Terry loss (tiny model, CPU)."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset
from test_reward import build_assets, run_args
from trl import RewardConfig, RewardTrainer

from align.models import load, load_tokenizer
from align.reward import clean_pairs, head_kwargs, train
from align.reward_eval import world_heldout_pairs
from align.score import RewardScorer
from align.soft_labels import SoftLabelRewardTrainer

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    return build_assets(tmp_path_factory.getbasetemp() / "rm_assets")[1]


def _trainer(cls, lm_dir, tmp_path, rows):
    tok = load_tokenizer(lm_dir)
    torch.manual_seed(0)
    model = load(str(lm_dir), "reward", **head_kwargs(str(lm_dir), tok))
    args = RewardConfig(output_dir=str(tmp_path), per_device_train_batch_size=len(rows),
                        center_rewards_coefficient=None, activation_checkpointing=False, bf16=False,
                        report_to="none", dataloader_pin_memory=False)
    kept, _ = clean_pairs(rows, tok, None)
    cols = [k for k in ("chosen_ids", "rejected_ids", "p_chosen", "weight") if k in kept[0]]
    tr = cls(model=model, args=args, train_dataset=Dataset.from_list([{k: p[k] for k in cols} for p in kept]),
             processing_class=tok)
    batch = tr.data_collator([tr.train_dataset[i] for i in range(len(kept))])
    return tr, tok, batch


def test_soft_loss_matches_the_formula_and_reduces_to_trl(lm_dir, tmp_path):
    pairs = world_heldout_pairs(0, 3)[:6]
    p, w = [1.0, 0.9, 0.6, 0.75, 1.0, 0.55], [1.0, 0.8, 0.2, 0.5, 1.0, 0.1]
    rows = [{**x, "p_chosen": pi, "weight": wi} for x, pi, wi in zip(pairs, p, w)]
    tr, tok, batch = _trainer(SoftLabelRewardTrainer, lm_dir, tmp_path, rows)
    assert batch["p_chosen"].tolist() == pytest.approx(p) and batch["weight"].tolist() == pytest.approx(w)
    loss = tr.compute_loss(tr.model, dict(batch)).item()
    scorer = RewardScorer(model=tr.model, tokenizer=tok, batch_size=1)  # one sequence at a time
    d = (torch.tensor(scorer.score([x["prompt"] for x in pairs], [x["chosen"] for x in pairs]))
         - torch.tensor(scorer.score([x["prompt"] for x in pairs], [x["rejected"] for x in pairs])))
    pt, wt = torch.tensor(p), torch.tensor(w)
    ls = torch.nn.functional.logsigmoid
    expected = (wt * -(pt * ls(d) + (1 - pt) * ls(-d))).sum() / wt.sum()
    assert d.abs().sum() > 0 and loss == pytest.approx(expected.item(), abs=1e-5)
    # hard labels (no p_chosen): exactly TRL's loss
    hard, _, hb = _trainer(SoftLabelRewardTrainer, lm_dir, tmp_path, pairs)
    trl, _, tb = _trainer(RewardTrainer, lm_dir, tmp_path, pairs)
    assert "p_chosen" not in hb
    assert hard.compute_loss(hard.model, dict(hb)).item() == pytest.approx(trl.compute_loss(trl.model, dict(tb)).item(),
                                                                           rel=1e-5, abs=1e-6)


def test_reward_trains_on_a_soft_label_export(lm_dir, tmp_path):
    from align.data.world import World

    rows = [{"prompt": x["prompt"], "chosen": x["chosen"], "rejected": x["rejected"], "p_chosen": 0.9, "weight": 0.8}
            for x in World(0).preference_pairs()[:200]]
    f = tmp_path / "soft.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "rm"
    summary = train(*run_args(lm_dir, out, dataset_name=str(f), max_steps=6, per_device_train_batch_size=16,
                              use_peft=False, test_fraction=0.0, eval_world_prompts=10))
    assert summary.data["train_pairs"] == 200 and (out / "final").exists()
    losses = [json.loads(x).get("loss") for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(v is not None for v in losses)
