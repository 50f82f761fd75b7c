"""``python -m align.store init | import | export | stats | annotators`` (see docs/store.md)."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys

from align.data.formats import DataError
from align.store.store import DEFAULT_URL, Store, StoreError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m align.store", description=__doc__)
    p.add_argument("--db", default=os.environ.get("ALIGN_STORE_URL", DEFAULT_URL),
                   help="SQLAlchemy URL (default $ALIGN_STORE_URL or %(default)s)")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("init", help="create the schema / apply migrations")

    imp = sub.add_parser("import", help="import preference files (one transaction per file)")
    imp.add_argument("files", nargs="+", help=".json, .jsonl, .jsonl.gz, .json.gz or datasets dir")
    imp.add_argument("--skip-bad", action="store_true", help="skip bad records, report them")
    imp.add_argument("--labeller", default="dataset", help="rule labeller for the labels")
    imp.add_argument("--source", help="source name (default: the file name)")
    imp.add_argument("--max-text-bytes", type=int, default=1_000_000)
    imp.add_argument("--limit", type=int, help="read at most this many records per file")
    imp.add_argument("--queue", type=float, metavar="PRIORITY",
                     help="also queue the pairs for annotators with this priority")

    exp = sub.add_parser("export", help="export labelled pairs (TRL preference format)")
    exp.add_argument("out", nargs="?", help="out.jsonl (default: stdout as JSONL)")
    exp.add_argument("--standard", action="store_true", help="strings instead of message lists")
    exp.add_argument("--unpaired", action="store_true", help="KTO rows {prompt, completion, label}")
    exp.add_argument("--min-labels", type=int, default=1)
    exp.add_argument("--min-agreement", type=float, default=0.0)
    exp.add_argument("--test-fraction", type=float, default=0.0)
    exp.add_argument("--seed", default="")
    exp.add_argument("--kinds", nargs="*", choices=["human", "ai", "rule"])
    exp.add_argument("--annotators", nargs="*")
    exp.add_argument("--sources", nargs="*")
    exp.add_argument("--both-bad", choices=["drop", "negatives"], default="drop")
    exp.add_argument("--with-meta", action="store_true")
    exp.add_argument("--aggregate", choices=["majority", "reliability"], default="majority",
                     help="reliability: weigh annotators by their estimated accuracy (Dawid-Skene, gold-anchored)")
    exp.add_argument("--soft", action="store_true", help="add p_chosen (soft label) and weight to paired rows")
    exp.add_argument("--dataset", metavar="DIR", help="save a datasets.Dataset here instead")

    st = sub.add_parser("stats", help="counts, agreement, position bias")
    st.add_argument("--json", action="store_true")

    an = sub.add_parser("annotators", help="add / list / set-password / set-role")
    asub = an.add_subparsers(dest="action", required=True)
    a = asub.add_parser("add")
    a.add_argument("name")
    a.add_argument("--role", choices=["admin", "annotator"], default="annotator")
    a.add_argument("--kind", choices=["human", "ai", "rule"], default="human")
    a.add_argument("--password", help="default: $ALIGN_PASSWORD or prompt (humans only)")
    asub.add_parser("list")
    a = asub.add_parser("set-password")
    a.add_argument("name")
    a.add_argument("--password")
    a = asub.add_parser("set-role")
    a.add_argument("name")
    a.add_argument("role", choices=["admin", "annotator"])
    return p


def _password(args) -> str | None:
    pw = args.password or os.environ.get("ALIGN_PASSWORD")
    if pw is None and sys.stdin.isatty():
        pw = getpass.getpass(f"password for {args.name}: ")
    return pw


def _print_stats(s: dict) -> None:
    c = s["counts"]
    print("counts:     " + ", ".join(f"{k} {v:,}" for k, v in c.items()))
    print("by choice:  " + ", ".join(f"{k} {v:,}" for k, v in s["labels_by_choice"].items()))
    print("annotators:")
    for name, d in s["labels_per_annotator"].items():
        print(f"  {name:<20} {d['kind']:<6} {d['labels']:>8,} labels  "
              + " ".join(f"{k}={d[k]}" for k in ("a", "b", "tie", "both_bad", "skip")))
    ag = s["agreement"]
    print(f"agreement:  {ag['comparisons_with_2plus_labels']:,} comparisons with 2+ labels; "
          f"Fleiss kappa {ag['fleiss_kappa']}, Krippendorff alpha {ag['krippendorff_alpha']}")
    for p in ag["cohen"]:
        print(f"  Cohen {p['annotators'][0]} ~ {p['annotators'][1]}: kappa {p['kappa']} "
              f"(observed {p['observed_agreement']}, {p['shared']} shared)")
    pb = s["position_bias"]
    print(f"position:   left-shown response won {pb['left_win_rate']} of "
          f"{pb['decisive_labels_with_side']} decisive labels")
    print(f"time:       median {s['seconds_per_label']['median']} s per label "
          f"({s['seconds_per_label']['n']} timed)")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    store = Store(args.db, max_text_bytes=getattr(args, "max_text_bytes", 1_000_000))
    try:
        if args.cmd == "init":
            store.init()
            print(f"{store!r}: schema version {store.schema_version()}")
        elif args.cmd == "import":
            store.init()
            failed = 0
            for f in args.files:
                try:
                    r = store.import_file(f, source=args.source, labeller=args.labeller,
                                          skip_bad=args.skip_bad, limit=args.limit,
                                          priority=args.queue)
                except DataError as e:
                    print(f"error: {e}\n  nothing from {f} was stored (use --skip-bad to import "
                          "the rest)", file=sys.stderr)
                    failed += 1
                    continue
                print(r.summary())
            return 1 if failed else 0
        elif args.cmd == "export":
            opts = dict(format="standard" if args.standard else "conversational",
                        unpaired=args.unpaired, min_labels=args.min_labels,
                        min_agreement=args.min_agreement, test_fraction=args.test_fraction,
                        seed=args.seed, kinds=args.kinds, annotators=args.annotators,
                        sources=args.sources, both_bad=args.both_bad, with_meta=args.with_meta,
                        aggregate=args.aggregate, soft=args.soft)
            if args.dataset:
                ds = store.export(None, **opts)
                ds.save_to_disk(args.dataset)
                print(f"saved {ds} to {args.dataset}", file=sys.stderr)
            elif args.out:
                res = store.export(args.out, **opts)
                print(json.dumps(res, indent=1), file=sys.stderr)
            else:
                splits, report = store.export_rows(**opts)
                for rows in splits.values():
                    for row in rows:
                        sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
                print(json.dumps(report), file=sys.stderr)
        elif args.cmd == "stats":
            s = store.stats()
            if args.json:
                print(json.dumps(s, indent=1, default=str))
            else:
                _print_stats(s)
        elif args.cmd == "annotators":
            if args.action == "add":
                pw = _password(args) if args.kind == "human" else args.password
                a = store.add_annotator(args.name, pw, role=args.role, kind=args.kind)
                print(f"added {a.name} ({a.kind}, {a.role})")
            elif args.action == "list":
                for a in store.list_annotators():
                    print(f"{a['id']:>4} {a['name']:<24} {a['kind']:<6} {a['role']:<10} "
                          f"{a['labels']:>8} labels{'' if a['has_password'] else '  (no password)'}")
            elif args.action == "set-password":
                pw = _password(args)
                if not pw:
                    print("error: no password given", file=sys.stderr)
                    return 2
                store.set_password(args.name, pw)
                print(f"password of {args.name} changed")
            elif args.action == "set-role":
                store.set_role(args.name, args.role)
                print(f"{args.name} is now {args.role}")
    except (StoreError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
