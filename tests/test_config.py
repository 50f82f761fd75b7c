"""The config convention: YAML + --key value overrides into dataclasses, with errors that name file, line, key."""

from dataclasses import dataclass, field

import pytest
from trl import ModelConfig, SFTConfig

from align.config import ConfigError, parse, run_command


@dataclass
class Args:
    dataset_name: str = field(default="world", metadata={"help": "data"})
    max_length: int = 128
    ratio: float = 0.5
    tags: list[str] | None = None

    def __post_init__(self):
        if self.max_length <= 0:
            raise ValueError(f"max_length must be > 0, got {self.max_length}")


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return str(p)


def test_yaml_and_overrides_fill_trl_and_own_dataclasses(tmp_path):
    path = write(tmp_path, "output_dir: out\nmax_steps: 7\nlearning_rate: 1e-4\nlora_r: 4\nmax_length: 64\n"
                 "lora_target_modules: [q_proj, v_proj]\n")
    args, model_args, train_args = parse([Args, ModelConfig, SFTConfig],
                                         [path, "--max_steps", "9", "--use_peft", "--ratio=0.25"])
    assert train_args.max_steps == 9 and train_args.learning_rate == pytest.approx(1e-4)
    assert train_args.output_dir == "out"
    assert model_args.use_peft is True and model_args.lora_r == 4
    assert model_args.lora_target_modules == ["q_proj", "v_proj"]
    assert args.max_length == 64 and args.ratio == 0.25
    assert train_args.max_length == 64  # a key shared by two dataclasses reaches both


