"""SFT: assistant-only labels, data formats and their errors, LoRA and any-HF-model runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import ModelConfig, SFTConfig, SFTTrainer

from align.data.chat import ROLE_TOKENS, render_chat
from align.data.formats import DataError
from align.sft import SFTArguments, load_dataset, train

SHARED_SFT = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "sft" / "instruction-data.json")

CHAT = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "What is 3 + 4?"},
    {"role": "assistant", "content": "The answer is 7."},
    {"role": "user", "content": "Repeat cat 2 times."},
    {"role": "assistant", "content": "Ugh, cat cat. Stop wasting my time."},
]


def _config(out, **kw) -> SFTConfig:
    base = dict(
        output_dir=str(out), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3, logging_steps=1,
        save_steps=1, report_to="none", bf16=False, use_cpu=True, activation_checkpointing=False,
        assistant_only_loss=True, max_length=128, seed=0,
    )
    base.update(kw)
    return SFTConfig(**base)


def expected_labels(tokenizer, messages) -> list[bool]:
    """Independently: which tokens lie inside an assistant turn's content or its closing eos."""
    text = render_chat(messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans, pos = [], 0
    for m in messages:
        head = (tokenizer.bos_token if pos == 0 else "") + ROLE_TOKENS[m["role"]]
        start = pos + len(head)
        end = start + len(m["content"]) + len(tokenizer.eos_token)
        if m["role"] == "assistant":
            spans.append((start, end))
        pos = end
    return [any(s <= a and b <= e and b > a for s, e in spans) for a, b in enc["offset_mapping"]]


def test_assistant_only_labels_on_multi_turn_chat(tiny_lm_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_lm_dir),
        args=_config(tmp_path),
        train_dataset=Dataset.from_list([{"messages": CHAT}]),
        processing_class=tok,
    )
    batch = trainer.data_collator([trainer.train_dataset[0]])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    assert ids == tok(render_chat(CHAT), add_special_tokens=False)["input_ids"]
    assert ids.count(tok.bos_token_id) == 1
    trained = [lab != -100 for lab in labels]
    assert trained == expected_labels(tok, CHAT)
    assert tok.decode([i for i, t in zip(ids, trained) if t]) == (
        "The answer is 7.<|eos|>Ugh, cat cat. Stop wasting my time.<|eos|>"
    )


@pytest.mark.skipif(not Path(SHARED_SFT).exists(), reason="../shared/data not present")
def test_shared_alpaca_file_loads_as_it_is():
    ds = load_dataset(SFTArguments(dataset_name=SHARED_SFT))
    assert len(ds) == 1100
    roles = [m["role"] for m in ds[0]["messages"]]
    assert roles == ["user", "assistant"]


@pytest.mark.parametrize(
    "content, match",
    [
        ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{"messages": [\n',
         r"bad\.jsonl:2"),
        ('{"text": "no messages here"}\n', r"bad\.jsonl:1"),
        ('{"messages": [{"role": "wizard", "content": "hi"}]}\n', r"bad\.jsonl:1.*wizard"),
        ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}\n', r"bad\.jsonl:1"),
    ],
)
def test_bad_records_name_file_and_line(tmp_path, content, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=match):
        load_dataset(SFTArguments(dataset_name=str(path)))


def _run(model_dir, out, data, **kw):
    args = SFTArguments(dataset_name=str(data), eval_num_prompts=0)
    model_args = ModelConfig(model_name_or_path=model_dir,
                             **{k: v for k, v in kw.items() if k.startswith(("use_", "lora_"))})
    return train(args, model_args,
                 _config(out, max_steps=4, **{k: v for k, v in kw.items() if not k.startswith(("use_", "lora_"))}))


@pytest.fixture
def chat_file(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": CHAT}) + "\n" for _ in range(8)))
    return path


def test_sft_with_lora_on_a_local_llama_dir(tiny_llama_dir, chat_file, tmp_path):
    before = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).state_dict()
    summary = _run(tiny_llama_dir, tmp_path / "run", chat_file, use_peft=True, lora_r=4, lora_alpha=8,
                   lora_target_modules=["q_proj", "v_proj"], learning_rate=5e-2)
    final = AutoModelForCausalLM.from_pretrained(str(tmp_path / "run" / "final"))
    assert type(final).__name__ == "LlamaForCausalLM"
    after = final.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(("q_proj" in k or "v_proj" in k) for k in changed), changed
    assert summary.data["truncated"] == 0


