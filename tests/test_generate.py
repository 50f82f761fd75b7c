"""align.generate's command: replies for a prompts file, ready for best-of-n with align.score rank."""

from __future__ import annotations

import json

import pytest

from align import generate as G
from align import score
from align.models import load, load_tokenizer


def test_generate_then_rank_best_of_n(tiny_lm_dir, tiny_rm_dir, tmp_path, capsys):
    prompts = ["What is 3 + 4?", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]]
    inp, cands, best = tmp_path / "p.jsonl", tmp_path / "c.jsonl", tmp_path / "b.jsonl"
    inp.write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n" for i, p in enumerate(prompts)))
    G.main(["--model", tiny_lm_dir, "--input", str(inp), "--output", str(cands), "--num_return_sequences", "3",
            "--do_sample", "--max_new_tokens", "6", "--seed", "1", "--device", "cpu"])
    rows = [json.loads(line) for line in cands.read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1] and all(len(r["responses"]) == 3 for r in rows)
    model, tok = load(tiny_lm_dir, device="cpu"), load_tokenizer(tiny_lm_dir)
    same = G.generate(model, tok, prompts, max_new_tokens=6, do_sample=True, num_return_sequences=3, seed=1)
    assert [r["responses"] for r in rows] == same  # the library's replies, seeded alike

    # best-of-n on what it wrote: every response ranked by the reward model, best first
    score.main(["rank", "--model", tiny_rm_dir, "--input", str(cands), "--output", str(best), "--device", "cpu"])
    ranked = [json.loads(line) for line in best.read_text().splitlines()]
    for r, c in zip(ranked, rows):
        assert sorted(x["response"] for x in r["responses"]) == sorted(c["responses"])
        assert r["best"] == r["responses"][0]["response"]

    G.main(["--model", tiny_lm_dir, "--prompt", "What is 3 + 4?", "--max_new_tokens", "6", "--device", "cpu"])
    greedy = G.generate(model, tok, ["What is 3 + 4?"], max_new_tokens=6)[0][0]
    assert capsys.readouterr().out.rstrip("\n").endswith(greedy)


def test_generate_bad_input_names_the_line(tiny_lm_dir, tmp_path, capsys):
    inp = tmp_path / "p.jsonl"
    inp.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"question": "no prompt"}) + "\n")
    assert G.main(["--model", tiny_lm_dir, "--input", str(inp), "--device", "cpu"]) == 2
    assert f"{inp}:2: need a 'prompt'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # several greedy replies would be one reply n times
        G.main(["--model", tiny_lm_dir, "--prompt", "hi", "--num_return_sequences", "2"])
