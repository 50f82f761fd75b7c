"""align.data.formats: readers for SFT and preference data (no torch)."""

from __future__ import annotations

import ast
import gzip
import json
from pathlib import Path

import pytest

from align.data.formats import DataError, detect_preference, location, read_records, to_conversation, to_preference

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PREF = SHARED / "preference"
needs_shared = pytest.mark.skipif(not PREF.exists(), reason="../shared/data not present")


def u(t):
    return {"role": "user", "content": t}


def a(t):
    return {"role": "assistant", "content": t}


def test_no_torch_imports():
    """Layering: the readers and the store import neither torch nor transformers; the store's command line
    (align/store/__main__.py) also uses the one CLI parser, align.config, which imports torch only lazily."""
    root = Path(__file__).resolve().parents[1] / "align"
    files = [root / "data" / "formats.py", root / "data" / "prompts.py", *sorted((root / "store").glob("*.py")),
             root / "config.py"]
    for f in files:
        allowed = ("align.data", "align.store", *(("align.config",) if f.name == "__main__.py" else ()))
        tree = ast.parse(f.read_text())
        for node in tree.body if f.name == "config.py" else ast.walk(tree):  # config.py: lazy imports allowed
            names = ([n.name for n in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for n in names:
                assert n.split(".")[0] not in ("torch", "transformers", "trl"), (f, n)
                if n.startswith("align."):
                    assert n.startswith(allowed), (f, n)


# ------------------------------------------------------------------------------------ reading
def test_read_json_jsonl_gz(tmp_path):
    recs = [{"x": i} for i in range(3)]
    (tmp_path / "a.json").write_text(json.dumps(recs))
    (tmp_path / "b.jsonl").write_text("\n".join(map(json.dumps, recs)) + "\n\n")
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        f.write("\n".join(map(json.dumps, recs)))
    with gzip.open(tmp_path / "d.json.gz", "wt") as f:
        f.write(json.dumps(recs))
    (tmp_path / "e.json").write_text("\n".join(map(json.dumps, recs)))  # JSON Lines named .json
    assert list(read_records(tmp_path / "a.json")) == [(0, {"x": 0}), (1, {"x": 1}), (2, {"x": 2})]
    assert list(read_records(tmp_path / "b.jsonl")) == [(1, {"x": 0}), (2, {"x": 1}), (3, {"x": 2})]
    assert [r for _, r in read_records(tmp_path / "c.jsonl.gz")] == recs
    assert [r for _, r in read_records(tmp_path / "d.json.gz")] == recs
    assert [r for _, r in read_records(tmp_path / "e.json")] == recs
    assert location(tmp_path / "b.jsonl", 3).endswith("b.jsonl:3")
    assert location(tmp_path / "a.json", 3).endswith("a.json[3]")


def test_read_datasets_dir(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"prompt": "p", "chosen": "c", "rejected": "r"}] * 2) \
        .save_to_disk(str(tmp_path / "ds"))
    got = list(read_records(tmp_path / "ds"))
    assert got == [(0, {"prompt": "p", "chosen": "c", "rejected": "r"}),
                   (1, {"prompt": "p", "chosen": "c", "rejected": "r"})]


def test_malformed_json_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"a": 1}\n{"a": 2}\n{"a": \n')
    with pytest.raises(DataError, match=r"bad.jsonl:3: malformed JSON"):
        list(read_records(p))
    q = tmp_path / "bad.json"
    q.write_text('[\n{"a": 1},\n{"a" 2}\n]')
    with pytest.raises(DataError, match=r"bad.json:3: malformed JSON"):
        list(read_records(q))
    r = tmp_path / "list.jsonl"
    r.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"list.jsonl:2: expected a JSON object"):
        list(read_records(r))
    with pytest.raises(DataError, match="no such file"):
        list(read_records(tmp_path / "missing.jsonl"))
    assert issubclass(DataError, ValueError)


# --------------------------------------------------------------------------------- preference
def test_trl_standard_and_conversational():
    assert to_preference({"prompt": "Q", "chosen": "good", "rejected": "bad"}) == {
        "prompt": [u("Q")], "chosen": [a("good")], "rejected": [a("bad")]}
    rec = {"prompt": [u("Q")], "chosen": [a("good")], "rejected": [a("bad")]}
    assert to_preference(rec) == rec


def test_implicit_prompt():
    rec = {"chosen": [u("Q"), a("good")], "rejected": [u("Q"), a("bad")]}
    assert to_preference(rec) == {"prompt": [u("Q")], "chosen": [a("good")],
                                  "rejected": [a("bad")]}
    assert detect_preference(rec) == "implicit"
    out = to_preference({"chosen": "The sky is blue.", "rejected": "The sky is green."})
    assert out["prompt"] == [u("The sky is ")]
    assert out["chosen"] == [a("blue.")] and out["rejected"] == [a("green.")]


def test_hh_split_multi_turn():
    c = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Joke?\n\nAssistant: Why did..."
    r = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Joke?\n\nAssistant: No."
    out = to_preference({"chosen": c, "rejected": r}, "hh.jsonl:1")
    assert out == {"prompt": [u("Hi"), a("Hello!"), u("Joke?")], "chosen": [a("Why did...")],
                   "rejected": [a("No.")]}
    # transcripts that diverge earlier keep every later turn in the completions
    c2 = "\n\nHuman: Q\n\nAssistant: A1\n\nHuman: more\n\nAssistant: A2"
    r2 = "\n\nHuman: Q\n\nAssistant: B1"
    out = to_preference({"chosen": c2, "rejected": r2})
    assert out["prompt"] == [u("Q")]
    assert out["chosen"] == [a("A1"), u("more"), a("A2")] and out["rejected"] == [a("B1")]


