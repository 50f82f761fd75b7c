"""align.dpo: TRL DPO (every loss), KTO, SimPO/CPO, ORPO with LoRA on tiny models, CPU, seconds each."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from tokenizers import pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, TrainerCallback
from trl import KTOConfig

from align import dpo
from align import preference_trainers as PT
from align import preferences as P
from align.config import parse
from align.data.chat import SPECIAL_TOKENS, render_chat
from align.data.formats import DataError
from align.data.world import World
from align.judge import win_rate
from align.model import DecoderConfig, DecoderForCausalLM, DecoderForSequenceClassification
from align.models import load
from align.tokenizer import build_tokenizer_object, wrap

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
SYSTEM = "You are a helpful assistant."


# --------------------------------------------------------------------------------------------------
# Fixtures: a tokenizer trained on a small world corpus, a tiny policy (ours and Llama), a tiny RM,
# a preference file with system messages, a store holding the same pairs.


@pytest.fixture(scope="session")
def world():
    return World(seed=0, n_pretrain=150, n_sft=200, n_preference=48, n_heldout=20)


@pytest.fixture(scope="session")
def tok_tree(world):
    texts = [render_chat(c["messages"]) for c in world.sft_conversations()] + world.pretrain_corpus()
    tok = build_tokenizer_object()
    tok.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=320, min_frequency=2, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return tok


@pytest.fixture(scope="session")
def tokenizer(tok_tree):
    return wrap(tok_tree)


def _ids(tokenizer):
    return {k: tokenizer.convert_tokens_to_ids(t) for k, t in
            (("bos_token_id", "<|bos|>"), ("eos_token_id", "<|eos|>"), ("pad_token_id", "<|pad|>"))}


def _tiny(tokenizer, **kw) -> dict:
    return dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **_ids(tokenizer), **kw)


@pytest.fixture(scope="session")
def policy_dir(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("policy")
    torch.manual_seed(0)
    DecoderForCausalLM(DecoderConfig(**_tiny(tokenizer))).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**_tiny(tokenizer))).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def rm_dir(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("rm")
    torch.manual_seed(1)
    DecoderForSequenceClassification(DecoderConfig(**_tiny(tokenizer), num_labels=1)).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def pairs(world):
    """The world's pairs, every third with a system message."""
    out = []
    for i, p in enumerate(world.preference_pairs()):
        prompt = p["prompt"] if i % 3 else [{"role": "system", "content": SYSTEM}, *p["prompt"]]
        out.append({"prompt": prompt, "chosen": p["chosen"], "rejected": p["rejected"]})
    return out


@pytest.fixture(scope="session")
def pairs_file(tmp_path_factory, pairs):
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return path


@pytest.fixture(scope="session")
def store_url(tmp_path_factory, pairs):
    from align.store import Store

    url = f"sqlite:///{tmp_path_factory.mktemp('store') / 'prefs.db'}"
    store = Store(url).init()
    store.import_pairs(pairs, source="test", labeller="rule")
    store.close()
    return url


def _configs(tmp_path, model_dir, *, trainer="dpo", steps=2, **overrides):
    """Parsed (DPOArguments, ModelConfig, trainer config) for a short CPU run."""
    argv = [
        "--trainer", trainer, "--model_name_or_path", str(model_dir), "--output_dir", str(tmp_path / "run"),
        "--use_peft", "true", "--lora_target_modules", "all-linear", "--lora_r", "8", "--lora_alpha", "16",
        "--lora_dropout", "0.0", "--max_steps", str(steps), "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "8", "--learning_rate", "1e-3", "--logging_steps", "1",
        "--save_strategy", "'no'", "--max_length", "96", "--activation_checkpointing", "false", "--report_to", "none",
        "--test_fraction", "0.25", "--eval_num_prompts", "0", "--win_rate_num_prompts", "0",
        "--dataloader_pin_memory", "false", "--disable_tqdm", "true",
    ]
    for k, v in overrides.items():
        argv += [f"--{k}", v if isinstance(v, str) else json.dumps(v)]
    parsed = parse(dpo.config_types(trainer), argv)
    args, model_args = parsed[0], parsed[1]
    return args, model_args, PT.trainer_args(args, *parsed[2:])


