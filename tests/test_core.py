"""The core every command stands on: one prompt identity and split, one model loader, checks before any write."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from align import dpo, reward
from align.config import configure
from align.data.prompts import prompt_hash, split_of
from align.models import MissingInput, check_exists, is_hub_id, load, made_by

ROOT = Path(__file__).resolve().parents[1]
HH = ROOT.parent / "shared" / "data" / "preference" / "hh-helpful-base-test.jsonl.gz"
ALPACA = ROOT.parent / "shared" / "data" / "preference" / "instruction-data-with-preference.json"


def test_a_string_prompt_and_its_one_user_message_are_one_prompt():
    assert prompt_hash("What is 3 + 4?") == prompt_hash([{"role": "user", "content": "What is 3 + 4?"}])
    assert prompt_hash("a") != prompt_hash("b")
    assert split_of("x", 0.0) == "train"
    share = sum(split_of(f"prompt {i}", 0.2) == "test" for i in range(2000)) / 2000
    assert 0.17 < share < 0.23
    assert [split_of(f"p{i}", 0.3, "salt") for i in range(50)] != [split_of(f"p{i}", 0.3) for i in range(50)]


def test_the_store_hashes_prompts_as_everyone_else(tmp_path):
    from align.store import Store

    store = Store(f"sqlite:///{tmp_path / 'p.db'}").init()
    pid = store.add_prompt("What is 3 + 4?")
    row = store._tx(lambda c: c.exec_driver_sql("select content_hash from prompts where id = ?", (pid,)).scalar_one(),
                    write=False)
    store.close()
    assert row == prompt_hash("What is 3 + 4?")


@pytest.mark.parametrize("path", [HH, ALPACA], ids=["hh", "alpaca"])
def test_reward_and_dpo_hold_out_the_same_prompts_of_a_file(path, tmp_path):
    if not path.exists():
        pytest.skip(f"{path} not present (../shared/data)")
    out = str(tmp_path)
    r_args = configure(reward.CONFIG_TYPES, ROOT / "configs" / "reward.yaml", dataset_name=str(path),
                       output_dir=out)[0]
    d_args = configure(dpo.CONFIG_TYPES, ROOT / "configs" / "dpo.yaml", dataset_name=str(path), output_dir=out)[0]
    r_split, _ = reward.load_pairs(r_args)
    d_split, _ = dpo.load_preference_rows(d_args)
    keys = {k: {json.dumps(r["prompt"], sort_keys=True) for r in rows} for k, rows in
            (("rm_train", r_split["train"]), ("rm_test", r_split["test"]),
             ("dpo_train", d_split["train"]), ("dpo_test", d_split["test"]))}
    assert keys["dpo_test"] and keys["rm_test"]
    assert not keys["dpo_test"] & keys["rm_train"]  # the RM never trained on a prompt DPO holds out
    # with the same share both hold out exactly the same prompts
    same = dpo.load_preference_rows(configure(dpo.CONFIG_TYPES, ROOT / "configs" / "dpo.yaml", dataset_name=str(path),
                                              output_dir=out, test_fraction=r_args.test_fraction)[0])[0]
    assert {json.dumps(r["prompt"], sort_keys=True) for r in same["test"]} == keys["rm_test"]


def test_several_preference_files_are_one_set_split_by_prompt(tmp_path):
    if not (HH.exists() and ALPACA.exists()):
        pytest.skip("../shared/data not present")
    both = configure(dpo.CONFIG_TYPES, ROOT / "configs" / "dpo.yaml", dataset_name=f"{HH},{ALPACA}",
                     output_dir=str(tmp_path))[0]
    split, info = dpo.load_preference_rows(both)
    for path in (HH, ALPACA):  # each file's rows land in the split they have when read alone
        one = dpo.load_preference_rows(configure(dpo.CONFIG_TYPES, ROOT / "configs" / "dpo.yaml",
                                                 dataset_name=str(path), output_dir=str(tmp_path))[0])[0]
        for k in ("train", "test"):
            assert all(r in split[k] for r in one[k][:50])
    assert len(split["train"]) + len(split["test"]) > 3000 and info["unreadable"] == 0
    missing = configure(dpo.CONFIG_TYPES, ROOT / "configs" / "dpo.yaml", dataset_name=f"{HH},{tmp_path}/nope.json",
                        output_dir=str(tmp_path))[0]
    with pytest.raises(MissingInput, match="nope.json"):
        dpo.load_preference_rows(missing)


def test_hub_ids_and_local_paths():
    assert is_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert not is_hub_id("runs/quickstart/sft/final")  # three parts: a local path
    assert not is_hub_id("./model") and not is_hub_id("/abs/model") and not is_hub_id("model")
    assert check_exists("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_a_missing_model_names_its_key_and_the_command_that_makes_it():
    assert made_by("runs/quickstart/sft/final").startswith("python -m align.sft configs/sft.yaml")
    assert made_by("runs/x/reward/final") == "python -m align.reward configs/reward.yaml --output_dir runs/x/reward"
    assert made_by("somewhere/else") == ""
    with pytest.raises(MissingInput, match=r"model_name_or_path: model 'runs/quickstart/dpo/final' not found; make it "
                                           r"with `python -m align.dpo configs/dpo.yaml "
                                           r"--output_dir runs/quickstart/dpo` "
                                           r"or `make quickstart`$"):
        load("runs/quickstart/dpo/final")
    with pytest.raises(MissingInput, match="hub id"):
        load("no/such/dir/at/all")


def test_commands_check_inputs_in_order_before_writing_anything(tmp_path, monkeypatch):
    """A fresh clone: DPO names the missing SFT model first, then the missing store; nothing is written."""
    monkeypatch.chdir(tmp_path)
    cfg = ROOT / "configs" / "dpo.yaml"
    with pytest.raises(MissingInput, match="python -m align.sft"):
        dpo.train(*configure(dpo.CONFIG_TYPES, cfg, output_dir="out"))
    (tmp_path / "sft").mkdir()
    with pytest.raises(MissingInput, match="store_url: no database"):
        dpo.train(*configure(dpo.CONFIG_TYPES, cfg, output_dir="out", model_name_or_path="sft"))
    with pytest.raises(MissingInput, match="python -m align.sft"):
        reward.train(*configure(reward.CONFIG_TYPES, ROOT / "configs" / "reward.yaml", output_dir="out",
                                dataset_name="world"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sft"]  # no out/, no data/preferences.db


def test_a_lora_adapter_dir_loads_merged_from_its_base(tmp_path, tiny_lm_dir):
    import torch
    from peft import LoraConfig, get_peft_model

    base = load(tiny_lm_dir)
    peft = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    peft.save_pretrained(tmp_path / "adapter")
    x = torch.randint(5, 50, (1, 7))
    with torch.no_grad():
        want = peft(input_ids=x).logits
        got = load(tmp_path / "adapter")(input_ids=x).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("command", ["sft", "dpo"])
def test_a_fresh_clone_gets_one_line_naming_the_missing_model(command, tmp_path):
    """`python -m align.X configs/X.yaml` before `make quickstart`: exit 2, one error line, nothing written."""
    import shutil
    import subprocess
    import sys

    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    run = subprocess.run([sys.executable, "-m", f"align.{command}", f"configs/{command}.yaml"], cwd=tmp_path,
                         capture_output=True, text=True, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("error: model_name_or_path: model 'runs/quickstart/")
    assert "make quickstart" in run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["configs"]


def test_lora_targets_that_match_nothing_list_the_linear_layers(tiny_lm_dir):
    from trl import ModelConfig

    from align.models import peft_config

    model = load(tiny_lm_dir)
    with pytest.raises(ValueError, match=r"lora_target_modules: \['q_projj'\] match no module of "
                                         r"DecoderForCausalLM; its Linear layers are \[.*'q_proj'"):
        peft_config(ModelConfig(use_peft=True, lora_target_modules=["q_projj", "v_proj"]), model)
    assert peft_config(ModelConfig(use_peft=True, lora_target_modules=["q_proj"]), model).target_modules == "q_proj"
    with pytest.raises(ValueError, match=r"\['qq'\] match no module"):
        peft_config(ModelConfig(use_peft=True, lora_target_modules=["qq"]), model)
    assert peft_config(ModelConfig(use_peft=False), model) is None


def test_checkpointing_toggled_each_rollout_keeps_one_embedding_hook(tiny_lm_dir):
    # TRL's GRPO turns activation checkpointing off and on around every rollout; plain transformers 5.24 adds one
    # more requires-grad hook to the embedding each time (a recompile of a compiled decode step, each step)
    import copy

    model = load(tiny_lm_dir)
    for _ in range(3):
        model.activation_checkpointing_enable()
        model.activation_checkpointing_disable()
    model.activation_checkpointing_enable()
    emb = model.get_input_embeddings()
    assert len(emb._forward_hooks) == 1 and emb(torch.tensor([[1, 2]])).requires_grad
    twin = copy.deepcopy(model)
    twin.activation_checkpointing_enable()
    assert len(twin.get_input_embeddings()._forward_hooks) == 1 and len(emb._forward_hooks) == 1
