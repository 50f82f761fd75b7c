import random
import re

import pytest

from align.data import world as W
from align.data.world import STYLES, TASKS, VOCAB, World, check, parse_reply, render

N = dict(n_pretrain=2000, n_sft=800, n_preference=600, n_rl=200, n_heldout=220)


@pytest.fixture(scope="module")
def world():
    return World(seed=0, **N)


def _train_texts(w):
    texts = list(w.pretrain_corpus())
    for c in w.sft_conversations():
        texts += [m["content"] for m in c["messages"]]
    for p in w.preference_pairs():
        texts += [m["content"] for k in ("prompt", "chosen", "rejected") for m in p[k]]
    texts += [e.prompt for e in w.rl_prompts()]
    return texts


def test_vocab_split_disjoint():
    tr, ho = VOCAB["train"], VOCAB["heldout"]
    for attr in ("words", "names", "objects"):
        a, b = set(getattr(tr, attr)), set(getattr(ho, attr))
        assert a and b and not a & b, attr
    assert len(tr.words) + len(ho.words) >= 300


def test_deterministic(world, tmp_path):
    other = World(seed=0, **N)
    assert other.pretrain_corpus() == world.pretrain_corpus()
    assert other.sft_conversations() == world.sft_conversations()
    assert other.preference_pairs() == world.preference_pairs()
    assert [e.to_dict() for e in other.eval_prompts()] == [e.to_dict() for e in world.eval_prompts()]
    assert World(seed=1, **N).sft_conversations() != world.sft_conversations()
    a, b = tmp_path / "a", tmp_path / "b"
    World(seed=3, **N).write(a)
    World(seed=3, **N).write(b)
    for f in sorted(a.iterdir()):
        assert f.read_bytes() == (b / f.name).read_bytes(), f.name


def test_every_task_has_examples(world):
    ev = world.eval_prompts()
    for name in TASKS:
        assert sum(e.task == name for e in ev) >= 10, name
        assert any(e.task == name for e in world.rl_prompts())
    assert {t for c in world.sft_conversations() for t in c["tasks"]} == set(TASKS)
    assert {p["task"] for p in world.preference_pairs()} == set(TASKS)


@pytest.mark.parametrize("task", list(TASKS))
def test_checker_accepts_correct_rejects_incorrect(task):
    rng = random.Random(task)
    for split in ("train", "heldout"):
        for i in range(40):
            prompt, answer, meta = TASKS[task].generate(rng, VOCAB[split])
            ex = W.Example(f"{task}-{i}", task, prompt, answer, split, meta)
            for style in STYLES:
                for t in range(len(W.STYLE_TEMPLATES[style])):
                    good = render(ex, style, True, rng, template=t)
                    bad = render(ex, style, False, rng, template=t)
                    for suffix in ("", "<|eos|>", "  \n", "<|eos|><|pad|><|pad|>"):
                        r = check(ex, good + suffix)
                        assert r == {"correct": True, "style": style, "preferred": style == "helpful",
                                     "answer_correct": True}, (good, r)
                        assert parse_reply(good + suffix) == (answer, style)
                    r = check(ex, bad)
                    assert r["style"] == style and not r["correct"] and not r["preferred"], (ex, bad)
                    assert not r["answer_correct"], (ex, bad)
                    assert parse_reply(bad)[0] != answer


def test_final_answer_reads_free_text_replies():
    # how SmolLM2-135M-Instruct answers the world's prompts: right or wrong, the answer is in its own words
    assert W.final_answer("She has 9 + 5 = 14 crayons.\nNora has 14 crayons now.", "14") == "14"
    assert W.final_answer("9 - 7 = 2 crayons, so 2 are left. This is a class", "2") == "2"
    assert W.final_answer('The last letter of "girl" is "g".', "l") == "g"
    assert W.final_answer("Sorted: 2, 6, 8.", "2 6 8") == "2 6 8"
    assert W.final_answer("Reversed, r o p e reads e-p-o-r", "e p o r") == "e p o r"
    assert W.final_answer("I cannot count that.", "3") is None
    ex = W.Example("x", "add", "What is 9 + 5?", "14", "heldout")
    assert check(ex, "9 + 5 = 14.") == {"correct": False, "style": "terse", "preferred": False,
                                        "answer_correct": True}
    assert not check(ex, "9 + 5 = 15.")["answer_correct"]


def test_parse_reply_edge_cases():
    assert parse_reply("") == (None, None)
    assert parse_reply("<|eos|>") == (None, None)
    assert parse_reply("The answer is") == (None, "helpful")
    assert parse_reply("Ugh whatever") == (None, "rude")
    assert parse_reply("7 ") == ("7", "terse")