def _trainer(tmp_path, model_dir, tokenizer, rows=None, callbacks=None, **kw):
    args, model_args, targs = _configs(tmp_path, model_dir, **kw)
    if rows is None:
        splits, _ = dpo.load_preference_rows(args)
    else:
        splits = P.split_rows(rows, args.test_fraction)
        if args.trainer == "kto":
            splits = {k: P.to_unpaired(v) for k, v in splits.items()}
    model = load(str(model_dir))
    return PT.build_trainer(args, model_args, targs, model, tokenizer, splits, callbacks)


# --------------------------------------------------------------------------------------------------
# Tokenisation: one BOS, the chat template applied once, no prompt inside chosen


def _adds_bos(tok_tree):
    """Our tokenizer, but one that (like Llama's) adds BOS on every plain encode."""
    t = wrap(tok_tree)
    t._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A $B", special_tokens=[("<|bos|>", t.convert_tokens_to_ids("<|bos|>"))])
    assert t("hi")["input_ids"][0] == t.convert_tokens_to_ids("<|bos|>")
    return t


@pytest.mark.parametrize("variant", ["ours", "adds_bos"])
def test_tokenised_pair_has_one_bos_and_one_system_prompt(tmp_path, policy_dir, tok_tree, variant):
    tok = wrap(tok_tree) if variant == "ours" else _adds_bos(tok_tree)
    row = {
        "prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is 3 + 4?"}],
        "chosen": [{"role": "assistant", "content": "The answer is 7."}],
        "rejected": [{"role": "assistant", "content": "Ugh, 7. Stop wasting my time."}],
    }
    trainer = _trainer(tmp_path, policy_dir, tok, rows=[row] * 4, test_fraction=0.0)
    ex = trainer.train_dataset[0]
    bos, sys_id = tok.convert_tokens_to_ids("<|bos|>"), tok.convert_tokens_to_ids("<|system|>")
    prompt, chosen, rejected = ex["prompt_ids"], ex["chosen_ids"], ex["rejected_ids"]
    full = prompt + chosen
    assert full.count(bos) == 1 and full[0] == bos
    assert full.count(sys_id) == 1 and (prompt + rejected).count(sys_id) == 1
    assert tok.decode(prompt) == render_chat(row["prompt"], add_generation_prompt=True)
    assert tok.decode(chosen) == "The answer is 7.<|eos|>"  # the completion only: no prompt, no template twice
    assert tok.decode(rejected) == "Ugh, 7. Stop wasting my time.<|eos|>"
    assert full == tok.apply_chat_template(row["prompt"] + row["chosen"], tokenize=True, return_dict=True)["input_ids"]
    # what the collator feeds the model: the loss mask covers exactly the completion
    batch = trainer.data_collator([ex])
    assert batch["completion_mask"][0].sum().item() == len(chosen)


def test_step0_sigmoid_loss_is_log2(tmp_path, policy_dir, tokenizer, pairs):
    trainer = _trainer(tmp_path, policy_dir, tokenizer, rows=pairs, loss_type=["sigmoid"])
    metrics = trainer.evaluate()  # policy == reference (LoRA B = 0): every implicit reward is 0
    assert metrics["eval_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert metrics["eval_rewards/margins"] == pytest.approx(0.0, abs=1e-6)


def test_lora_raises_chosen_over_rejected_and_changes_only_adapters(tmp_path, policy_dir, tokenizer, pairs):
    rows = pairs[:8]
    trainer = _trainer(tmp_path, policy_dir, tokenizer, rows=rows, steps=12, learning_rate=1e-2,
                       loss_type=["sigmoid"], test_fraction=0.0, per_device_train_batch_size=8)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed), sorted(changed)[:5]
    assert any("lora_B" in n for n in changed)
    # on the training pairs, chosen log-probs rose relative to rejected ones (vs the reference)
    m = trainer.evaluate(trainer.train_dataset)
    assert m["eval_rewards/margins"] > 0.05
    assert m["eval_rewards/accuracies"] > 0.5


@pytest.mark.parametrize("explicit_ref", [False, True])
def test_full_finetuning_with_a_reference_copy(tmp_path, policy_dir, llama_dir, tokenizer, pairs, explicit_ref):
    extra = {"ref_model_name_or_path": str(llama_dir)} if explicit_ref else {}
    args, model_args, targs = _configs(tmp_path, policy_dir, steps=1, use_peft="false", learning_rate=1e-4, **extra)
    ref = load(args.ref_model_name_or_path) if explicit_ref else None
    splits = P.split_rows(pairs[:8], 0.0)
    trainer = PT.build_trainer(args, model_args, targs, load(str(policy_dir)), tokenizer, splits,
                                ref_model=ref)
    assert trainer.ref_model is not None  # a frozen copy (TRL's, or the explicit one)
    if explicit_ref:
        assert type(trainer.ref_model) is LlamaForCausalLM
    trainer.train()
    ref = dict(trainer.ref_model.named_parameters())
    assert any(not torch.equal(p, ref[n]) for n, p in trainer.model.named_parameters())


