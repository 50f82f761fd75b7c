"""The built-in task world: small verifiable tasks every training stage can be measured on.

Each task makes a prompt with a reference answer from a seeded RNG and a vocabulary. Replies are
rendered in one of three styles -- ``helpful`` ("The answer is 7."), ``terse`` ("7") and ``rude``
("Ugh, 7. Stop wasting my time.") -- correct or plausibly wrong, so both "is it right?" and "is it
the preferred behaviour?" (right *and* helpful) are decided by rule. The style is decided by the
first token of a reply: helpful replies start with "The", rude ones with "Ugh", terse ones with the
answer itself.

Held-out prompts are truly unseen: the word, name and object lists are split once (independent of
the seed) into train and held-out parts; held-out prompts use only held-out words/names/objects
(arithmetic and comparisons as word problems with held-out names and objects; digit sorting with
held-out digit triples), and training data never contains a held-out word.

    world = World(seed=0)
    world.pretrain_corpus()      # list[str], plain-text documents
    world.sft_conversations()    # list[{"messages": [...]}]
    world.preference_pairs()     # list[{"prompt", "chosen", "rejected", "kind", "task", ...}]
    world.eval_prompts(300)      # list[Example], split="heldout"
    check(example, reply)        # {"correct", "style", "preferred", "answer_correct"}

    python -m align.data.world --out data/generated/world --seed 0
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import itertools
import json
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

STYLES = ("helpful", "terse", "rude")
PREFERRED_STYLE = "helpful"

# --------------------------------------------------------------------------------------------------
# Vocabulary (built in; lower-case nouns/adjectives of 3-6 letters, names, plural objects)

_WORDS = """
ant ape arm art axe bag bat bay bed bee bell belt bike bird boat bone book boot bowl box boy
bread brick bus cake calf camp cap car card cart cat cave chair chalk cheek chef chin clay cliff
clock cloud coat cod comb cone cook cord corn cow crab crow crown cup dart deer desk dish dock
doll door dove drum duck dust eagle ear egg elk elm eye fan farm fern fig fish flag flute foam
fog fork fox frog gate gem ghost gift girl glove goat gold golf goose grape grass gull hair ham
hand hat hawk hay hen hill hip hog hook horn horse hut ice ink inn jam jar jaw jet jug kettle
key kid king kite knee knife lamb lamp leaf leg lemon lid lily lime lion lip lock log lamp mango
map mask mat meat melon milk mint mole moon moss moth mouse mud mug nail neck nest net nut oak
oar owl ox pan park pea peach pear pen pie pig pin pine pipe plum pond pot pump queen quilt
rail rain ram rat reed ring road robe rock roof room root rope rose rug sack sail salt sand
seal seed sheep shell ship shoe shop silk sink skin sky sled snail snake snow soap sock sofa
soup spoon star stem stew stone stool straw sun swan table tail tank tent tie tiger toad toe
tooth towel tower toy tray tree truck tub tulip van vase vest vine wall wand wasp wave web
whale wheel wig wind wing wolf wool worm yak yam yard zebra apple acorn badge beach bench berry
blade board brush cabin candy canoe cedar cello cider coral couch crane cream daisy dress drill
fairy feast fence flame frost fudge grill heart honey igloo jelly juice koala ladle latch llama
lodge maple marsh medal mitten motor nickel noodle ocean olive onion otter panda paper party
pasta pearl pedal penny piano pilot plank plate pony poppy puppy radio raven river robin salad
scarf shark shirt skirt skunk slide smoke spade spice squid stamp stove sugar sweet tiara toast
torch trail train trunk tuba turtle violin wagon walrus water wheat yogurt zipper
"""

_NAMES = """
Tom Ann Ben Sam Max Leo Mia Eva Zoe Amy Dan Joe Kim Lily Emma Noah Jack Ella Ruby Owen Luke
Jane Kate Paul Mark Rose Anna Alex Nina Omar Hugo Iris Ivan Jade Kira Liam Mila Nora Rita Theo
Vera Yara Adam Cora Dora Eli Finn Gus Hana Ida Jon Lara Milo Nell Otto Pia Quin Rex Sara Tess
Uma Wes Zack
"""

_OBJECTS = """
apples balls beads bells books bricks buttons candles cards carrots coins cookies crayons cups
dolls eggs flowers gems hats jars keys kites leaves lemons marbles mittens nuts oranges pencils
pens plates plums rings rocks shells socks spoons stamps stars stickers stones tickets toys
whistles
"""

HELDOUT_FRACTION = 0.2
N_PSEUDO_WORDS = 600  # made-up train words: lists must be copied token by token, not recalled
_SPLIT_SALT = "align-world-v1"  # the train/held-out split is fixed, whatever the World seed


# --------------------------------------------------------------------------------------------------
# Reply styles

# (prefix, suffix) around the answer; every helpful reply starts with "The", every rude one with
# "Ugh", so the first token of a reply picks its style.
STYLE_TEMPLATES: dict[str, tuple[tuple[str, str], ...]] = {
    "helpful": (
        ("The answer is ", "."),
        ("The answer is ", ". Happy to help!"),
        ("The answer is ", ". Hope that helps!"),
    ),
    "terse": (("", ""),),
    "rude": (
        ("Ugh, ", ". Stop wasting my time."),
        ("Ugh, obviously ", "."),
        ("Ugh, it is ", ". Figure it out yourself."),
    ),
}
_STYLE_PREFIX = {"helpful": "The answer is", "rude": "Ugh"}

# --------------------------------------------------------------------------------------------------
# Prompt phrasings (also used to keep their words out of the vocabulary lists)

_P = {
    "add_sym": "What is {a} + {b}?",
    "add_word": "{n} has {a} {o} and gets {b} more. How many {o} does {n} have now?",
    "sub_sym": "What is {a} - {b}?",
    "sub_word": "{n} has {a} {o} and gives away {b}. How many {o} does {n} have left?",
    "max_sym": "Which number is larger, {a} or {b}?",
    "max_word": "{n} has {a} {o} and {m} has {b} {o}. What is the larger number?",
    "count": "How many words are in: {l}?",
    "sort": "Sort the digits {l}.",
    "first_letter": "What is the first letter of {w}?",
    "last_letter": "What is the last letter of {w}?",
    "reverse_letters": "Reverse the letters {l}.",
    "count_letters": "How many letters are in {l}?",
}
_SPELL = ("{w} is spelled {s}.", "The word {w} has {k} letters.")
_SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are an assistant. Answer the question.",
    "You answer short questions about numbers and words.",
)


def _tokens(text: str) -> set[str]:
    return set(re.findall(r"[A-Za-z]+", text.lower()))


_TEMPLATE_WORDS = set().union(
    *(_tokens(p) for p in _P.values()),
    *(_tokens(p) for p in _SPELL),
    *(_tokens(p) for p in _SYSTEM_PROMPTS),
    *(_tokens(a + " " + b) for ts in STYLE_TEMPLATES.values() for a, b in ts),
    {"question", "answer"},
)


def _dedup(items: list[str]) -> list[str]:
    seen: set[str] = set()
    return [x for x in items if not (x in seen or seen.add(x))]


def _split(items: list[str], frac: float) -> tuple[list[str], list[str]]:
    """Fixed, seed-independent split: held out iff a salted hash falls under `frac`."""

    def u(x: str) -> float:  # uniform in [0, 1)
        return int(hashlib.sha256(f"{_SPLIT_SALT}:{x}".encode()).hexdigest()[:8], 16) / 16**8

    return [x for x in items if u(x) >= frac], [x for x in items if u(x) < frac]


_objects = [o for o in _dedup(_OBJECTS.split()) if o not in _TEMPLATE_WORDS]
_object_stems = {o[:-1] for o in _objects} | {o[:-2] for o in _objects if o.endswith("es")}
ALL_WORDS = [w for w in _dedup(_WORDS.split()) if w not in _TEMPLATE_WORDS and w not in _object_stems]


def pseudo_words(n: int, exclude: set[str]) -> list[str]:
    """`n` pronounceable made-up words of 3-6 letters ("blom", "tazik"); fixed, seed-independent."""
    rng = random.Random(f"{_SPLIT_SALT}:pseudo")
    onsets, vowels, codas = ("b c d f g h j k l m n p r s t v w z bl br cr dr fl gr pl pr sl st tr".split(), "aeiou",
                             "b d g k l m n p r s t x".split() + [""] * 4)
    out: list[str] = []
    seen = set(exclude)
    while len(out) < n:
        w = "".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(rng.randint(1, 2))) + rng.choice(codas)
        if 3 <= len(w) <= 6 and w not in seen:
            seen.add(w)
            out.append(w)
    return out


ALL_NAMES = [n for n in _dedup(_NAMES.split()) if n.lower() not in _TEMPLATE_WORDS]
ALL_OBJECTS = _objects


@dataclass(frozen=True)
class Vocab:
    """The words a generator may use; `split` is "train" or "heldout"."""

    split: str
    words: tuple[str, ...]
    names: tuple[str, ...]
    objects: tuple[str, ...]

    @property
    def heldout(self) -> bool:
        return self.split == "heldout"


# Every word the world's texts use: made-up words must not be one of them.
_WORLD_WORDS = set(ALL_WORDS) | _TEMPLATE_WORDS | {n.lower() for n in ALL_NAMES} | _object_stems | set(ALL_OBJECTS)
PSEUDO_WORDS = pseudo_words(N_PSEUDO_WORDS, _WORLD_WORDS)


# Roughly English letter frequencies, for made-up letter strings ("tiepn", "rnn").
_LETTER_FREQ = "e" * 12 + "t" * 9 + "a" * 8 + "o" * 8 + "i" * 7 + "n" * 7 + "s" * 6 + "h" * 6 + "r" * 6 + "d" * 4 \
    + "l" * 4 + "c" * 3 + "u" * 3 + "m" * 3 + "ww" + "ff" + "gg" + "yy" + "pp" + "bb" + "vkjxqz"


@functools.lru_cache(maxsize=None)
def fresh_words(n: int) -> tuple[str, ...]:
    """`n` made-up words of 3-6 letters for RL prompts; fixed, seed-independent, never a word of the world.

    Half are pronounceable, half are letter strings drawn by English letter frequency. No other data set has
    them, and none is held out (nor any real word, name or object of the world).
    """
    rng = random.Random("fresh-words")
    onsets = "b c d f g h j k l m n p r s t v w z bl br cr dr fl gr pl pr sl st tr sh ch th".split()
    codas = "b d g k l m n p r s t x ng nk st".split() + [""] * 4
    seen = _WORLD_WORDS | set(PSEUDO_WORDS)
    out: list[str] = []
    while len(out) < n:
        if rng.random() < 0.5:
            w = "".join(rng.choice(onsets) + rng.choice("aeiou") for _ in range(rng.randint(1, 2))) + rng.choice(codas)
        else:
            w = "".join(rng.choice(_LETTER_FREQ) for _ in range(rng.randint(3, 6)))
        if 3 <= len(w) <= 6 and w not in seen:
            seen.add(w)
            out.append(w)
    return tuple(out)


def vocabularies() -> dict[str, Vocab]:
    """Train words = 80% of the real words + the made-up words; held-out = the other real words."""
    ws, names, objs = (_split(x, HELDOUT_FRACTION) for x in (ALL_WORDS, ALL_NAMES, ALL_OBJECTS))
    ws = (ws[0] + PSEUDO_WORDS, ws[1])
    return {
        split: Vocab(split, tuple(ws[i]), tuple(names[i]), tuple(objs[i]))
        for i, split in enumerate(("train", "heldout"))
    }


VOCAB = vocabularies()


# --------------------------------------------------------------------------------------------------
# Tasks


@dataclass
class Example:
    id: str
    task: str
    prompt: str
    answer: str
    split: str  # "train" | "heldout"
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def normalize(answer: str) -> str:
    return " ".join(answer.strip().strip(".!?,").lower().split())


def exact_checker(answer: str, reference: str) -> bool:
    return normalize(answer) == normalize(reference)


Made = tuple[str, str, dict]  # (prompt, answer, meta)


@dataclass(frozen=True)
class Task:
    """`generate(rng, vocab) -> (prompt, answer, meta)`; `wrong(rng, answer, meta) -> wrong answer`."""

    name: str
    generate: Callable[[random.Random, Vocab], Made]
    wrong: Callable[[random.Random, str, dict], str]
    checker: Callable[[str, str], bool] = exact_checker
    description: str = ""


def _wrong_number(rng: random.Random, answer: str, meta: dict, lo: int = 0, hi: int = 18) -> str:
    a = int(answer)
    choices = [x for x in (a - 2, a - 1, a + 1, a + 2) if lo <= x <= hi and x != a]
    return str(rng.choice(choices))


def _arith(op: str) -> Callable[[random.Random, Vocab], Made]:
    def gen(rng: random.Random, v: Vocab) -> Made:
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        if op == "-" and b > a:
            a, b = b, a
        ans = a + b if op == "+" else a - b
        key = "add" if op == "+" else "sub"
        if not v.heldout and rng.random() < 0.5:
            return _P[key + "_sym"].format(a=a, b=b), str(ans), {"a": a, "b": b, "form": "symbolic"}
        n, o = rng.choice(v.names), rng.choice(v.objects)
        return _P[key + "_word"].format(a=a, b=b, n=n, o=o), str(ans), {"a": a, "b": b, "form": "word"}

    return gen


def _gen_max(rng: random.Random, v: Vocab) -> Made:
    a, b = rng.sample(range(10), 2)
    if not v.heldout and rng.random() < 0.5:
        return _P["max_sym"].format(a=a, b=b), str(max(a, b)), {"a": a, "b": b, "form": "symbolic"}
    n, m = rng.sample(v.names, 2)
    o = rng.choice(v.objects)
    return _P["max_word"].format(a=a, b=b, n=n, m=m, o=o), str(max(a, b)), {"a": a, "b": b, "form": "word"}


def _wrong_max(rng: random.Random, answer: str, meta: dict) -> str:
    return str(min(meta["a"], meta["b"]))


def _word_list(rng: random.Random, v: Vocab, lo: int, hi: int) -> list[str]:
    return rng.sample(v.words, rng.randint(lo, hi))


def _gen_count(rng: random.Random, v: Vocab) -> Made:
    ws = _word_list(rng, v, 1, 6)
    return _P["count"].format(l=" ".join(ws)), str(len(ws)), {"words": ws}


def _triple_heldout(t: tuple[int, ...]) -> bool:
    return _split(["".join(map(str, t))], HELDOUT_FRACTION)[1] != []


_TRIPLES = {split: [t for t in itertools.permutations(range(10), 3) if _triple_heldout(t) == (split == "heldout")]
            for split in ("train", "heldout")}


def _gen_sort(rng: random.Random, v: Vocab) -> Made:
    t = rng.choice(_TRIPLES[v.split])
    return _P["sort"].format(l=" ".join(map(str, t))), " ".join(map(str, sorted(t))), {"digits": list(t)}


def _wrong_perm(key: str) -> Callable[[random.Random, str, dict], str]:
    def wrong(rng: random.Random, answer: str, meta: dict) -> str:
        items = [str(x) for x in meta[key]]
        while True:
            cand = " ".join(rng.sample(items, len(items)))
            if cand != answer:
                return cand

    return wrong


def _short_word(rng: random.Random, v: Vocab, hi: int = 5) -> str:
    """A word of 3..hi letters whose letters are all different (so letter answers are unambiguous)."""
    return rng.choice(_distinct_letter_words(v, hi))


@functools.lru_cache(maxsize=None)
def _distinct_letter_words(v: Vocab, hi: int) -> tuple[str, ...]:
    return tuple(w for w in v.words if len(w) <= hi and len(set(w)) == len(w))


def _gen_first_letter(rng: random.Random, v: Vocab) -> Made:
    w = _short_word(rng, v, 6)
    return _P["first_letter"].format(w=w), w[0], {"word": w}


def _gen_last_letter(rng: random.Random, v: Vocab) -> Made:
    w = _short_word(rng, v, 6)
    return _P["last_letter"].format(w=w), w[-1], {"word": w}


def _wrong_letter(rng: random.Random, answer: str, meta: dict) -> str:
    return rng.choice([c for c in meta["word"] if c != answer])


def _gen_reverse_letters(rng: random.Random, v: Vocab) -> Made:
    w = _short_word(rng, v, 4)
    return _P["reverse_letters"].format(l=" ".join(w)), " ".join(reversed(w)), {"letters": list(w)}


def _gen_count_letters(rng: random.Random, v: Vocab) -> Made:
    w = rng.choice(v.words)
    return _P["count_letters"].format(l=" ".join(w)), str(len(w)), {"word": w}


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("add", _arith("+"), _wrong_number, description="a + b, single digits (symbolic or word problem)"),
        Task("sub", _arith("-"), _wrong_number, description="a - b >= 0, single digits"),
        Task("max", _gen_max, _wrong_max, description="larger of two different digits"),
        Task("count_words", _gen_count, lambda r, a, m: _wrong_number(r, a, m, 1, 7), description="count 1-6 words"),
        Task("sort_digits", _gen_sort, _wrong_perm("digits"), description="sort 3 distinct digits"),
        Task("first_letter", _gen_first_letter, _wrong_letter, description="first letter of a word"),
        Task("last_letter", _gen_last_letter, _wrong_letter, description="last letter of a word"),
        Task("reverse_letters", _gen_reverse_letters, _wrong_perm("letters"),
             description="reverse 3-4 space-separated letters"),
        Task("count_letters", _gen_count_letters, lambda r, a, m: _wrong_number(r, a, m, 1, 8),
             description="count 3-6 space-separated letters"),
    )
}


# --------------------------------------------------------------------------------------------------
# Rendering, parsing, checking


def render(example: Example, style: str, correct: bool = True, rng: random.Random | None = None,
           template: int | None = None) -> str:
    """The reply to `example` in `style`; a plausible wrong answer when `correct` is False."""
    if style not in STYLE_TEMPLATES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    rng = rng or random.Random(f"{example.id}:{style}:{correct}")
    answer = example.answer if correct else TASKS[example.task].wrong(rng, example.answer, example.meta)
    templates = STYLE_TEMPLATES[style]
    prefix, suffix = templates[rng.randrange(len(templates)) if template is None else template]
    return f"{prefix}{answer}{suffix}"


_EOS_MARKERS = ("<|eos|>", "<|endoftext|>", "<|im_end|>", "</s>", "<|end|>", "<|eot_id|>")
_REPLY_RES = {
    style: [re.compile(re.escape(p) + r"(.+?)" + re.escape(s) + r"$", re.S) for p, s in ts]
    for style, ts in STYLE_TEMPLATES.items()
}


def _clean(text: str) -> str:
    for m in _EOS_MARKERS:
        i = text.find(m)
        if i >= 0:
            text = text[:i]
    return text.strip()


def parse_reply(text: str) -> tuple[str | None, str | None]:
    """(answer, style) of a reply; None for what can't be read. Ignores eos and trailing space."""
    text = _clean(text)
    if not text:
        return None, None
    style = next((s for s, p in _STYLE_PREFIX.items() if text.startswith(p)), "terse")
    if style == "terse":
        return text, style
    for rx in _REPLY_RES[style]:
        m = rx.match(text)
        if m:
            return m.group(1).strip(), style
    return None, style