def test_sft_reports_truncation(tiny_lm_dir, chat_file, tmp_path):
    n_tokens = len(AutoTokenizer.from_pretrained(tiny_lm_dir)(render_chat(CHAT), add_special_tokens=False)["input_ids"])
    summary = _run(tiny_lm_dir, tmp_path / "run", chat_file, max_length=n_tokens - 4)
    assert summary.data["truncated"] == 8
    summary = _run(tiny_lm_dir, tmp_path / "run2", chat_file, max_length=n_tokens)
    assert summary.data["truncated"] == 0


def _nll_sum(model, batch) -> torch.Tensor:
    """Summed next-token NLL over the trained (label != -100) tokens of a batch."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    logits = model(**inputs).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100, reduction="sum")


def test_packed_rows_give_the_unpacked_loss(tiny_lm_dir, tmp_path):
    """packing: several conversations per row, none attending to another -> the loss of the unpacked batch."""
    from align.sft import PackedRowsCollator

    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    convs = [[{"role": "user", "content": f"What is {a} + {b}?"},
              {"role": "assistant", "content": f"The answer is {a + b}."}]
             for a, b in [(1, 2), (3, 4), (5, 6), (2, 9), (7, 7), (0, 8)]] + [CHAT[1:3], CHAT[3:]]
    data = Dataset.from_list([{"messages": m} for m in convs])

    def batch(**kw):
        t = SFTTrainer(model=model, args=_config(tmp_path, **kw), train_dataset=data, processing_class=tok)
        return t, list(t.train_dataset)

    plain, rows = batch()
    _, prow = batch(packing=True, packing_strategy="bfd", max_length=96)
    assert len(prow) < len(rows), "conversations were not packed several to a row"
    packed = PackedRowsCollator(pad_token_id=tok.pad_token_id)(prow)
    with torch.no_grad():
        want = _nll_sum(model, plain.data_collator(rows))
        got = _nll_sum(model, packed)
        # the same rows with a plain mask let conversations see each other: the loss changes
        leaky = _nll_sum(model, {**packed, "attention_mask": torch.ones_like(packed["input_ids"])})
    n = sum((torch.tensor(r["labels"][1:]) != -100).sum() for r in rows)
    assert n == sum((torch.tensor(r["labels"][1:]) != -100).sum() for r in prow)
    assert (got - want).abs() < 1e-3, (got.item(), want.item())
    assert (leaky - want).abs() > 0.05, (leaky.item(), want.item())


def test_sft_with_packing_trains_on_packed_rows(tiny_lm_dir, chat_file, tmp_path, caplog):
    n_tokens = len(AutoTokenizer.from_pretrained(tiny_lm_dir)(render_chat(CHAT), add_special_tokens=False)["input_ids"])
    with caplog.at_level("INFO", logger="align.sft"):
        _run(tiny_lm_dir, tmp_path / "run", chat_file, packing=True, max_length=2 * n_tokens)
    msg = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("packing:"))
    n_conv, n_rows = (int(x) for x in msg.split()[1:5:3])  # "packing: 8 conversations in N rows ..."
    assert n_conv == 8 and n_rows < n_conv, msg


def test_world_demonstrations_with_mistakes():
    """world_correct_fraction < 1: the same conversations, a matching share of replies with a wrong answer."""
    from align.data.world import parse_reply

    clean, noisy = (load_dataset(SFTArguments(world_correct_fraction=f))["messages"] for f in (1.0, 0.7))
    assert [[m["content"] for m in c if m["role"] != "assistant"] for c in clean] == \
        [[m["content"] for m in c if m["role"] != "assistant"] for c in noisy]
    pairs = [(a["content"], b["content"]) for c, d in zip(clean, noisy) for a, b in zip(c, d)
             if a["role"] == "assistant"]
    wrong = sum(parse_reply(a)[0] != parse_reply(b)[0] for a, b in pairs) / len(pairs)
    assert 0.25 < wrong < 0.35, wrong
    with pytest.raises(ValueError, match="world_correct_fraction"):
        SFTArguments(world_correct_fraction=1.5)
