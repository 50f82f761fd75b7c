"""Soft labels from the store's annotator-aware export: the soft Bradley-Terry loss of the reward model and of DPO
(tiny models, CPU)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from test_reward import build_assets, run_args
from tokenizers import pre_tokenizers, trainers
from trl import DPOTrainer, RewardConfig, RewardTrainer

from align.models import load, load_tokenizer
from align.reward import clean_pairs, head_kwargs, train
from align.reward_eval import world_heldout_pairs
from align.score import RewardScorer
from align.soft_labels import SoftLabelDPOTrainer, SoftLabelRewardTrainer

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


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


# --------------------------------------------------------------------------------------------------
# DPO on soft labels: per-pair label smoothing ε = 1 − p on the implicit reward margin


@pytest.fixture(scope="module")
def dpo_assets(tmp_path_factory):
    """(world, tokenizer, tiny policy dir): as tests/test_dpo.py's fixtures, smaller."""
    from align.data.chat import SPECIAL_TOKENS, render_chat
    from align.data.world import World
    from align.model import DecoderConfig, DecoderForCausalLM
    from align.tokenizer import build_tokenizer_object, wrap

    world = World(seed=0, n_pretrain=100, n_sft=100, n_preference=24, n_heldout=10)
    tok = build_tokenizer_object()
    texts = [render_chat(c["messages"]) for c in world.sft_conversations()] + world.pretrain_corpus()
    tok.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=320, min_frequency=2, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer = wrap(tok)
    ids = {k: tokenizer.convert_tokens_to_ids(t) for k, t in
           (("bos_token_id", "<|bos|>"), ("eos_token_id", "<|eos|>"), ("pad_token_id", "<|pad|>"))}
    d = tmp_path_factory.mktemp("dpo_policy")
    torch.manual_seed(0)
    DecoderForCausalLM(DecoderConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                     max_position_embeddings=256, **ids)).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return world, tokenizer, d


def _dpo_args(tmp_path, model_dir, **overrides):
    from align import dpo
    from align.config import parse
    from align.preference_trainers import trainer_args

    argv = ["--model_name_or_path", str(model_dir), "--output_dir", str(tmp_path / "run"), "--use_peft", "false",
            "--max_steps", "2", "--per_device_train_batch_size", "4", "--learning_rate", "1e-3",
            "--max_length", "96", "--activation_checkpointing", "false", "--report_to", "none",
            "--test_fraction", "0.0", "--eval_num_prompts", "0", "--win_rate_num_prompts", "0",
            "--dataloader_pin_memory", "false", "--disable_tqdm", "true"]
    for k, v in overrides.items():
        argv += [f"--{k}", v if isinstance(v, str) else json.dumps(v)]
    args, model_args, targs = parse(dpo.CONFIG_TYPES, argv)
    return args, model_args, trainer_args(args, targs)


def _dpo_loss(cls, dpo_assets, tmp_path, rows, **overrides) -> float:
    """The loss of a ``cls`` trainer on ``rows`` as one batch; the policy is the start's weights nudged by a fixed
    noise, the reference the start (so the implicit rewards are not all 0)."""
    from align.preference_trainers import build_trainer

    _, tokenizer, model_dir = dpo_assets
    args, model_args, targs = _dpo_args(tmp_path, model_dir, **overrides)
    if cls is None:  # as align.dpo builds it
        tr = build_trainer(args, model_args, targs, load(str(model_dir)), tokenizer, {"train": rows, "test": []})
    else:
        tr = cls(model=load(str(model_dir)), args=targs, train_dataset=Dataset.from_list(rows),
                 processing_class=tokenizer)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for prm in tr.model.parameters():
            prm.add_(0.2 * torch.randn(prm.shape, generator=g))
    tr.model.eval()
    batch = tr.data_collator([tr.train_dataset[i] for i in range(len(rows))])
    assert ("p_chosen" in batch) == ("p_chosen" in rows[0])
    with torch.no_grad():
        return tr.compute_loss(tr.model, dict(batch)).item()


def _swap(r: dict) -> dict:
    return {"prompt": r["prompt"], "chosen": r["rejected"], "rejected": r["chosen"]}


def test_soft_dpo_is_trl_label_smoothing_per_pair(dpo_assets, tmp_path):
    world, *_ = dpo_assets
    pairs = world.preference_pairs()[:4]
    eps = 0.2
    # (a) p = 1 − ε, w = 1 on one pair: TRL's own label-smoothed logistic loss on the same margin. In TRL 1.16
    # 'sigmoid' ignores label_smoothing; 'aot_unpaired' is −(1−ε)·logσ(βΔ) − ε·logσ(−βΔ) after sorting the
    # batch's chosen and rejected log-ratios apart, which on a batch of one pair changes nothing.
    for r in pairs[:2]:
        soft = _dpo_loss(None, dpo_assets, tmp_path, [{**r, "p_chosen": 1 - eps, "weight": 1.0}])
        ref = _dpo_loss(DPOTrainer, dpo_assets, tmp_path, [r], loss_type=["aot_unpaired"], label_smoothing=eps)
        hard = _dpo_loss(DPOTrainer, dpo_assets, tmp_path, [r])
        assert abs(soft - hard) > 1e-3  # the smoothing matters here
        assert soft == pytest.approx(ref, rel=1e-5)
    # per-pair p and weights on a batch: the loss is linear in p, so it is
    # Σ w·[p·TRL(pair) + (1−p)·TRL(swapped pair)] / Σ w, TRL's sigmoid loss taken one pair at a time
    p, w = [0.9, 0.6, 0.3, 1.0], [0.8, 0.2, 0.4, 1.0]
    rows = [{**r, "p_chosen": pi, "weight": wi} for r, pi, wi in zip(pairs, p, w)]
    soft = _dpo_loss(None, dpo_assets, tmp_path, rows)
    one = [_dpo_loss(DPOTrainer, dpo_assets, tmp_path, [r]) for r in pairs]
    swapped = [_dpo_loss(DPOTrainer, dpo_assets, tmp_path, [_swap(r)]) for r in pairs]
    expected = sum(wi * (pi * a + (1 - pi) * b) for wi, pi, a, b in zip(w, p, one, swapped)) / sum(w)
    assert soft == pytest.approx(expected, rel=1e-4)