def test_styles_decided_by_first_word():
    firsts = {style: {p.split(" ")[0] for p, _ in ts} for style, ts in W.STYLE_TEMPLATES.items() if style != "terse"}
    assert firsts == {"helpful": {"The"}, "rude": {"Ugh,"}}


def test_heldout_never_in_training(world):
    ev = world.eval_prompts()
    assert len({e.prompt for e in ev}) == len(ev) and all(e.split == "heldout" for e in ev)
    texts = _train_texts(world)
    joined = "\n".join(texts)
    for e in ev:
        assert e.prompt not in joined
    train_tokens = set(re.findall(r"[A-Za-z]+", joined))
    ho = VOCAB["heldout"]
    assert not train_tokens & (set(ho.words) | set(ho.names) | set(ho.objects))
    # every held-out prompt uses held-out vocabulary or a held-out digit triple
    ho_all = set(ho.words) | set(ho.names) | set(ho.objects)
    for e in ev:
        if e.task == "sort_digits":
            assert W._triple_heldout(tuple(e.meta["digits"]))
        elif e.task in ("reverse_letters", "count_letters"):  # spelled-out held-out word
            letters = e.prompt.rstrip(".?").split(" in ")[-1].split("letters ")[-1]
            assert "".join(letters.split()) in ho.words, e.prompt
        else:
            assert set(re.findall(r"[A-Za-z]+", e.prompt)) & ho_all, e.prompt


def test_fresh_words_for_rl(world):
    """RL prompts over made-up words: new to every data set, never a held-out word or prompt, still checkable."""
    fresh = W.fresh_words(3000)
    assert W.fresh_words(5000)[:3000] == fresh and len(set(fresh)) == 3000  # more words extend the list
    assert all(3 <= len(w) <= 6 and w.isalpha() and w.islower() for w in fresh)
    known = set(W.ALL_WORDS) | set(W.PSEUDO_WORDS) | {n.lower() for n in W.ALL_NAMES} | set(W.ALL_OBJECTS)
    assert not set(fresh) & known
    assert [e.prompt for e in world.rl_prompts(60, fresh=0)] == [e.prompt for e in world.rl_prompts(60)]

    exs = world.rl_prompts(900, fresh=3000)
    used = {w for e in exs for w in e.meta.get("words", [e.meta.get("word") or "".join(e.meta.get("letters", ""))])}
    assert len(used & set(fresh)) > 200  # the word tasks mostly meet fresh words
    assert not {e.prompt for e in exs} & {e.prompt for e in world.eval_prompts()}
    assert not set(re.findall(r"[a-z]+", " ".join(e.prompt for e in exs))) & set(VOCAB["heldout"].words)
    for e in exs:  # the rule rewards still check them
        assert check(e, render(e, "helpful"))["preferred"]
        assert not check(e, render(e, "helpful", correct=False))["correct"]


def test_preference_pairs(world):
    pairs = world.preference_pairs()
    kinds = {p["kind"] for p in pairs}
    assert kinds == {"style", "correctness"}
    sft_prompts = {m["content"] for c in world.sft_conversations() for m in c["messages"] if m["role"] == "user"}
    for p in pairs:
        ex = W.Example(p["id"], p["task"], p["prompt"][-1]["content"], p["answer"], "train")
        assert ex.prompt not in sft_prompts
        c, r = check(ex, p["chosen"][-1]["content"]), check(ex, p["rejected"][-1]["content"])
        if p["kind"] == "style":
            assert c["correct"] and r["correct"]
            assert c["style"] == "helpful" and r["style"] in ("terse", "rude")
        else:
            assert c["correct"] and not r["correct"]
            assert c["style"] == r["style"]
        assert c["preferred"] and not r["preferred"] or p["kind"] == "correctness"


def test_sft_mix(world):
    convs = world.sft_conversations()
    styles = [check_style for c in convs for m in c["messages"] if m["role"] == "assistant"
              for check_style in [parse_reply(m["content"])[1]]]
    for s in STYLES:
        assert 0.25 < styles.count(s) / len(styles) < 0.42
    assert any(c["messages"][0]["role"] == "system" for c in convs)
    assert any(sum(m["role"] == "assistant" for m in c["messages"]) == 2 for c in convs)


def test_reward():
    ex = W.Example("x", "add", "What is 3 + 4?", "7", "train", {"a": 3, "b": 4})
    assert W.reward(ex, "The answer is 7.") == 1.0
    assert W.reward(ex, "7") == 0.5
    assert W.reward(ex, "Ugh, 8. Stop wasting my time.") == 0.0


def test_cli(tmp_path):
    W.main(["--out", str(tmp_path / "w"), "--seed", "1"])
    names = {p.name for p in (tmp_path / "w").iterdir()}
    assert {"pretrain.jsonl", "sft.jsonl", "preference.jsonl", "eval.jsonl", "rl_prompts.jsonl", "world.json"} <= names
