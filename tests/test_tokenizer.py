import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from align.data.chat import BOS, EOS, ROLE_TOKENS, SPECIAL_TOKENS, render_chat
from align.tokenizer import TokenizerArguments, iter_corpus, main, train_tokenizer


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(TokenizerArguments(corpus="world", vocab_size=400, max_documents=3000, output_dir=str(out)))
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    return AutoTokenizer.from_pretrained(str(tok_dir))


CHATS = [
    [{"role": "user", "content": "What is 3 + 4?"}, {"role": "assistant", "content": "The answer is 7."}],
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Repeat the word cat 2 times."},
        {"role": "assistant", "content": "cat cat"},
        {"role": "user", "content": "Sort the digits 3 1 2. 中文 🙂"},
        {"role": "assistant", "content": "Ugh, 1 2 3. Stop wasting my time."},
    ],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
     {"role": "assistant", "content": ""}, {"role": "user", "content": " spaced  out "},
     {"role": "assistant", "content": "  leading spaces and 12345\n"}],
]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text())
def test_roundtrip_any_unicode(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text


@pytest.mark.parametrize("text", ["人工智能是计算机科学的一个分支", "emoji 🙂👍🏽 and\ttabs\n\nnewlines",
                                  "  x  ", "\x00\u200b"])
def test_roundtrip_samples(tok, text):
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_tokenizer_files(tok_dir, tok):
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert (cfg["bos_token"], cfg["eos_token"], cfg["pad_token"], cfg["unk_token"]) == tuple(SPECIAL_TOKENS[:4])
    for t in SPECIAL_TOKENS:
        assert t in tok.all_special_tokens
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert len(tok) == 400
    assert tok.padding_side == "right"
    assert tok.chat_template and "{% generation %}" in tok.chat_template
    stats = json.loads((tok_dir / "stats.json").read_text())
    assert stats["bytes_per_token"]["chinese_sample"] > 0 and stats["bytes_per_token"]["english_c4_demo"] > 0
    assert (tok_dir / "config.yaml").exists()


def test_no_bos_added_on_encode(tok):
    assert tok("hello world")["input_ids"] == tok("hello world", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("chat", CHATS)
def test_chat_template_single_bos(tok, chat):
    text = tok.apply_chat_template(chat, tokenize=False)
    assert text == render_chat(chat)
    for ids in (tok(text)["input_ids"], tok.apply_chat_template(chat, return_dict=True)["input_ids"]):
        assert ids[0] == tok.bos_token_id
        assert ids.count(tok.bos_token_id) == 1


def test_generation_prompt(tok):
    text = tok.apply_chat_template(CHATS[0][:1], tokenize=False, add_generation_prompt=True)
    assert text == BOS + ROLE_TOKENS["user"] + "What is 3 + 4?" + EOS + ROLE_TOKENS["assistant"]


def _expected_ids_and_mask(tok, chat):
    """Independent of the template: special tokens split the text, so encode piece by piece."""
    def enc(s):
        return tok(s, add_special_tokens=False)["input_ids"] if s else []

    ids, mask = [tok.bos_token_id], [0]
    for m in chat:
        role = [tok.convert_tokens_to_ids(ROLE_TOKENS[m["role"]])]
        body = enc(m["content"]) + [tok.eos_token_id]
        ids += role + body
        mask += [0] + [int(m["role"] == "assistant")] * len(body)
    return ids, mask


@pytest.mark.parametrize("chat", CHATS)
def test_assistant_mask(tok, chat):
    out = tok.apply_chat_template(chat, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = _expected_ids_and_mask(tok, chat)
    assert out["input_ids"] == ids
    assert out["assistant_masks"] == mask
    # the masked tokens decode to exactly the assistant contents, each followed by eos
    masked = tok.decode([i for i, m in zip(ids, mask) if m])
    assert masked == "".join(m["content"] + EOS for m in chat if m["role"] == "assistant")


def test_digits_split(tok):
    ids = tok("12345 and 2024", add_special_tokens=False)["input_ids"]
    toks = [tok.decode([i]) for i in ids]
    digits = [t.strip() for t in toks if any(c.isdigit() for c in t)]
    assert digits == list("12345") + list("2024")


def test_train_on_text_and_jsonl(tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_text("the cat sat on the mat 123\n" * 50 + "猫坐在垫子上\n" * 20)
    jl = tmp_path / "c.jsonl"
    jl.write_text("".join(json.dumps({"body": f"doc {i}: the dog ran to the park"}) + "\n" for i in range(40)))
    for corpus, field in ((txt, "text"), (jl, "body")):
        out = tmp_path / f"out_{corpus.suffix[1:]}"
        t = train_tokenizer(TokenizerArguments(corpus=str(corpus), text_field=field, vocab_size=300,
                                               output_dir=str(out)))
        r = AutoTokenizer.from_pretrained(str(out))
        s = "the cat sat 猫 🙂"
        assert r.decode(r(s)["input_ids"]) == s == t.decode(t(s)["input_ids"])
        assert len(r) > 263  # learned some merges
    assert list(iter_corpus(str(jl), "body"))[3] == "doc 3: the dog ran to the park"


def test_bad_jsonl_names_line(tmp_path):
    jl = tmp_path / "bad.jsonl"
    jl.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2.*'text'"):
        list(iter_corpus(str(jl)))


def test_arguments_validate():
    with pytest.raises(ValueError, match="vocab_size"):
        TokenizerArguments(vocab_size=100)
    with pytest.raises(ValueError, match="no such file"):
        TokenizerArguments(corpus="/nonexistent/file.txt")


def test_main_with_config(tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_text("hello there, general kenobi\n" * 30)
    cfg = tmp_path / "tok.yaml"
    cfg.write_text(f"corpus: {txt}\nvocab_size: 280\noutput_dir: {tmp_path / 'out'}\n")
    tok = main([str(cfg), "--vocab_size", "290"])
    assert len(tok) <= 290 and (tmp_path / "out" / "tokenizer.json").exists()