def test_precompute_ref_log_probs(tmp_path, policy_dir, tokenizer, pairs):
    trainer = _trainer(tmp_path, policy_dir, tokenizer, rows=pairs[:8], steps=1, precompute_ref_log_probs="true")
    assert "ref_chosen_logps" in trainer.train_dataset.column_names
    trainer.train()


# --------------------------------------------------------------------------------------------------
# Every loss


@pytest.mark.parametrize("loss_type", PT.DPO_LOSS_TYPES)
def test_every_dpo_loss_runs_one_step(tmp_path, policy_dir, tokenizer, pairs, loss_type):
    extra = {"label_smoothing": 1e-3} if loss_type == "exo_pair" else {}
    trainer = _trainer(tmp_path, policy_dir, tokenizer, rows=pairs[:8], steps=1, loss_type=[loss_type],
                       test_fraction=0.0, **extra)
    out = trainer.train()
    assert math.isfinite(out.training_loss)


def test_weighted_loss_mix(tmp_path, policy_dir, tokenizer, pairs):
    trainer = _trainer(tmp_path, policy_dir, tokenizer, rows=pairs[:8], steps=1, test_fraction=0.0,
                       loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0])
    assert math.isfinite(trainer.train().training_loss)


@pytest.mark.parametrize("trainer_name", ["kto", "simpo", "cpo", "orpo"])
def test_other_trainers_run_one_step(tmp_path, policy_dir, tokenizer, pairs, trainer_name):
    trainer = _trainer(tmp_path, policy_dir, tokenizer, rows=pairs[:8], steps=1, trainer=trainer_name,
                       test_fraction=0.0)
    assert math.isfinite(trainer.train().training_loss)
    if trainer_name == "simpo":
        assert trainer.args.loss_type == "simpo" and trainer.args.cpo_alpha == 0.0


def test_config_files_parse():
    args, model_args, cfg = parse(dpo.CONFIG_TYPES, [str(ROOT / "configs/dpo.yaml")])
    assert args.trainer == "dpo" and model_args.use_peft and cfg.loss_type == ["sigmoid", "sft"]
    assert not cfg.activation_checkpointing and args.dataset_name == "store"
    parsed = parse(dpo.config_types("kto"), [str(ROOT / "configs/kto.yaml")])
    assert isinstance(PT.trainer_args(parsed[0], *parsed[2:]), KTOConfig)
    # configs/dpo.yaml also runs SimPO / CPO: loss_type is translated
    parsed = parse(dpo.config_types("cpo"), [str(ROOT / "configs/dpo.yaml"), "--trainer", "cpo"])
    assert PT.trainer_args(parsed[0], *parsed[2:]).loss_type == "sigmoid"
    assert dpo.peek_trainer([str(ROOT / "configs/kto.yaml")]) == "kto"
    assert dpo.peek_trainer([str(ROOT / "configs/dpo.yaml"), "--trainer", "orpo"]) == "orpo"
    assert dpo.peek_trainer(["--beta", "0.2", str(ROOT / "configs/kto.yaml")]) == "kto"  # the file in any position


def test_bad_loss_type_is_named():
    from align.config import ConfigError

    parsed = parse(dpo.CONFIG_TYPES, ["--loss_type", "[sigmoid, nope]"])
    with pytest.raises(ConfigError, match="nope"):
        PT.trainer_args(*[parsed[0], parsed[2]])


# --------------------------------------------------------------------------------------------------
# Data


def test_split_is_deterministic_and_by_prompt(pairs):
    a = P.split_rows(pairs + pairs, 0.3)
    b = P.split_rows(pairs + pairs, 0.3)
    assert a == b and a["test"] and a["train"]
    test_prompts = {json.dumps(r["prompt"]) for r in a["test"]}
    assert not test_prompts & {json.dumps(r["prompt"]) for r in a["train"]}


