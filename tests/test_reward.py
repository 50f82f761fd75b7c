"""align.reward: the Bradley-Terry loss, LoRA score heads, bad pairs, the world evaluation (tiny models, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from trl import ModelConfig, RewardConfig, RewardTrainer

from align.config import parse
from align.data.prompts import split_of
from align.models import _weight_keys, load, load_reward_model
from align.reward import CONFIG_TYPES, RewardArguments, head_kwargs, train
from align.reward_eval import margin_metrics, world_heldout_pairs
from align.score import RewardScorer

torch.set_num_threads(1)
CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "reward.yaml")


def build_assets(root: Path) -> tuple[Path, Path]:
    """(tokenizer dir, tiny causal-LM dir standing in for an SFT final/), built once per session."""
    from align.model import DecoderConfig, DecoderForCausalLM
    from align.tokenizer import TokenizerArguments, train_tokenizer

    tok_dir, lm_dir = root / "tok", root / "lm"
    if not (lm_dir / "config.json").exists():
        tok = train_tokenizer(TokenizerArguments(corpus="world", vocab_size=400, max_documents=1500,
                                                 output_dir=str(tok_dir)))
        torch.manual_seed(0)
        cfg = DecoderConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                            pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                            eos_token_id=tok.eos_token_id)
        DecoderForCausalLM(cfg).save_pretrained(str(lm_dir))
        tok.save_pretrained(str(lm_dir))
    return tok_dir, lm_dir


@pytest.fixture(scope="session")
def lm_dir(tmp_path_factory) -> Path:
    return build_assets(tmp_path_factory.getbasetemp() / "rm_assets")[1]


def run_args(lm_dir: Path, out: Path, **kw) -> tuple:
    argv = [CONFIG, "--model_name_or_path", str(lm_dir), "--output_dir", str(out),
            "--dataset_name", "world", "--eval_world_prompts", "40", "--logging_steps", "5",
            "--save_steps", "1000", "--dataloader_pin_memory", "false"]
    for k, v in kw.items():
        argv += [f"--{k}", json.dumps(v) if not isinstance(v, str) else v]
    return parse(CONFIG_TYPES, argv)


@pytest.fixture(scope="module")
def trained(lm_dir, tmp_path_factory):
    """A full fine-tune on 600 world pairs for 40 steps (a few seconds)."""
    out = tmp_path_factory.mktemp("rm_full")
    summary = train(*run_args(lm_dir, out, max_steps=40, max_train_pairs=600, learning_rate=3e-3,
                              per_device_train_batch_size=16, test_fraction=0.1, use_peft=False))
    return out, summary


# ------------------------------------------------------------------------------------------ loss


def test_loss_matches_independent_bradley_terry(lm_dir, tmp_path):
    """TRL's compute_loss on a batch == -logsigmoid(r_c - r_r - margin).mean() + c * mean((r_c + r_r)^2),
    with the rewards computed one sequence at a time."""
    from align.models import load_tokenizer

    tok = load_tokenizer(lm_dir)
    torch.manual_seed(0)
    model = load(str(lm_dir), "reward", **head_kwargs(str(lm_dir), tok))
    pairs = world_heldout_pairs(0, 4)[:6]
    margins = [0.0, 0.5, -0.3, 1.0, 0.2, 0.0]
    ds = Dataset.from_list([{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"], "margin": m}
                            for p, m in zip(pairs, margins)])
    c = 0.1
    args = RewardConfig(output_dir=str(tmp_path), per_device_train_batch_size=6, center_rewards_coefficient=c,
                        activation_checkpointing=False, bf16=False, report_to="none", dataloader_pin_memory=False)
    trainer = RewardTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(pairs))])  # pairs in order
    loss = trainer.compute_loss(trainer.model, dict(batch)).item()

    scorer = RewardScorer(model=trainer.model, tokenizer=tok, batch_size=1)  # one sequence at a time
    rc = torch.tensor(scorer.score([p["prompt"] for p in pairs], [p["chosen"] for p in pairs]))
    rr = torch.tensor(scorer.score([p["prompt"] for p in pairs], [p["rejected"] for p in pairs]))
    m = torch.tensor(margins)
    assert batch["margin"].tolist() == pytest.approx(margins)
    expected = -torch.nn.functional.logsigmoid(rc - rr - m).mean() + c * ((rc + rr) ** 2).mean()
    assert loss == pytest.approx(expected.item(), abs=1e-5)
    assert (rc - rr).abs().sum() > 0  # a real model, not a degenerate one


def test_prompt_hash_split_is_deterministic_and_by_prompt():
    prompts = [[{"role": "user", "content": f"q{i}"}] for i in range(2000)]
    a = [split_of(p, 0.1) for p in prompts]
    assert a == [split_of(p, 0.1) for p in prompts]
    assert 0.07 < a.count("test") / len(a) < 0.13
    assert split_of(prompts[0], 0.0) == "train"


def test_margin_metrics_and_calibration():
    m = margin_metrics([2.0, 1.0, -0.5, 0.1, 5.0])
    assert m["pairs"] == 5 and m["accuracy"] == pytest.approx(0.8)
    assert sum(b["pairs"] for b in m["accuracy_by_margin"]) == 5
    assert sum(b["pairs"] for b in m["calibration"]) == 5
    assert 0 <= m["ece"] <= 1


# ------------------------------------------------------------------------------------------ training


def test_rm_beats_chance_on_tiny_world_run(trained):
    out, summary = trained
    ev = summary.eval
    assert ev["data"]["train_pairs"] == 600 and ev["data"]["test_pairs"] > 100
    assert ev["accuracy"] > 0.6  # held-out split (chance 0.5)
    assert ev["accuracy_style"] > 0.8  # world held-out prompts; style is the easy half
    for key in ("accuracy", "accuracy_style", "accuracy_correctness", "mean_margin", "accuracy_by_margin",
                "calibration"):
        assert key in ev
    assert json.loads((out / "eval.json").read_text())["accuracy"] == ev["accuracy"]
    for f in ("calibration.png", "metrics.jsonl", "config.yaml", "final/config.json", "final/tokenizer.json"):
        assert (out / f).exists(), f
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(out / "final"))
    assert cfg.architectures == ["DecoderForSequenceClassification"] and cfg.num_labels == 1
    assert cfg.pad_token_id is not None


@pytest.mark.parametrize("score_loglik", [False, True])
def test_lora_rm_keeps_its_score_head(lm_dir, tmp_path, score_loglik):
    """The score head is trained and saved with the adapter (trl#1379): the in-memory model, the reloaded
    adapter and the merged final/ give the same rewards, and the head moved from its random init."""
    out = tmp_path / "rm_lora"
    summary = train(*run_args(lm_dir, out, max_steps=15, max_train_pairs=240, learning_rate=1e-2, use_peft=True,
                              lora_r=4, lora_alpha=8, per_device_train_batch_size=16, test_fraction=0.1,
                              eval_world=False, score_loglik=score_loglik))
    ev = summary.eval
    assert summary.data["trained_params"] < summary.data["params"]
    keys = _weight_keys(out / "adapter")
    assert any("score" in k for k in keys), keys  # the head is in the adapter

    from align.models import load_tokenizer
    from align.reward import clean_pairs, load_pairs

    args = run_args(lm_dir, out, test_fraction=0.1)[0]
    test = clean_pairs(load_pairs(args)[0]["test"], load_tokenizer(lm_dir), 128)[0]
    merged = RewardScorer(out / "final", device="cpu")
    reloaded = RewardScorer(out / "adapter", device="cpu")  # PEFT reload, merged on load
    prompts, chosen = [p["prompt"] for p in test], [p["chosen"] for p in test]
    rejected = [p["rejected"] for p in test]
    a = torch.tensor(merged.score(prompts, chosen)) - torch.tensor(merged.score(prompts, rejected))
    b = torch.tensor(reloaded.score(prompts, chosen)) - torch.tensor(reloaded.score(prompts, rejected))
    assert torch.allclose(a, b, atol=1e-5)
    assert a.mean().item() == pytest.approx(ev["mean_margin"], abs=1e-5)  # == the in-memory model before saving

    torch.manual_seed(0)  # train() seeds, then loads: the same random head
    head = head_kwargs(str(lm_dir), merged.tokenizer, score_loglik)
    init = load(str(lm_dir), "reward", **head).score
    assert not torch.allclose(init.weight, merged.model.score.weight.cpu())
    assert getattr(merged.model.config, "score_loglik", False) is score_loglik  # a Llama final/ has none
    if score_loglik:  # the learned scale of the likelihood term is saved with the adapter, merged and reloaded
        assert any("loglik_scale" in k for k in keys), keys
        scale = merged.model.score.loglik_scale.item()
        assert scale == pytest.approx(reloaded.model.score.loglik_scale.item()) and scale != init.loglik_scale.item()


def test_loglik_score_is_head_plus_scaled_response_loglik(lm_dir):
    """score_loglik: score = head(h_last) + scale * mean log p(response tokens), the log-probs being the causal
    LM's own (tied embeddings), the response what follows <|assistant|>; right- and left-padded batches agree."""
    from transformers import AutoModelForCausalLM

    from align.models import load_tokenizer
    from align.score import encode, score_ids

    tok = load_tokenizer(lm_dir)
    torch.manual_seed(0)
    rm = load(str(lm_dir), "reward", **head_kwargs(str(lm_dir), tok, True)).eval()
    with torch.no_grad():
        rm.score.loglik_scale.fill_(0.7)
    lm = AutoModelForCausalLM.from_pretrained(str(lm_dir)).eval()
    assert rm.config.response_token_id == tok.convert_tokens_to_ids("<|assistant|>")
    pairs = world_heldout_pairs(0, 3)
    seqs = [encode(tok, p["prompt"], p[side]) for p in pairs for side in ("chosen", "rejected")]
    expected = []
    with torch.no_grad():
        for ids in seqs:
            x = torch.tensor([ids])
            start = max(i for i, t in enumerate(ids) if t == rm.config.response_token_id) + 1
            logp = lm(x).logits[0, :-1].log_softmax(-1).gather(-1, x[0, 1:, None])[:, 0]
            head = rm.score.weight @ rm.model(x).last_hidden_state[0, -1]
            expected.append(head.item() + 0.7 * logp[start - 1:].mean().item())
    assert score_ids(rm, seqs, tok.pad_token_id, batch_size=4) == pytest.approx(expected, abs=1e-4)  # right-padded
    width = max(map(len, seqs))  # left padding: the same scores
    ids = torch.tensor([[tok.pad_token_id] * (width - len(s)) + s for s in seqs])
    mask = (torch.arange(width)[None] >= width - torch.tensor([len(s) for s in seqs])[:, None]).long()
    with torch.no_grad():
        left = rm(input_ids=ids, attention_mask=mask).logits[:, 0]
    assert left.tolist() == pytest.approx(expected, abs=1e-4)


def test_loglik_head_is_align_only_and_has_no_llama_form(lm_dir, tiny_llama_dir, caplog):
    from align.convert import to_llama
    from align.models import load_tokenizer

    with caplog.at_level("WARNING", logger="align.reward"):  # any HF model: the linear head, said in the log
        head = head_kwargs(tiny_llama_dir, load_tokenizer(tiny_llama_dir), True)
    llama = load(tiny_llama_dir, "reward", **head)
    assert type(llama).__name__ == "LlamaForSequenceClassification" and "align's decoder only" in caplog.text
    rm = load(str(lm_dir), "reward", **head_kwargs(str(lm_dir), load_tokenizer(lm_dir), True))
    with pytest.raises(ValueError, match="score_loglik"):
        to_llama(rm)


def test_bad_pairs_are_counted_and_dropped(lm_dir, tmp_path):
    good = [{"prompt": f"What is {i} + 1?", "chosen": f"The answer is {i + 1}.", "rejected": f"{i + 2}"}
            for i in range(8)]
    bad = [
        {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "4"},  # identical
        {"prompt": "What is 3 + 3?", "chosen": "The answer is 6.", "rejected": "  "},  # empty
        {"prompt": "Say a lot. " * 60, "chosen": "ok", "rejected": "no"},  # too long
    ]
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in good + bad))
    summary = train(*run_args(lm_dir, tmp_path / "rm", dataset_name=str(f), test_fraction=0.0, max_steps=2,
                              eval_world=False, per_device_train_batch_size=4))
    d = json.loads((tmp_path / "rm" / "eval.json").read_text())["data"]
    assert d["dropped_train"] == {"identical": 1, "empty_response": 1, "too_long": 1}
    assert d["train_pairs"] == 8 and summary.data == d
    assert "dropped, not truncated" in d["drop_rule"]


