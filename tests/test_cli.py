"""One command-line convention for every command (align.config.parse_verb): VERB, positionals and --key value in any
order, snake_case keys, old spellings with a warning, one error line naming the key, --help per verb."""

import json
from dataclasses import dataclass, field

import pytest

from align.config import ConfigError, parse_verb
from align.store.__main__ import main as store_main


def _pairs(path, n=3):
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": f"c{i}", "rejected": f"r{i}"}) + "\n"
                            for i in range(n)))
    return str(path)


def _exported(tmp_path, url, name):
    out = tmp_path / name
    assert store_main(["export", str(out), "--db", url, "--standard"]) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_store_db_before_or_after_the_verb_gives_the_same_store(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("ALIGN_STORE_URL", raising=False)
    monkeypatch.chdir(tmp_path)  # the default store (data/preferences.db) would land here: it must stay empty
    f = _pairs(tmp_path / "p.jsonl")
    after, before = f"sqlite:///{tmp_path}/after.db", f"sqlite:///{tmp_path}/before.db"
    assert store_main(["import", "--db", after, f]) == 0  # failed with argparse: "unrecognized arguments: --db"
    assert store_main(["--db", before, "import", f]) == 0
    assert store_main(["import", f, "--db", f"sqlite:///{tmp_path}/last.db"]) == 0
    rows = _exported(tmp_path, after, "a.jsonl")
    assert len(rows) == 3 and rows == _exported(tmp_path, before, "b.jsonl")
    assert rows == _exported(tmp_path, f"sqlite:///{tmp_path}/last.db", "c.jsonl")
    assert not (tmp_path / "data").exists()
    assert "3 comparisons" in capsys.readouterr().out


def test_store_kebab_case_works_with_a_warning(tmp_path, caplog, capsys):
    url = f"sqlite:///{tmp_path}/s.db"
    f = _pairs(tmp_path / "p.jsonl", n=4)
    assert store_main(["import", f, "--db", url, "--max-text-bytes", "1000", "--limit", "2"]) == 0
    assert "'--max-text-bytes' is deprecated, use '--max_text_bytes'" in caplog.text
    out = tmp_path / "o.jsonl"
    assert store_main(["export", "--db", url, str(out), "--test-fraction", "0.0", "--kinds", "rule"]) == 0
    assert len(out.read_text().splitlines()) == 2  # --limit 2 took two records
    assert store_main(["export", "--db", url, str(out), "--kinds", "human"]) == 0  # a one-word list
    assert out.read_text() == ""  # the dataset's labels are by a rule labeller, none by humans
    capsys.readouterr()


def test_store_errors_name_the_key_and_verb_help_lists_its_keys(tmp_path, capsys):
    url = f"sqlite:///{tmp_path}/s.db"
    with pytest.raises(SystemExit) as e:
        store_main(["export", "--db", url, "--min_label", "2"])
    assert e.value.code == 2
    assert capsys.readouterr().err == ("error: command line: unknown key 'min_label' "
                                       "(did you mean 'min_labels'?)\n")
    with pytest.raises(SystemExit) as e:
        store_main(["export", "--db", url, "--kinds", "robot"])
    assert "key 'kinds' expects list[Literal['human', 'ai', 'rule']] | None, got 'robot'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        store_main(["imprt", "x.jsonl"])
    assert "expected a verb (init, import, export" in capsys.readouterr().err

    with pytest.raises(SystemExit) as e:
        store_main(["import", "--help", "--db", url])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m align.store import FILES...")
    for key in ("--db str", "FILES list[str] (required)", "--skip_bad bool (default: False)", "--limit int | None"):
        assert key in out
    assert "--min_labels" not in out  # export's, not import's
    with pytest.raises(SystemExit):
        store_main(["--help"])
    out = capsys.readouterr().out
    assert "annotators set-role" in out and "import" in out and "export labelled pairs" in out


def test_store_annotator_verbs_take_positionals_anywhere(tmp_path, capsys):
    url = f"sqlite:///{tmp_path}/s.db"
    assert store_main(["annotators", "add", "--db", url, "--kind", "ai", "judge"]) == 0
    assert store_main(["annotators", "set-role", "judge", "--db", url, "admin"]) == 0
    assert store_main(["--db", url, "annotators", "list"]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if "judge" in x][-1]  # the list, after "added judge"
    assert line.split()[1:4] == ["judge", "ai", "admin"]
    with pytest.raises(SystemExit):
        store_main(["annotators", "set-role", "judge", "--db", url, "king"])
    assert "key 'role' expects Literal['admin', 'annotator'], got 'king'" in capsys.readouterr().err


# ------------------------------------------------------------- parse_verb on its own
@dataclass(kw_only=True)
class Copy:
    """copy SRC to DST"""

    src: str = field(metadata={"positional": True})
    dst: str = field(metadata={"positional": True})
    min_size: int = field(default=0, metadata={"help": "smallest file", "aliases": ["min_bytes"]})
    force: bool = False


@dataclass(kw_only=True)
class Remove:
    """remove FILES"""

    files: list[str] = field(metadata={"positional": True})
    force: bool = False


VERBS = {"copy": Copy, "remove": Remove}


def test_positionals_and_options_in_any_order():
    for argv in (["copy", "a", "b", "--min_size", "3", "--force"], ["--force", "copy", "a", "--min_size=3", "b"],
                 ["copy", "--min_size", "3", "a", "--force", "true", "b"]):
        verb, args = parse_verb(VERBS, argv, prog="cmd")
        assert verb == "copy" and (args.src, args.dst, args.min_size, args.force) == ("a", "b", 3, True), argv
    verb, args = parse_verb(VERBS, ["remove", "x", "--force", "y", "z"], prog="cmd")  # --force: a bare flag here
    assert verb == "remove" and args.files == ["x", "y", "z"] and args.force is True


def test_verb_alias_and_kebab_warn_and_both_names_is_an_error(caplog):
    _, args = parse_verb(VERBS, ["copy", "a", "b", "--min_bytes", "5"], prog="cmd")
    assert args.min_size == 5 and "'--min_bytes' is deprecated, use '--min_size'" in caplog.text
    _, args = parse_verb(VERBS, ["copy", "a", "b", "--min-size", "6"], prog="cmd")
    assert args.min_size == 6 and "'--min-size' is deprecated, use '--min_size'" in caplog.text
    with pytest.raises(ConfigError, match="'min_bytes' and 'min_size' are the same key 'min_size'"):
        parse_verb(VERBS, ["copy", "a", "b", "--min_bytes", "5", "--min_size", "6"], prog="cmd")


def test_verb_errors_name_what_is_wrong():
    with pytest.raises(ConfigError, match=r"cmd copy needs DST"):
        parse_verb(VERBS, ["copy", "a"], prog="cmd")
    with pytest.raises(ConfigError, match=r"unexpected argument 'c' for cmd copy"):
        parse_verb(VERBS, ["copy", "a", "b", "c"], prog="cmd")
    with pytest.raises(ConfigError, match=r"unknown key 'sise' \(did you mean 'min_size'\?\)|unknown key 'sise'"):
        parse_verb(VERBS, ["copy", "a", "b", "--sise", "1"], prog="cmd")
    with pytest.raises(ConfigError, match=r"key 'min_size' expects int, got 'big'"):
        parse_verb(VERBS, ["copy", "a", "b", "--min_size", "big"], prog="cmd")
    with pytest.raises(ConfigError, match=r"expected a verb \(copy, remove\); got 'move'"):
        parse_verb(VERBS, ["move", "a", "b"], prog="cmd")


def test_verb_help_and_the_list_of_verbs(capsys):
    with pytest.raises(SystemExit) as e:
        parse_verb(VERBS, ["copy", "--help"], prog="cmd")
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: cmd copy SRC DST [--key value ...]")
    assert "--min_size int (default: 0; old name: min_bytes)\n      smallest file" in out
    with pytest.raises(SystemExit):
        parse_verb(VERBS, ["-h"], prog="cmd")
    out = capsys.readouterr().out
    assert "copy    copy SRC to DST" in out and "remove  remove FILES" in out


# ------------------------------------------------------------- the other commands
def test_score_and_convert_and_bench_parse_their_verbs(caplog, capsys):
    from align import convert, score

    verb, a = parse_verb(score.VERBS, ["--model", "A", "B", "--input", "in.jsonl", "--batch-size", "8"],
                         prog="p", default="score")
    assert verb == "score" and a.model == ["A", "B"] and a.batch_size == 8
    assert "'--batch-size' is deprecated, use '--batch_size'" in caplog.text
    verb, a = parse_verb(score.VERBS, ["--input", "in.jsonl", "rank", "--model", "A"], prog="p", default="score")
    assert verb == "rank" and a.model == ["A"]
    with pytest.raises(ConfigError, match="rank needs --input FILE"):
        parse_verb(score.VERBS, ["rank", "--model", "A"], prog="p", default="score")
    verb, a = parse_verb(convert.VERBS, ["merge", "--base", "B", "ad", "out"], prog="p")
    assert (verb, a.src, a.dst, a.base) == ("merge", "ad", "out", "B")

    from align.bench.__main__ import main as bench_main

    with pytest.raises(SystemExit) as e:
        bench_main(["model", "--size", "huge"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "size must be one of ['medium', " in err and "got 'huge'" in err
    assert bench_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "python -m align.bench store: preference-store throughput" in out and "\n  model " in out
    assert bench_main(["nope"]) == 2 and "expected a bench (" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # options before the bench's name reach the bench
        bench_main(["--size", "huge", "score"])
    assert e.value.code == 2 and "size must be one of" in capsys.readouterr().err


def test_generate_keeps_a_prompt_verbatim(capsys):
    from align.config import parse
    from align.generate import GenerateArgs

    (a,) = parse([GenerateArgs], ["--model", "m", "--prompt", "Q: 3 + 4? [a, b]", "--max-new-tokens", "5"])
    assert a.prompt == "Q: 3 + 4? [a, b]" and a.max_new_tokens == 5
    with pytest.raises(ConfigError, match="give --input FILE or --prompt TEXT"):
        parse([GenerateArgs], ["--model", "m"])


def test_store_export_old_seed_name_is_split_seed(tmp_path, caplog, capsys):
    url = f"sqlite:///{tmp_path}/s.db"
    assert store_main(["import", _pairs(tmp_path / "p.jsonl", n=20), "--db", url]) == 0
    split = {}
    for name in ("seed", "split_seed"):
        out = tmp_path / f"{name}.jsonl"
        assert store_main(["export", str(out), "--db", url, "--test_fraction", "0.5", f"--{name}", "s1"]) == 0
        split[name] = (tmp_path / f"{name}.test.jsonl").read_text()
    assert split["seed"] == split["split_seed"] and 0 < len(split["seed"].splitlines()) < 20
    assert "'--seed' is deprecated, use '--split_seed'" in caplog.text
    with pytest.raises(SystemExit):
        store_main(["export", "--db", url, "--seed", "a", "--split_seed", "b"])
    assert "'seed' and 'split_seed' are the same key 'split_seed'" in capsys.readouterr().err


def test_a_missing_required_key_is_named(capsys):
    from align import generate

    with pytest.raises(SystemExit) as e:
        generate.main(["--prompt", "hi"])
    assert e.value.code == 2 and capsys.readouterr().err == (
        "error: command line: GenerateArgs needs --model_name_or_path\n")
