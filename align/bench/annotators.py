"""``python -m align.bench annotators``: majority vote vs annotator-aware labels, with simulated annotators.

The built-in world's preference pairs (the truth is known) go into a fresh store; simulated annotators
label them: ``--careful`` right with probability ``--careful-accuracy``, ``--random`` coin flips,
``--longer`` always pick the longer reply. Each pair gets ``--labels-per-pair`` labels from distinct
annotators drawn at random, and every annotator also labels the ``--gold`` gold pairs (known answer),
as the app would mix them in. The same labels are then exported twice:
- majority vote (``aggregate='majority'``), and
- annotator-aware (``aggregate='reliability'``: one-coin Dawid–Skene anchored by the gold pairs) with
  soft labels ``p_chosen`` / ``weight``,
and the report gives each one's label accuracy against the truth. With ``--train``, a tiny reward
model (random init, world tokenizer, CPU) is trained with ``align.reward.train`` on each export (and on
the true labels, as a ceiling) and scored on pairs from the world's held-out prompts.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from align.bench.store import hardware

ROOT = Path(__file__).resolve().parents[2]


def simulate(url: str, n_pairs: int, n_gold: int, careful: int, careful_acc: float, n_random: int, longer: int,
             per_pair: int, seed: int) -> dict:
    """Fill the store at ``url``; returns ``{"truth": {cid: 'a'|'b'}, "pairs": [world pairs by cid]}``."""
    from align.data.world import World
    from align.store import Store

    rng = random.Random(seed)
    pairs = World(seed).preference_pairs()[: n_pairs + n_gold]
    s = Store(url).init()
    people = ([(f"careful{i}", "careful") for i in range(careful)] + [(f"random{i}", "random") for i in range(n_random)]
              + [(f"longer{i}", "longer") for i in range(longer)])
    for name, _ in people:
        s.add_annotator(name, None)
    truth, by_cid = {}, {}
    for i, p in enumerate(pairs):
        pid = s.add_prompt(p["prompt"])
        rc, rr = s.add_response(pid, p["chosen"]), s.add_response(pid, p["rejected"])
        a, b = (rc, rr) if rng.random() < 0.5 else (rr, rc)
        cid = s.add_comparison(pid, a, b, priority=1.0, allow_same=True)
        truth[cid] = "a" if a == rc else "b"
        by_cid[cid] = p
        if i >= n_pairs:
            s.set_gold(cid, truth[cid])

    def answer(kind: str, cid: int) -> str:
        t = truth[cid]
        if kind == "careful":
            return t if rng.random() < careful_acc else ("b" if t == "a" else "a")
        if kind == "random":
            return rng.choice("ab")
        c = s.get_comparison(cid)
        la, lb = len(c.text_a), len(c.text_b)
        return "a" if la > lb else "b" if lb > la else rng.choice("ab")

    cids = list(truth)
    gold = set(cids[n_pairs:])
    for cid in cids:
        who = people if cid in gold else rng.sample(people, per_pair)
        for name, kind in who:
            s.submit_label(cid, name, answer(kind, cid), left=rng.choice("ab"))
    s.close()
    return {"truth": truth, "pairs": by_cid, "gold": gold}


def label_accuracy(rows: list[dict], truth: dict, gold: set) -> tuple[float, int]:
    rows = [r for r in rows if r["comparison_id"] not in gold]
    ok = sum((r["chosen"] == r["_a"]) == (truth[r["comparison_id"]] == "a") for r in rows)
    return ok / max(1, len(rows)), len(rows)


def tiny_base(out: Path) -> Path:
    """A world tokenizer and a random-init 2-layer decoder (as the reward tests use)."""
    import torch

    from align.model import DecoderConfig, DecoderForCausalLM
    from align.tokenizer import TokenizerArguments, train_tokenizer

    lm = out / "lm"
    if not (lm / "config.json").exists():
        tok = train_tokenizer(TokenizerArguments(corpus="world", vocab_size=400, max_documents=1500,
                                                 output_dir=str(out / "tok")))
        torch.manual_seed(0)
        cfg = DecoderConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                            pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        DecoderForCausalLM(cfg).save_pretrained(str(lm))
        tok.save_pretrained(str(lm))
    return lm


def train_rm(lm: Path, data: Path, out: Path, steps: int, eval_prompts: int, seed: int) -> dict:
    from align.config import configure
    from align.reward import CONFIG_TYPES, train

    ev = train(*configure(
        CONFIG_TYPES, ROOT / "configs/reward.yaml", model_name_or_path=str(lm), output_dir=str(out),
        dataset_name=str(data), test_fraction=0.0, eval_world=True, eval_world_prompts=eval_prompts, max_steps=steps,
        per_device_train_batch_size=32, learning_rate=3e-3, use_peft=False, score_loglik=False, logging_steps=50,
        save_steps=100000, dataloader_pin_memory=False, seed=seed,
    )).eval
    return {k: ev.get(k) for k in ("accuracy_world", "accuracy_style", "accuracy_correctness")}


@dataclass
class BenchArgs:
    """majority vote vs annotator-aware labels, with simulated annotators"""

    pairs: int = 1500
    gold: int = 40
    labels_per_pair: int = 3
    careful: int = 5
    careful_accuracy: float = 0.9
    random: int = 3
    longer: int = 2
    train: bool = field(default=False, metadata={"help": "also train a tiny reward model on each export"})
    steps: int = 150
    eval_prompts: int = 300
    seed: int = 0
    out: str | None = field(default=None, metadata={"help": "keep the store, exports and RM runs here"})


def main(argv: list[str] | None = None) -> int:
    from align.config import parse, run_command

    (args,) = run_command(parse, [BenchArgs], argv, prog="python -m align.bench annotators")
    from align.store import Store

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        out.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{out}/annotators.db"
        if (out / "annotators.db").exists():
            (out / "annotators.db").unlink()
        t0 = time.perf_counter()
        sim = simulate(url, args.pairs, args.gold, args.careful, args.careful_accuracy, args.random, args.longer,
                       args.labels_per_pair, args.seed)
        s = Store(url)
        n_labels = len(s.labels())
        rows = {}
        for agg in ("majority", "reliability"):
            splits, rep = s.export_rows(kinds=["human"], with_meta=True, aggregate=agg, soft=True,
                                        format="conversational")
            rows[agg] = splits["train"]
            for r in rows[agg]:
                c = s.get_comparison(r["comparison_id"])
                r["_a"] = c.response_a
        q = {r["name"]: r for r in s.annotator_quality()}
        s.close()
        lines = [f"{args.pairs} world pairs x {args.labels_per_pair} labels + {args.gold} gold pairs labelled by all; "
                 f"{n_labels} labels; annotators: {args.careful} careful ({args.careful_accuracy:.0%}), "
                 f"{args.random} random, {args.longer} prefer the longer reply"]
        est = ", ".join(f"{n} {v['estimated_accuracy']:.2f}" for n, v in q.items() if v["estimated_accuracy"])
        lines.append(f"Dawid–Skene accuracy estimates: {est}")
        res = {}
        for agg in ("majority", "reliability"):
            acc, n = label_accuracy(rows[agg], sim["truth"], sim["gold"])
            res[agg] = {"label_accuracy": acc, "pairs": n}
            lines.append(f"{agg}: {n} pairs exported, label accuracy {acc:.3f}")
        if args.train:
            lm = tiny_base(out / "base")
            truth_rows = [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]}
                          for cid, p in sim["pairs"].items() if cid not in sim["gold"]]
            sets = {"majority": rows["majority"], "reliability": rows["reliability"], "truth": truth_rows}
            for name, rs in sets.items():
                f = out / f"{name}.jsonl"
                keep = ("prompt", "chosen", "rejected", "p_chosen", "weight") if name == "reliability" else \
                    ("prompt", "chosen", "rejected")
                f.write_text("".join(json.dumps({k: r[k] for k in keep if k in r}) + "\n" for r in rs))
                r = train_rm(lm, f, out / f"rm-{name}", args.steps, args.eval_prompts, args.seed)
                res.setdefault(name, {}).update(r)
                lines.append(f"RM on {name}: world held-out accuracy {r['accuracy_world']:.3f} "
                             f"(style {r['accuracy_style']:.3f}, correctness {r['accuracy_correctness']:.3f})")
        (out / "annotators.json").write_text(json.dumps(res, indent=1))
        print("\n".join(lines))
        print(f"\n{time.perf_counter() - t0:.0f} s; hardware: {hardware()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