def test_alpaca_sharegpt_ultrafeedback():
    out = to_preference({"instruction": "Fix", "input": "teh", "chosen": "the", "rejected": "no"})
    assert out["prompt"] == [u("Fix\n\nteh")]
    out = to_preference({"instruction": "Say hi", "input": "", "chosen": "hi", "rejected": "no"})
    assert out["prompt"] == [u("Say hi")]
    rec = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"}],
           "chosen": {"from": "gpt", "value": "good"}, "rejected": {"from": "gpt", "value": "bad"}}
    assert to_preference(rec) == {"prompt": [{"role": "system", "content": "S"}, u("Q")],
                                  "chosen": [a("good")], "rejected": [a("bad")]}
    uf = {"prompt": "Q", "completions": [
        {"model": "m1", "response": "ok", "overall_score": 6.5},
        {"model": "m2", "response": "best", "overall_score": 9},
        {"model": "m3", "response": "worst", "annotations": {"helpfulness": {"Rating": "2"},
                                                             "honesty": {"Rating": "N/A"}}}]}
    out = to_preference(uf)
    assert out["chosen"] == [a("best")] and out["rejected"] == [a("worst")]
    assert (out["chosen_model"], out["rejected_model"]) == ("m2", "m3")
    binarized = {"prompt": "Q", "chosen": [u("Q"), a("good")], "rejected": [u("Q"), a("bad")],
                 "score_chosen": 8.0, "score_rejected": 3.0}
    out = to_preference(binarized)
    assert out["prompt"] == [u("Q")] and out["chosen"] == [a("good")]
    assert out["score_chosen"] == 8.0
    with pytest.raises(DataError, match="every completion scores"):
        to_preference({"prompt": "Q", "completions": [{"response": "x", "overall_score": 1},
                                                      {"response": "y", "overall_score": 1}]})


@pytest.mark.parametrize("rec,match", [
    ({"prompt": "Q", "chosen": "c"}, "not a preference record"),
    ({"prompt": "Q", "chosen": 3, "rejected": "r"}, "field 'chosen'"),
    ({"prompt": [{"role": "wizard", "content": "x"}], "chosen": "c", "rejected": "r"},
     "prompt\\[0\\].role: unknown role 'wizard'"),
    ({"conversations": [{"from": "alien", "value": "x"}], "chosen": "c", "rejected": "r"},
     "unknown speaker"),
    ({"prompt": "Q", "chosen": [u("c")], "rejected": "r"}, "must start with an assistant"),
    ({"instruction": 5, "chosen": "c", "rejected": "r"}, "field 'instruction'"),
])
def test_bad_preference_records(rec, match):
    with pytest.raises(DataError, match="f.jsonl:7: .*" + match):
        to_preference(rec, "f.jsonl:7")


# ------------------------------------------------------------------------------------------ SFT
def test_to_conversation_formats():
    assert to_conversation({"messages": [u("Q"), a("A")]}) == [u("Q"), a("A")]
    assert to_conversation({"conversations": [{"from": "human", "value": "Q"},
                                              {"from": "gpt", "value": "A"}]}) == [u("Q"), a("A")]
    assert to_conversation({"prompt": "Q", "completion": "A"}) == [u("Q"), a("A")]
    assert to_conversation({"prompt": [u("Q")], "completion": [a("A")]}) == [u("Q"), a("A")]
    assert to_conversation({"instruction": "Do", "input": "x", "output": "done"}) == [
        u("Do\n\nx"), a("done")]


@pytest.mark.parametrize("rec,match", [
    ({"text": "hello"}, "no messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "unknown role 'robot'"),
    ({"messages": [u("Q"), a("  ")]}, "message 1 \\(assistant\\) is empty"),
    ({"messages": [u("Q")]}, "no assistant turn"),
    ({"messages": []}, "empty list"),
    ({"instruction": "Do", "output": ""}, "is empty"),
])
def test_bad_conversations(rec, match):
    with pytest.raises(DataError, match="sft.json\\[4\\]: .*" + match):
        to_conversation(rec, "sft.json[4]")


# ------------------------------------------------------------------------------- shared data
@needs_shared
def test_sft_file_loads_as_is():
    path = SHARED / "sft" / "instruction-data.json"
    convs = [to_conversation(r, location(path, k)) for k, r in read_records(path)]
    assert len(convs) == 1100
    assert all(c[-1]["role"] == "assistant" and c[-1]["content"] for c in convs)


@needs_shared
@pytest.mark.parametrize("name,n", [("instruction-data-with-preference.json", 1100),
                                    ("dpo_en_demo.json", 300),
                                    ("hh-helpful-base-test.jsonl.gz", 2354)])
def test_preference_files_load_as_is(name, n):
    path = PREF / name
    prefs = [to_preference(r, location(path, k)) for k, r in read_records(path)]
    assert len(prefs) == n
    for p in prefs:
        assert p["chosen"][0]["role"] == p["rejected"][0]["role"] == "assistant"
        assert not p["prompt"] or p["prompt"][-1]["role"] == "user"