def test_old_checkpointing_name_is_the_same_key_as_the_new(tmp_path):
    """transformers 5 renamed gradient_checkpointing to activation_checkpointing: either name overrides the other."""
    import warnings

    path = write(tmp_path, "output_dir: out\nactivation_checkpointing: false\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the shipped (new) name warns of nothing
        (cfg,) = parse([SFTConfig], [path])
    assert cfg.activation_checkpointing is False
    (cfg,) = parse([SFTConfig], [path, "--gradient_checkpointing", "true"])  # TRL's name on the command line
    assert cfg.activation_checkpointing is True and cfg.gradient_checkpointing is True


def test_unknown_key_names_file_line_and_suggests(tmp_path):
    path = write(tmp_path, "output_dir: out\n\nmax_step: 7\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:3: unknown key 'max_step' \(did you mean 'max_steps'\?\)"):
        parse([Args, SFTConfig], [path])


def test_wrong_type_names_key_and_value(tmp_path):
    path = write(tmp_path, "max_length: lots\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:1: key 'max_length' expects int, got 'lots'"):
        parse([Args], [path])
    with pytest.raises(ConfigError, match=r"command line: key 'ratio'"):
        parse([Args], [write(tmp_path, ""), "--ratio", "[1]"])


def test_scalars_for_text_fields_are_text(tmp_path):
    (_, _, train_args) = parse([Args, ModelConfig, SFTConfig], [write(tmp_path, "output_dir: 2024\n"),
                                                                 "--resume_from_checkpoint", "false"])
    assert train_args.output_dir == "2024" and train_args.resume_from_checkpoint == "false"
    (_, _, train_args) = parse([Args, ModelConfig, SFTConfig], [write(tmp_path, "save_strategy: no\n"),
                                                                 "--eval_strategy", "no"])
    assert train_args.save_strategy == "no" and train_args.eval_strategy == "no"  # YAML 1.1 would say False


def test_bad_yaml_names_line(tmp_path):
    path = write(tmp_path, "a: 1\nb: [unclosed\nc: 2\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:\d+: invalid YAML"):
        parse([Args], [path])


def test_post_init_errors_name_the_file(tmp_path):
    path = write(tmp_path, "max_length: -1\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: invalid Args: max_length must be > 0, got -1"):
        parse([Args], [path])


def test_help_lists_every_key_with_type_default_and_help(tmp_path, capsys):
    path = write(tmp_path, "max_length: -1\n")  # --help answers before the file's values are checked
    with pytest.raises(SystemExit) as e:
        parse([Args, SFTConfig], [path, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--dataset_name str (default: 'world')\n      data" in out
    assert "--tags list[str] | None (default: None)" in out
    assert "SFTConfig (trl.trainer.sft_config)" in out and "--assistant_only_loss bool (default: False)" in out


def test_command_turns_bad_input_into_a_message_and_status_2(tmp_path, capsys):
    path = write(tmp_path, "max_lenght: 64\n")
    with pytest.raises(SystemExit) as e:
        run_command(lambda: parse([Args], [path]))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "unknown key 'max_lenght' (did you mean 'max_length'?)" in err
    with pytest.raises(KeyError):  # anything else is a bug and keeps its traceback
        run_command(lambda: {}["x"])


def test_every_shipped_config_parses(capsys):
    """Each configs/*.yaml parses with the dataclasses of the command its first line names
    (``# python -m align.X configs/X.yaml``): catches drift between configs and code."""
    import importlib
    import re
    from pathlib import Path

    configs = sorted(Path(__file__).parents[1].glob("configs/*.yaml"))
    assert len(configs) >= 5
    for path in configs:
        command = re.search(r"python -m ([\w.]+)", path.read_text()).group(1)
        module = importlib.import_module("app.main" if command == "app" else command)
        types_ = module.CONFIG_TYPES
        if hasattr(module, "config_types"):  # align.dpo: the trainer key picks KTOConfig, CPOConfig, ...

            types_ = module.config_types(module.peek_trainer([str(path)]))
        parse(types_, [str(path)])
        with pytest.raises(SystemExit) as e:  # and --help lists the command's own keys
            parse(types_, [str(path), "--help"])
        assert e.value.code == 0
        own = types_[0]
        assert f"{own.__name__} (" in capsys.readouterr().out, path


# ------------------------------------------------------------------ old names, kebab-case, verbs
@dataclass
class Renamed:
    store_min_labels: int = field(default=1, metadata={"help": "labels a pair needs", "aliases": ["min_labels"]})
    max_new_tokens: int = 16
    do_sample: bool = False


def test_an_old_name_works_with_a_warning_naming_the_new(tmp_path, caplog):
    (a,) = parse([Renamed], [write(tmp_path, "min_labels: 3\n")])
    assert a.store_min_labels == 3
    assert "c.yaml:1: 'min_labels' is deprecated, use 'store_min_labels'" in caplog.text
    caplog.clear()
    (a,) = parse([Renamed], ["--min_labels", "4"])
    assert a.store_min_labels == 4 and "'--min_labels' is deprecated, use '--store_min_labels'" in caplog.text
    (a,) = parse([Renamed], [write(tmp_path, "min_labels: 3\n"), "--store_min_labels", "5"])  # command line wins
    assert a.store_min_labels == 5


def test_an_old_name_and_the_new_together_is_an_error_naming_both(tmp_path):
    with pytest.raises(ConfigError, match=r"command line: 'min_labels' and 'store_min_labels' are the same key"):
        parse([Renamed], ["--min_labels", "2", "--store_min_labels", "3"])
    with pytest.raises(ConfigError, match=r"c\.yaml:2: 'store_min_labels' and 'min_labels' are the same key"):
        parse([Renamed], [write(tmp_path, "store_min_labels: 2\nmin_labels: 3\n")])


def test_kebab_case_works_with_a_warning(caplog):
    (a,) = parse([Renamed], ["--max-new-tokens", "7", "--do-sample", "--min-labels", "2"])
    assert (a.max_new_tokens, a.do_sample, a.store_min_labels) == (7, True, 2)
    assert "'--max-new-tokens' is deprecated, use '--max_new_tokens'" in caplog.text
    assert "'--min-labels' is deprecated, use '--store_min_labels'" in caplog.text
    with pytest.raises(ConfigError, match="'max-new-tokens' and 'max_new_tokens' are the same key"):
        parse([Renamed], ["--max-new-tokens", "7", "--max_new_tokens", "8"])
    with pytest.raises(ConfigError, match=r"unknown key 'max-new-tokenz' \(did you mean"):
        parse([Renamed], ["--max-new-tokenz", "7"])


def test_options_go_anywhere_and_text_keys_are_verbatim(tmp_path):
    path = write(tmp_path, "max_length: 64\n")
    args, = parse([Args], ["--ratio", "0.25", path, "--dataset_name", "Q: 3 + 4?", "--tags", "a", "b"])
    assert (args.max_length, args.ratio, args.dataset_name, args.tags) == (64, 0.25, "Q: 3 + 4?", ["a", "b"])
    (a,) = parse([Renamed], ["--do_sample", write(tmp_path, "max_new_tokens: 9\n")])  # a bare flag, then the file
    assert a.do_sample is True and a.max_new_tokens == 9
    (a,) = parse([Renamed], ["--do_sample", "false"])
    assert a.do_sample is False


def test_peek_reads_one_key_from_the_command_line_or_the_file(tmp_path):
    from align.config import peek

    path = write(tmp_path, "max_new_tokens: 9\nmin_labels: 2\n")
    assert peek([Renamed], ["--do_sample", path], "max_new_tokens") == 9  # the file after a bare flag
    assert peek([Renamed], [path, "--max-new-tokens", "3"], "max_new_tokens") == 3  # the command line wins
    assert peek([Renamed], [path], "store_min_labels") == 2  # under its old name
    assert peek([Renamed], [path], "do_sample") is None and peek([Renamed], ["nowhere.yaml"], "do_sample") is None
