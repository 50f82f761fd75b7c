"""The main command's plumbing (its stages run end to end in `make quickstart` and CI's quickstart run)."""
from pathlib import Path

import pytest

from align import quickstart
from align.config import ConfigError, parse

ROOT = Path(__file__).parents[1]


def test_stage_args_reach_the_stage_and_pass_its_parser(monkeypatch):
    monkeypatch.chdir(ROOT)
    (q,) = parse(quickstart.CONFIG_TYPES, ["configs/quickstart_gpu.yaml"])
    keys = q.stage_args["grpo"]
    args, model_args, train_args = quickstart.stage_configs(q, "grpo", model_name_or_path="runs/x/dpo/final",
                                                            max_steps=3)
    assert args.world_fresh_words == keys["world_fresh_words"] > 0
    assert train_args.per_device_train_batch_size == keys["per_device_train_batch_size"]
    assert train_args.learning_rate == keys["learning_rate"]
    assert train_args.lr_scheduler_type.value == keys["lr_scheduler_type"]
    assert train_args.max_steps == 3 and model_args.model_name_or_path == "runs/x/dpo/final"  # the quickstart's own win
    assert train_args.output_dir == str(Path(q.output_dir) / "grpo")
    assert quickstart.stage_configs(q, "sft")[-1].output_dir == str(Path(q.output_dir) / "sft")


def test_stage_args_bad_input(monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises((ConfigError, ValueError), match="grpp"):
        parse(quickstart.CONFIG_TYPES, ["configs/quickstart.yaml", "--stage_args", "{grpp: {max_steps: 1}}"])
    with pytest.raises((ConfigError, ValueError), match="stage_args.store"):
        parse(quickstart.CONFIG_TYPES, ["configs/quickstart.yaml", "--stage_args", "{store: {n: 1}}"])
    with pytest.raises((ConfigError, ValueError), match="stage_args.grpo"):
        parse(quickstart.CONFIG_TYPES, ["configs/quickstart.yaml", "--stage_args", "{grpo: 5}"])
    (q,) = parse(quickstart.CONFIG_TYPES, ["configs/quickstart.yaml", "--stage_args", "{grpo: {max_stepz: 1}}"])
    with pytest.raises(ConfigError, match="max_stepz"):  # the stage's own parser names a wrong key
        quickstart.stage_configs(q, "grpo")


def test_a_stage_runs_with_its_stage_args_and_the_report_gives_the_gain(tmp_path, monkeypatch):
    """`--stages [grpo]` on a run dir whose earlier stages exist: GRPO gets stage_args, report.json the gain."""
    import json
    import shutil

    import yaml
    from test_grpo import tiny_dirs

    monkeypatch.chdir(ROOT)
    d, root = tiny_dirs(), tmp_path / "qs"
    shutil.copytree(d["policy"], root / "dpo" / "final")
    shutil.copytree(d["rm"], root / "reward" / "final")
    (root / "report.json").write_text(json.dumps({"sft": {"exact_match_sampled": 0.25}}))
    tiny = {"max_steps": 1, "per_device_train_batch_size": 8, "num_generations": 4, "max_completion_length": 4,
            "num_prompts": 16, "world_fresh_words": 50, "eval_num_prompts": 4, "eval_kl_prompts": 2,
            "eval_max_new_tokens": 4}
    (q,) = parse(quickstart.CONFIG_TYPES, ["configs/quickstart.yaml", "--output_dir", str(root), "--stages", "[grpo]",
                                           "--stage_args", json.dumps({"grpo": tiny})])
    report = quickstart.run(q)
    grpo_report = report["grpo"]
    assert grpo_report["start"] == str(root / "dpo" / "final")
    assert grpo_report["exact_match_sampled_vs_sft"] == round(grpo_report["exact_match_sampled"] - 0.25, 4)
    assert json.loads((root / "report.json").read_text())["grpo"] == grpo_report
    cfg = yaml.safe_load((root / "grpo" / "config.yaml").read_text())
    assert cfg["world_fresh_words"] == 50 and cfg["max_steps"] == 1  # the run's resolved config has the stage_args