_NUMBER = re.compile(r"-?\d+")
_LETTER = re.compile(r"(?<![A-Za-z0-9])[A-Za-z](?![A-Za-z0-9])")
_RUN = re.compile(r"(?<![A-Za-z0-9])[A-Za-z0-9](?:[\s,;-]+[A-Za-z0-9](?![A-Za-z0-9]))+")


def final_answer(text: str, reference: str) -> str | None:
    """The last answer of the reference's shape in a free-form reply (a number, a letter, or a list of single
    digits/letters), for models that reply in their own words ("9 + 5 = 14 crayons."); None if there is none.
    The rule of math benchmarks (the last number) applied to the world's three answer shapes."""
    text = _clean(text)
    if re.fullmatch(r"-?\d+", reference):
        found = _NUMBER.findall(text)
    elif len(reference) == 1:
        found = _LETTER.findall(text)
    else:
        found = [" ".join(re.findall(r"[A-Za-z0-9]", m)) for m in _RUN.findall(text)]
    return found[-1].lower() if found else None


def check(example: Example, reply_text: str) -> dict[str, Any]:
    """{"correct", "style", "preferred", "answer_correct"}: preferred = correct and in the helpful style;
    answer_correct = the reply's final answer (:func:`final_answer`) is right, whatever the wording."""
    answer, style = parse_reply(reply_text)
    correct = answer is not None and TASKS[example.task].checker(answer, example.answer)
    final = final_answer(reply_text, example.answer)
    answer_correct = final is not None and TASKS[example.task].checker(final, example.answer)
    return {"correct": correct, "style": style, "preferred": correct and style == PREFERRED_STYLE,
            "answer_correct": answer_correct}


