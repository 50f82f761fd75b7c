"""Fixtures shared across test files: a project tokenizer and tiny model dirs, built once per session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> str:
    """The project's BPE tokenizer trained on part of the built-in world."""
    from align.tokenizer import TokenizerArguments, train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(TokenizerArguments(corpus="world", vocab_size=400, max_documents=2000, output_dir=str(out)))
    return str(out)


def _save(model, tokenizer_dir: str, out) -> str:
    from transformers import AutoTokenizer

    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(str(out))
    return str(out)


@pytest.fixture(scope="session")
def tiny_lm_dir(tokenizer_dir, tmp_path_factory) -> str:
    """A randomly initialised tiny DecoderForCausalLM saved with the tokenizer."""
    import torch
    from transformers import AutoTokenizer

    from align.model import DecoderConfig, DecoderForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = DecoderConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    return _save(DecoderForCausalLM(config), tokenizer_dir, tmp_path_factory.mktemp("tiny_lm"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tokenizer_dir, tmp_path_factory) -> str:
    """A tiny HF LlamaForCausalLM saved with the tokenizer: 'any HF causal LM'."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True,
    )
    return _save(LlamaForCausalLM(config), tokenizer_dir, tmp_path_factory.mktemp("tiny_llama"))