def test_store_source_and_option_convention(lm_dir, tmp_path):
    """The quickstart's call: config + --model_name_or_path --store_url --output_dir --seed, store export split."""
    from align.data.world import World
    from align.reward import main
    from align.store import Store

    url = f"sqlite:///{tmp_path / 'prefs.db'}"
    store = Store(url).init()
    store.import_pairs(World(0).preference_pairs()[:200], source="world", labeller="world-rule")
    store.close()
    summary = main([CONFIG, "--model_name_or_path", str(lm_dir), "--store_url", url,
                    "--output_dir", str(tmp_path / "rm"), "--seed", "0", "--max_steps", "2",
                    "--eval_world_prompts", "10", "--dataloader_pin_memory", "false"])
    ev = summary.eval
    assert {"accuracy", "accuracy_style", "accuracy_correctness"} <= set(ev)
    assert ev["data"]["source"] == "store" and ev["data"]["store_report"]["exported_pairs"] == 200
    assert ev["data"]["train_pairs"] + ev["data"]["test_pairs"] == 200 and ev["data"]["test_pairs"] > 0


def test_missing_store_and_no_model_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="store_url: no database .* --dataset_name world"):
        from align.reward import load_pairs

        load_pairs(RewardArguments(store_url=f"sqlite:///{tmp_path}/nope.db"))
    with pytest.raises(FileNotFoundError, match="model_name_or_path: no model given"):
        train(RewardArguments(), ModelConfig(), RewardConfig(output_dir=str(tmp_path), bf16=False))
    assert not list(tmp_path.iterdir())  # nothing written, no empty database left behind


def test_world_heldout_pairs_are_built_from_heldout_prompts():
    from align.data.world import World, check, example_from_dict  # noqa: F401

    pairs = world_heldout_pairs(0, 20)
    heldout = {e.prompt: e for e in World(0).eval_prompts(20)}
    assert len(pairs) == 40 and {p["kind"] for p in pairs} == {"style", "correctness"}
    for p in pairs:
        ex = heldout[p["prompt"][0]["content"]]
        c, r = check(ex, p["chosen"][0]["content"]), check(ex, p["rejected"][0]["content"])
        if p["kind"] == "style":
            assert c["preferred"] and r["correct"] and not r["preferred"]
        else:
            assert c["correct"] and not r["correct"] and c["style"] == r["style"]


def test_loaded_scorer_matches_training_eval(trained):
    out, summary = trained
    rm, tok = load_reward_model(out / "final", device="cpu")
    from align.reward_eval import evaluate_world

    w = evaluate_world(rm, tok, 0, 40)
    assert w["accuracy"] == pytest.approx(summary.eval["accuracy_world"])