def test_soft_dpo_without_soft_columns_is_trl(dpo_assets, tmp_path):
    world, *_ = dpo_assets
    pairs = world.preference_pairs()[:4]
    for loss_type in (["sigmoid"], ["sigmoid", "sft"], ["ipo"]):
        ours = _dpo_loss(SoftLabelDPOTrainer, dpo_assets, tmp_path, pairs, loss_type=loss_type)
        trl = _dpo_loss(DPOTrainer, dpo_assets, tmp_path, pairs, loss_type=loss_type)
        assert ours == trl, loss_type


def test_soft_dpo_sft_term_and_unsupported_losses(dpo_assets, tmp_path):
    world, *_ = dpo_assets
    pairs = world.preference_pairs()[:3]
    rows = [{**r, "p_chosen": 0.8, "weight": 1.0} for r in pairs]
    # sigmoid + sft with weights: the soft term plus TRL's SFT term (p = 1: the soft term is TRL's sigmoid)
    mixed = _dpo_loss(None, dpo_assets, tmp_path, [{**r, "p_chosen": 1.0} for r in rows],
                      loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])
    trl = _dpo_loss(DPOTrainer, dpo_assets, tmp_path, pairs, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])
    assert mixed == pytest.approx(trl, rel=1e-5)
    with pytest.raises(ValueError, match=r"loss_type \['ipo'\]"):
        _dpo_loss(None, dpo_assets, tmp_path, rows, loss_type=["ipo"])


def test_dpo_trains_on_a_soft_label_export(dpo_assets, tmp_path, monkeypatch):
    """The store's annotator-aware export (`python -m align.store export --aggregate reliability --soft`) of a
    careful, a good and a random annotator, then `align.dpo.train` on the file, 2 steps."""
    import random

    from align import dpo
    from align.config import configure
    from align.store import Store
    from align.store.__main__ import main as store_main

    world, _, model_dir = dpo_assets
    url = f"sqlite:///{tmp_path / 'prefs.db'}"
    store = Store(url).init()
    store.import_pairs(world.preference_pairs(), source="world", labeller="careful")
    rng = random.Random(0)
    for name in ("good", "random"):  # right 80% of the time; a coin
        store.ensure_annotator(name, kind="rule")
        for lab in store.labels(annotator="careful"):
            flip = rng.random() < (0.2 if name == "good" else 0.5)
            store.submit_label(lab.comparison_id, name, {"a": "b", "b": "a"}[lab.choice] if flip else lab.choice)
    store.close()
    f = tmp_path / "soft.jsonl"
    assert store_main(["export", str(f), "--db", url, "--aggregate", "reliability", "--soft"]) in (0, None)
    rows = [json.loads(x) for x in f.read_text().splitlines()]
    assert {"p_chosen", "weight"} <= set(rows[0]) and len({r["p_chosen"] for r in rows}) > 1

    out = tmp_path / "dpo"
    args = configure(  # configs/dpo.yaml's loss: sigmoid + an SFT term
        dpo.CONFIG_TYPES, ROOT / "configs/dpo.yaml", dataset_name=str(f), model_name_or_path=str(model_dir),
        output_dir=str(out), reward_model_path="", max_steps=2, per_device_train_batch_size=4, logging_steps=1,
        max_length=96, test_fraction=0.0, eval_num_prompts=0, win_rate_num_prompts=0, save_strategy="no",
        dataloader_pin_memory=False, disable_tqdm=True)
    soft_batches = []
    check = SoftLabelDPOTrainer.check_soft
    monkeypatch.setattr(SoftLabelDPOTrainer, "check_soft", lambda self: soft_batches.append(1) or check(self))
    result = dpo.train(*args)
    assert result.steps == 2 and len(soft_batches) == 2 and (out / "final" / "config.json").exists()
    assert result.data["train_rows"] == len(rows)
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(losses) >= 2 and all(math.isfinite(v) for v in losses)


def test_preference_file_keeps_soft_columns_and_names_bad_ones(tmp_path):
    from align.data.formats import DataError
    from align.preferences import read_preference_file, soft_label_columns

    row = {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."}
    f = tmp_path / "soft.jsonl"
    f.write_text(json.dumps({**row, "p_chosen": 0.75, "weight": 0.5}) + "\n" + json.dumps(row) + "\n")
    got = read_preference_file(str(f), extra=soft_label_columns)
    assert (got[0]["p_chosen"], got[0]["weight"]) == (0.75, 0.5) and "p_chosen" not in got[1]
    f.write_text(json.dumps(row) + "\n" + json.dumps({**row, "p_chosen": 1.5}) + "\n")
    with pytest.raises(DataError, match=r"soft.jsonl.*2.*'p_chosen' is 1.5, outside \[0, 1\]"):
        read_preference_file(str(f), extra=soft_label_columns)
