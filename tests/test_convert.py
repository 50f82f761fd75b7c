"""align.convert: lossless align <-> Llama conversion and LoRA merging."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
)

from align.convert import from_llama, main, to_llama
from align.model import DecoderConfig, DecoderForCausalLM, DecoderForSequenceClassification

V = 64


def tiny(**overrides) -> DecoderConfig:
    kwargs = dict(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, rope_theta=500000.0,
    )
    return DecoderConfig(**{**kwargs, **overrides})


def ids(B=2, T=9, seed=1):
    return torch.randint(3, V, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("tie", [True, False])
def test_to_llama_and_back_is_lossless(tie):
    torch.manual_seed(0)
    ours = DecoderForCausalLM(tiny(tie_word_embeddings=tie)).eval()
    llama = to_llama(ours)
    assert type(llama) is LlamaForCausalLM
    assert llama.config.tie_word_embeddings is tie
    assert (llama.lm_head.weight is llama.model.embed_tokens.weight) is tie
    x = ids()
    assert (ours(x).logits - llama(x).logits).abs().max() < 1e-5
    back = from_llama(llama)
    assert type(back) is DecoderForCausalLM
    assert (back(x).logits - ours(x).logits).abs().max() < 1e-5
    for name, p in ours.state_dict().items():
        assert torch.equal(p, back.state_dict()[name]), name


def test_from_llama_matches_hf_llama_with_left_padding():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=V, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=6,
                         num_key_value_heads=3, rope_parameters={"rope_type": "default", "rope_theta": 1e4},
                         tie_word_embeddings=False, pad_token_id=0)
    llama = LlamaForCausalLM(config).eval()
    ours = from_llama(llama)
    assert ours.config.num_key_value_heads == 3 and ours.config.intermediate_size == 96
    x = ids(B=3)
    mask = torch.ones_like(x)
    mask[0, :4] = 0
    x[0, :4] = 0
    # Llama takes explicit position ids under left padding; ours derives the same ones from the mask
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    a = llama(x, attention_mask=mask, position_ids=pos).logits
    b = ours(x, attention_mask=mask).logits
    assert (a - b)[mask.bool()].abs().max() < 1e-5


def test_seq_cls_matches_llama():
    torch.manual_seed(0)
    ours = DecoderForSequenceClassification(tiny(num_labels=2)).eval()
    llama = to_llama(ours)
    assert type(llama) is LlamaForSequenceClassification and llama.config.num_labels == 2
    x = ids(B=3)
    x[0, 6:] = 0  # right padding
    mask = (x != 0).long()
    a = ours(x, attention_mask=mask).logits
    assert a.shape == (3, 2)
    assert (a - llama(x, attention_mask=mask).logits).abs().max() < 1e-5
    assert type(from_llama(llama)) is DecoderForSequenceClassification


def test_cli_round_trip_copies_tokenizer(tmp_path):
    torch.manual_seed(0)
    ours = DecoderForCausalLM(tiny())
    ours.save_pretrained(tmp_path / "ours")
    (tmp_path / "ours" / "tokenizer.json").write_text('{"fake": true}')
    assert main(["to-llama", str(tmp_path / "ours"), str(tmp_path / "llama")]) == 0
    assert json.loads((tmp_path / "llama" / "config.json").read_text())["model_type"] == "llama"
    assert (tmp_path / "llama" / "tokenizer.json").read_text() == '{"fake": true}'
    assert (tmp_path / "llama" / "model.safetensors").exists()
    assert main(["from-llama", str(tmp_path / "llama"), str(tmp_path / "back")]) == 0
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "back")
    assert type(back) is DecoderForCausalLM
    x = ids()
    torch.testing.assert_close(back(x).logits, ours.eval()(x).logits, atol=1e-5, rtol=0)


def test_cli_refuses_moe(tmp_path, capsys):
    DecoderForCausalLM(tiny(num_experts=2, num_experts_per_tok=1)).save_pretrained(tmp_path / "moe")
    assert main(["to-llama", str(tmp_path / "moe"), str(tmp_path / "out")]) == 2
    assert "num_experts=2" in capsys.readouterr().err


def test_merge_lora_into_our_decoder(tmp_path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    DecoderForCausalLM(tiny()).save_pretrained(tmp_path / "base")
    (tmp_path / "base" / "tokenizer_config.json").write_text("{}")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False))
    peft.save_pretrained(tmp_path / "adapter")
    x = ids()
    expected = peft.eval()(input_ids=x).logits
    assert main(["merge", str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert type(merged) is DecoderForCausalLM
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(merged(x).logits, expected, atol=1e-5, rtol=1e-5)
    assert (tmp_path / "merged" / "tokenizer_config.json").exists()  # copied from the base


def test_merge_lora_into_hf_seq_cls(tmp_path):
    from peft import LoraConfig, TaskType, get_peft_model

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_labels=1, pad_token_id=0)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "base")
    base = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base")
    lora = LoraConfig(task_type=TaskType.SEQ_CLS, r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft = get_peft_model(base, lora)
    with torch.no_grad():
        peft.base_model.model.score.modules_to_save["default"].weight.add_(1.0)  # trained head is saved too
    peft.save_pretrained(tmp_path / "adapter")
    x = ids()
    expected = peft.eval()(input_ids=x).logits
    assert main(["merge", str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert type(merged) is LlamaForSequenceClassification
    torch.testing.assert_close(merged(x).logits, expected, atol=1e-5, rtol=1e-5)


def test_dual_chunk_attention_has_no_llama_equivalent():
    from align.convert import not_llama_reason, to_llama
    from align.model import DecoderConfig, DecoderForCausalLM

    model = DecoderForCausalLM(DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                             dca_chunk_size=32, dca_local_window=8))
    with pytest.raises(ValueError, match="dual chunk attention"):
        to_llama(model)
    assert "dual chunk attention" in not_llama_reason(model)