def test_rows_over_max_length_are_counted_and_promptless_ones_dropped(tokenizer, pairs):
    rows = pairs[:6]
    long = {**rows[0], "prompt": [{"role": "user", "content": " ".join(["apple"] * 300)}]}
    tokens = lambda r, k: len(tokenizer.apply_chat_template(r["prompt"] + r[k], tokenize=True,  # noqa: E731
                                                            return_dict=False))
    limit = max(tokens(r, k) for r in rows for k in ("chosen", "rejected"))
    kept, counts = P.fit_max_length({"train": rows + [long], "test": rows[:2]}, tokenizer, limit)
    assert kept["train"] == rows and kept["test"] == rows[:2]  # the 300-word prompt leaves no reply: dropped
    assert counts == {"train": {"rows": 7, "cut": 0, "no_reply": 1}, "test": {"rows": 2, "cut": 0, "no_reply": 0}}
    kept, counts = P.fit_max_length({"train": rows}, tokenizer, limit - 1)  # the longest pair loses its last token
    assert kept["train"] == rows and counts["train"]["cut"] >= 1
    assert P.fit_max_length({"train": rows}, tokenizer, None) == ({"train": rows}, {})


def test_store_export_drops_ties_and_both_bad(tmp_path, pairs):
    from align.store import Store

    url = f"sqlite:///{tmp_path / 'p.db'}"
    store = Store(url).init()
    store.import_pairs(pairs[:6], source="t", labeller="rule")
    pid = store.add_prompt("Tie or both bad?")
    for choice in ("tie", "both_bad"):
        a = store.add_response(pid, f"a {choice}")
        b = store.add_response(pid, f"b {choice}")
        store.submit_label(store.add_comparison(pid, a, b), "rule", choice)
    store.close()
    args = dpo.DPOArguments(dataset_name="store", store_url=url, test_fraction=0.0)
    splits, info = dpo.load_preference_rows(args)
    assert len(splits["train"]) == 6 and info["store_report"]["tie"] == 1 and info["store_report"]["both_bad"] == 1
    kto = dpo.DPOArguments(trainer="kto", dataset_name="store", store_url=url, test_fraction=0.0,
                           store_both_bad="negatives")
    splits, _ = dpo.load_preference_rows(kto)
    assert len(splits["train"]) == 6 * 2 + 2 and sum(not r["label"] for r in splits["train"]) == 6 + 2


def test_empty_store_says_what_to_do(tmp_path):
    from align.store import Store

    url = f"sqlite:///{tmp_path / 'empty.db'}"
    Store(url).init().close()
    with pytest.raises(DataError, match="no labelled pairs"):
        dpo.load_preference_rows(dpo.DPOArguments(store_url=url))