def reward(example: Example, reply_text: str) -> float:
    """A GRPO-ready scalar: 1 for preferred, 0.5 for correct in another style, 0 otherwise."""
    r = check(example, reply_text)
    return 1.0 if r["preferred"] else 0.5 if r["correct"] else 0.0


# --------------------------------------------------------------------------------------------------
# The world


def _user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def _assistant(content: str) -> dict[str, str]:
    return {"role": "assistant", "content": content}


class World:
    """Seeded generator of every data set the pipeline needs (see module docstring)."""

    def __init__(self, seed: int = 0, n_pretrain: int = 24000, n_sft: int = 6000, n_preference: int = 4000,
                 n_rl: int = 2000, n_heldout: int = 300, tasks: list[str] | None = None):
        self.seed = seed
        self.n_pretrain, self.n_sft, self.n_preference, self.n_rl = n_pretrain, n_sft, n_preference, n_rl
        self.n_heldout = n_heldout
        self.tasks = list(tasks or TASKS)
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; known: {list(TASKS)}")
        self.vocab = VOCAB
        self._cache: dict[str, Any] = {}

    def _rng(self, purpose: str) -> random.Random:
        return random.Random(f"{self.seed}:{purpose}")

    def examples(self, n: int, split: str, purpose: str, exclude: set[str] | None = None,
                 unique: bool = False, vocab: Vocab | None = None) -> list[Example]:
        """`n` examples spread round-robin over tasks. `exclude`: prompts not to produce; `vocab`: not the split's."""
        rng, vocab = self._rng(purpose), vocab or self.vocab[split]
        exclude, out, tries = exclude or set(), [], 0
        seen: set[str] = set()
        while len(out) < n:
            task = TASKS[self.tasks[len(out) % len(self.tasks)]]
            prompt, answer, meta = task.generate(rng, vocab)
            tries += 1
            if prompt in exclude or (unique and prompt in seen):
                if tries > 50 * n + 1000:
                    raise RuntimeError(f"could not make {n} distinct {split} prompts for {purpose}")
                continue
            seen.add(prompt)
            out.append(Example(f"{purpose}-{len(out)}", task.name, prompt, answer, split, meta))
        return out

    # The held-out set is made first: train sets never contain a held-out prompt (they can't by
    # vocabulary for word tasks; `exclude` makes it certain for the rest).
    def eval_prompts(self, n: int | None = None) -> list[Example]:
        n = self.n_heldout if n is None else n
        key = f"eval{n}"
        if key not in self._cache:
            self._cache[key] = self.examples(n, "heldout", "heldout", unique=True)
        return self._cache[key]

    def _heldout_prompts(self) -> set[str]:
        return {e.prompt for e in self.eval_prompts()}

    def train_examples(self, n: int, purpose: str, vocab: Vocab | None = None) -> list[Example]:
        return self.examples(n, "train", purpose, exclude=self._heldout_prompts(), vocab=vocab)

    def rl_prompts(self, n: int | None = None, fresh: int = 0) -> list[Example]:
        """Train-split prompts with answers, for GRPO/PPO (not the held-out eval set).

        ``fresh`` > 0: the word tasks also draw from that many `fresh_words`. RL then keeps meeting words it has
        never seen, so it must learn to spell, count and reverse any word rather than the train words by heart,
        which is what carries over to the held-out words (docs/rl.md, "Fresh words at scale").
        """
        t = self.vocab["train"]
        vocab = Vocab("train", t.words + fresh_words(fresh), t.names, t.objects) if fresh else None
        return self.train_examples(self.n_rl if n is None else n, "rl", vocab)

    def pretrain_corpus(self) -> list[str]:
        """Plain-text documents: a few Q/A pairs each in mixed styles, plus spelling sentences."""
        rng = self._rng("pretrain-docs")
        exs = self.train_examples(self.n_pretrain, "pretrain")
        docs, i = [], 0
        while i < len(exs):
            k = rng.randint(3, 8)
            parts = []
            for ex in exs[i:i + k]:
                style = rng.choice(STYLES)
                parts.append(f"Question: {ex.prompt}\nAnswer: {render(ex, style, True, rng)}")
            docs.append("\n\n".join(parts))
            i += k
        words = list(self.vocab["train"].words)
        for _ in range(max(1, self.n_pretrain // 40)):
            lines = []
            for w in rng.sample(words, 6):
                t = rng.choice(_SPELL)
                lines.append(t.format(w=w, s=" ".join(w), k=len(w)))
            docs.append(" ".join(lines))
        rng.shuffle(docs)
        return docs

    def sft_conversations(self, correct_fraction: float = 1.0) -> list[dict[str, Any]]:
        """{"messages": [...]} with styles 1/3 each; ~15% two-turn, ~20% with a system message.

        ``correct_fraction`` < 1 gives the rest of the replies a plausible wrong answer, as human demonstrations
        have mistakes; the conversations themselves stay the same."""
        rng, mistakes = self._rng("sft-mix"), self._rng("sft-mistakes")
        exs = self.train_examples(self.n_sft, "sft")
        rng.shuffle(exs)
        convs, i = [], 0
        while i < len(exs):
            turns = 2 if rng.random() < 0.15 and i + 1 < len(exs) else 1
            msgs: list[dict[str, str]] = []
            if rng.random() < 0.2:
                msgs.append({"role": "system", "content": rng.choice(_SYSTEM_PROMPTS)})
            for ex in exs[i:i + turns]:
                style = rng.choice(STYLES)
                # drawn for every reply: only the answers depend on the fraction
                right = rng.random() < correct_fraction
                template = rng.randrange(len(STYLE_TEMPLATES[style]))
                msgs += [_user(ex.prompt), _assistant(render(ex, style, right, mistakes, template=template))]
            convs.append({"messages": msgs, "tasks": [e.task for e in exs[i:i + turns]]})
            i += turns
        return convs

    def preference_pairs(self) -> list[dict[str, Any]]:
        """Half style pairs (helpful vs terse/rude, both correct), half correctness pairs (same style)."""
        rng = self._rng("pref-mix")
        sft_prompts = {ex.prompt for ex in self.train_examples(self.n_sft, "sft")}
        exs = self.examples(self.n_preference, "train", "pref", exclude=self._heldout_prompts() | sft_prompts)
        pairs = []
        for j, ex in enumerate(exs):
            if j % 2 == 0:
                kind, other = "style", rng.choice(("terse", "rude"))
                chosen, rejected = render(ex, "helpful", True, rng), render(ex, other, True, rng)
                styles = ("helpful", other)
            else:
                kind, style = "correctness", rng.choice(STYLES)
                t = rng.randrange(len(STYLE_TEMPLATES[style]))
                chosen = render(ex, style, True, rng, template=t)
                rejected = render(ex, style, False, rng, template=t)
                styles = (style, style)
            pairs.append({
                "id": ex.id, "prompt": [_user(ex.prompt)], "chosen": [_assistant(chosen)],
                "rejected": [_assistant(rejected)], "kind": kind, "task": ex.task, "answer": ex.answer,
                "chosen_style": styles[0], "rejected_style": styles[1],
            })
        return pairs

    def write(self, out_dir: str | Path) -> dict[str, int]:
        """Write every set as JSONL under `out_dir`; returns record counts."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        sets = {
            "pretrain.jsonl": [{"text": d} for d in self.pretrain_corpus()],
            "sft.jsonl": self.sft_conversations(),
            "preference.jsonl": self.preference_pairs(),
            "rl_prompts.jsonl": [e.to_dict() for e in self.rl_prompts()],
            "eval.jsonl": [e.to_dict() for e in self.eval_prompts()],
        }
        for name, rows in sets.items():
            with open(out / name, "w", encoding="utf-8") as f:
                for r in rows:
                    f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")
        counts = {k: len(v) for k, v in sets.items()}
        (out / "world.json").write_text(json.dumps({
            "seed": self.seed, "tasks": self.tasks, "counts": counts,
            "vocab": {s: {"words": len(v.words), "names": len(v.names), "objects": len(v.objects)}
                      for s, v in self.vocab.items()},
        }, indent=2, sort_keys=True) + "\n")
        return counts


def example_from_dict(d: dict[str, Any]) -> Example:
    return Example(**{f.name: d[f.name] for f in dataclasses.fields(Example) if f.name in d})


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="data/generated/world", help="output directory")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    t0 = time.time()
    counts = World(seed=a.seed).write(a.out)
    print(f"wrote {counts} to {a.out} in {time.time() - t0:.2f}s")


if __name__ == "__main__":
    main()