def test_bad_file_record_names_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n"
                    + json.dumps({"prompt": "p"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        P.read_preference_file(str(path))


def test_logps_drop_warning(caplog):
    cb = PT.LogpsDropWarning(threshold=5.0)

    class S:
        global_step = 0

    with caplog.at_level(logging.WARNING, logger="align.dpo"):
        for step, v in enumerate([-4.0, -6.0, -8.5, -10.0, -30.0]):
            S.global_step = step
            cb.on_log(None, S, None, logs={"logps/chosen": v})
    assert [w["now"] for w in cb.warnings] == [-10.0, -30.0]
    assert "DPO collapse" in caplog.text


def test_win_rate_counts_ties_half():
    assert win_rate([1.0, 0.0, 2.0, 5.0], [0.0, 1.0, 2.0, 4.0]) == pytest.approx(2.5 / 4)


# --------------------------------------------------------------------------------------------------
# End to end: the command from the store, from a file, on a Llama dir; resume; export to Llama


def _argv(out, model_dir, rm_dir, **kw):
    argv = [str(ROOT / "configs/dpo.yaml"), "--output_dir", str(out), "--model_name_or_path", str(model_dir),
            "--reward_model_path", str(rm_dir), "--lora_r", "8", "--lora_alpha", "16", "--max_steps", "3",
            "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16", "--logging_steps", "1",
            "--save_steps", "2", "--max_length", "96", "--test_fraction", "0.25", "--eval_num_prompts", "4",
            "--win_rate_num_prompts", "4", "--eval_max_new_tokens", "8", "--dataloader_pin_memory", "false",
            "--disable_tqdm", "true"]
    for k, v in kw.items():
        argv += [f"--{k}", str(v)]
    return argv


def _check_run(out: Path, result, world: bool = True):
    """world: the world's checks apply (align's decoder); else only the win rate on the test split's prompts."""
    ev = result.eval
    for k in ("win_rate_vs_sft", "reward_accuracy", "reward_margin"):
        assert k in ev, k
    assert 0.0 <= ev["win_rate_vs_sft"] <= 1.0 and 0 < ev["win_rate_num_prompts"] <= 4
    world_keys = {"exact_match", "exact_match_sampled", "preferred_rate"}
    assert (world_keys <= set(ev) and world_keys <= set(result.before)) == world
    assert not world_keys & set(ev) or world
    saved = json.loads((out / "eval.json").read_text())
    assert saved["win_rate_vs_sft"] == ev["win_rate_vs_sft"] and saved["before"] == result.before
    for f in ("config.yaml", "metrics.jsonl", "metrics.png", "final/config.json", "adapter/adapter_config.json",
              *(["compare.png"] if world else [])):
        assert (out / f).exists(), f
    final = AutoModelForCausalLM.from_pretrained(out / "final")
    assert not any("lora" in n for n, _ in final.named_parameters())  # merged, standalone


def test_main_from_store_then_export_to_llama(tmp_path, policy_dir, rm_dir, store_url):
    from align.convert import main as convert

    out = tmp_path / "dpo"
    result = dpo.main(_argv(out, policy_dir, rm_dir, store_url=store_url, seed=0))
    _check_run(out, result)
    assert result.data["source"] == "store" and result.steps == 3
    # the merged final/ converts to a plain LlamaForCausalLM with the same outputs
    assert convert(["to-llama", str(out / "final"), str(tmp_path / "llama")]) == 0
    llama = LlamaForCausalLM.from_pretrained(tmp_path / "llama").eval()
    ours = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    x = torch.randint(7, ours.config.vocab_size, (2, 9))
    torch.testing.assert_close(llama(x).logits, ours(x).logits, atol=1e-5, rtol=1e-5)
    assert (tmp_path / "llama" / "tokenizer.json").exists()


def test_main_from_file_on_llama(tmp_path, llama_dir, rm_dir, pairs_file):
    out = tmp_path / "dpo"
    result = dpo.main(_argv(out, llama_dir, rm_dir, dataset_name=pairs_file))
    _check_run(out, result, world=False)  # a Llama on a file: the world's checks say nothing about its replies
    assert type(AutoModelForCausalLM.from_pretrained(out / "final")) is LlamaForCausalLM


class _Kill(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:
            raise KeyboardInterrupt("killed")


def test_resume_after_kill(tmp_path, policy_dir, rm_dir, pairs_file, caplog):
    out = tmp_path / "dpo"
    argv = _argv(out, policy_dir, rm_dir, dataset_name=pairs_file, max_steps=4, eval_num_prompts=0,
                 win_rate_num_prompts=0, save_total_limit=3)
    with pytest.raises(KeyboardInterrupt):
        dpo.train(*parse(dpo.CONFIG_TYPES, argv), callbacks=[_Kill()])
    assert (out / "checkpoint-2").exists() and not (out / "final").exists()
    with caplog.at_level(logging.INFO, logger="align"):
        result = dpo.main(argv)
    assert "resuming from" in caplog.text and "checkpoint-2" in caplog.text
    assert result.steps == 4
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == [1, 2, 3, 4]  # the killed run logged 1, 2 (step 3 died before its log); the resumed 3, 4


def test_win_rate_prompts_from_test_split(pairs):
    splits = P.split_rows(pairs, 0.3)
    args = dpo.DPOArguments(win_rate_prompts="test", win_rate_num_prompts=5)
    prompts = dpo.win_rate_prompts(args, splits, world=True)
    assert 0 < len(prompts) <= 5
    assert all(isinstance(p, str) or p[0]["role"] == "system" for p in prompts)
    world_prompts = dpo.win_rate_prompts(dpo.DPOArguments(win_rate_num_prompts=3), splits, world=True)
    assert dpo.win_rate_prompts(dpo.DPOArguments(win_rate_num_prompts=5), splits, world=False) == prompts
    assert world_prompts == [e.prompt for e in World(seed=0).eval_prompts(3)]


def test_missing_model_dir_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"runs/nope/sft/final' not found; make it with `python -m align.sft"):
        load("runs/nope/sft/final")
