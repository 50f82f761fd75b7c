"""Readers for SFT and preference data files (no torch).

Three functions, used by the store's importer and by the trainers:

- ``read_records(path)`` yields ``(line_or_index, record)`` from ``.json`` (an array; JSON Lines
  in a ``.json`` file are accepted too), ``.jsonl``, ``.jsonl.gz``, ``.json.gz`` or a ``datasets``
  directory (``save_to_disk`` output). The key is the 1-based line for JSON Lines, the 0-based index
  for arrays and datasets (``"split[index]"`` for a ``DatasetDict``). Malformed JSON raises
  ``DataError`` naming the file and line.
- ``to_preference(record, where)`` -> ``{"prompt": [msgs], "chosen": [msgs], "rejected": [msgs]}``
  with the format autodetected (see ``detect_preference``). Messages are ``{"role", "content"}``
  with role in system/user/assistant. Optional extra keys when the record says so:
  ``chosen_model``, ``rejected_model``, ``score_chosen``, ``score_rejected``.
- ``to_conversation(record, where)`` -> ``[msgs]`` for SFT data.

``where`` is a location string for messages, e.g. ``"data.jsonl:12"``; ``location(path, key)``
builds one. Every error is a ``DataError`` (a ``ValueError``) naming the location and the field.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator

__all__ = [
    "DataError", "read_records", "location", "to_preference", "to_conversation", "to_prompt",
    "detect_preference", "normalize_messages", "ROLES",
]

ROLES = ("system", "user", "assistant")
# ShareGPT / LLaMA-Factory speaker names -> chat roles.
ROLE_ALIASES = {
    "system": "system", "human": "user", "user": "user", "gpt": "assistant",
    "assistant": "assistant", "model": "assistant", "bot": "assistant", "chatgpt": "assistant",
}
HH_HUMAN, HH_ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


class DataError(ValueError):
    """Bad input data; the message names the file, line/record and field."""


def _show(value: Any, limit: int = 80) -> str:
    r = repr(value)
    return r if len(r) <= limit else r[:limit] + "...'"


# --------------------------------------------------------------------------------------- reading
def location(path: str | os.PathLike, key: int | str) -> str:
    """``file.jsonl:12`` for a line, ``file.json[3]`` for an array index."""
    name = str(path)
    if isinstance(key, int) and _is_jsonl(name):
        return f"{name}:{key}"
    return f"{name}[{key}]"


def _is_jsonl(name: str) -> bool:
    return name.endswith((".jsonl", ".jsonl.gz"))


def _open_text(path: Path):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _jsonl(path: Path, fh) -> Iterator[tuple[int, dict]]:
    for lineno, line in enumerate(fh, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno}): "
                            f"{_show(line.strip())}") from None
        if not isinstance(rec, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
        yield lineno, rec


def write_jsonl(rows: Iterable[dict], path: str | os.PathLike | None = None) -> None:
    """One JSON record per line, to ``path`` (stdout when None)."""
    fh = open(path, "w", encoding="utf-8") if path else sys.stdout
    try:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    finally:
        if path:
            fh.close()


def read_records(path: str | os.PathLike) -> Iterator[tuple[int | str, dict]]:
    """Yield ``(line_or_index, record)`` from a data file or ``datasets`` directory."""
    path = Path(path)
    if path.is_dir():
        yield from _read_datasets_dir(path)
        return
    if not path.exists():
        raise DataError(f"{path}: no such file")
    name = path.name
    try:
        if _is_jsonl(name):
            with _open_text(path) as fh:
                yield from _jsonl(path, fh)
            return
        if not name.endswith((".json", ".json.gz")):
            raise DataError(f"{path}: unknown data format (expected .json, .jsonl, .jsonl.gz, "
                            ".json.gz or a datasets directory)")
        with _open_text(path) as fh:
            text = fh.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    except (OSError, EOFError) as e:  # e.g. a truncated or non-gzip .gz
        raise DataError(f"{path}: cannot read ({e})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):  # JSON Lines named .json
            yield from _jsonl(path, io.StringIO(text))  # splits on \n only
            return
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    if isinstance(data, dict):  # {"data": [...]} / {"train": [...]} wrappers are common
        lists = [k for k, v in data.items() if isinstance(v, list)]
        if len(lists) == 1:
            data = data[lists[0]]
        else:
            raise DataError(f"{path}: expected a JSON array of records, got an object with keys "
                            f"{sorted(data)[:8]}")
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of records, got {type(data).__name__}")
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise DataError(f"{path}[{i}]: expected a JSON object, got {type(rec).__name__}")
        yield i, rec


def _read_datasets_dir(path: Path) -> Iterator[tuple[int | str, dict]]:
    if not ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()
            or (path / "state.json").exists()):
        raise DataError(f"{path}: a directory, but not a datasets save_to_disk directory")
    import datasets  # lazy: heavy import

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        for split, part in ds.items():
            for i, rec in enumerate(part):
                yield f"{split}[{i}]", dict(rec)
    else:
        for i, rec in enumerate(ds):
            yield i, dict(rec)


# -------------------------------------------------------------------------------------- messages
def normalize_messages(value: Any, where: str, field: str, *, allow_empty_list: bool = False
                       ) -> list[dict]:
    """Validate a list of ``{role, content}`` (or ShareGPT ``{from, value}``) messages."""
    if not isinstance(value, list):
        raise DataError(f"{where}: field {field!r}: expected a list of messages, got "
                        f"{type(value).__name__} {_show(value)}")
    if not value and not allow_empty_list:
        raise DataError(f"{where}: field {field!r}: empty list of messages")
    out = []
    for i, m in enumerate(value):
        out.append(_message(m, where, f"{field}[{i}]"))
    return out


def _message(m: Any, where: str, field: str) -> dict:
    if not isinstance(m, dict):
        raise DataError(f"{where}: field {field!r}: expected a message object, got {_show(m)}")
    if "role" in m:
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise DataError(f"{where}: field {field}.role: unknown role {_show(role)} "
                            f"(expected one of {', '.join(ROLES)})")
        ckey = "content"
    elif "from" in m:
        role, content = ROLE_ALIASES.get(str(m.get("from")).lower()), m.get("value")
        if role is None:
            raise DataError(f"{where}: field {field}.from: unknown speaker {_show(m.get('from'))} "
                            f"(expected one of {', '.join(sorted(ROLE_ALIASES))})")
        ckey = "value"
    else:
        raise DataError(f"{where}: field {field!r}: a message needs 'role'/'content' (or "
                        f"'from'/'value'), got keys {sorted(m)}")
    if not isinstance(content, str):
        raise DataError(f"{where}: field {field}.{ckey}: expected a string, got "
                        f"{type(content).__name__} {_show(content)}")
    return {"role": role, "content": content}


def _as_messages(value: Any, where: str, field: str, default_role: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if isinstance(value, dict):  # a single ShareGPT turn, e.g. dpo_en_demo's chosen/rejected
        return [_message(value, where, field)]
    return normalize_messages(value, where, field)


def _req(record: dict, key: str, where: str) -> Any:
    if key not in record or record[key] is None:
        raise DataError(f"{where}: missing field {key!r} (record has {sorted(record)})")
    return record[key]


def _str_field(record: dict, key: str, where: str, required: bool = True) -> str:
    v = record.get(key)
    if v is None and not required:
        return ""
    if not isinstance(v, str):
        if v is None:
            raise DataError(f"{where}: missing field {key!r} (record has {sorted(record)})")
        raise DataError(f"{where}: field {key!r}: expected a string, got {type(v).__name__} "
                        f"{_show(v)}")
    return v


# ------------------------------------------------------------------------------ HH-RLHF transcripts
def parse_hh(text: str, where: str, field: str) -> list[dict]:
    """``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` -> messages (contents stripped, as TRL does)."""
    if not text.startswith(HH_HUMAN):
        raise DataError(f"{where}: field {field!r}: an HH-RLHF transcript must start with "
                        f"'\\n\\nHuman:', got {_show(text[:40])}")
    out: list[dict] = []
    pos = 0
    while pos < len(text):
        if text.startswith(HH_HUMAN, pos):
            role, pos = "user", pos + len(HH_HUMAN)
        else:  # guaranteed by the split below
            role, pos = "assistant", pos + len(HH_ASSISTANT)
        nh, na = text.find(HH_HUMAN, pos), text.find(HH_ASSISTANT, pos)
        ends = [e for e in (nh, na) if e >= 0]
        end = min(ends) if ends else len(text)
        out.append({"role": role, "content": text[pos:end].strip()})
        pos = end
    return out


def _split_shared(chosen: list[dict], rejected: list[dict], where: str) -> dict:
    """Implicit prompt: the longest shared message prefix that is followed by an assistant turn
    in both; the rest are the completions (usually one assistant message each)."""
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    while k > 0 and not (k < len(chosen) and k < len(rejected)
                         and chosen[k]["role"] == "assistant" == rejected[k]["role"]):
        k -= 1
    if not (k < len(chosen) and k < len(rejected)
            and chosen[k]["role"] == "assistant" == rejected[k]["role"]):
        raise DataError(f"{where}: fields 'chosen'/'rejected': cannot split an implicit prompt — "
                        "no shared prefix followed by an assistant turn in both")
    return {"prompt": chosen[:k], "chosen": chosen[k:], "rejected": rejected[k:]}


# ----------------------------------------------------------------------------------- preference
def detect_preference(record: dict) -> str:
    """Name of the preference format of ``record`` (see ``to_preference``)."""
    keys = set(record)
    if "completions" in keys:
        return "ultrafeedback"
    if "chosen" in keys and "rejected" in keys:
        c, r = record["chosen"], record["rejected"]
        if "conversations" in keys:
            return "sharegpt"
        if "instruction" in keys:
            return "alpaca"
        if "prompt" in keys:
            return "trl"  # standard strings, conversational lists, UltraFeedback binarized
        if "messages" in keys:
            return "sharegpt"
        if isinstance(c, str) and isinstance(r, str) and c.startswith(HH_HUMAN):
            return "hh"
        return "implicit"
    return "unknown"


def to_preference(record: dict, where: str = "<record>") -> dict:
    """One preference record -> ``{"prompt", "chosen", "rejected"}`` message lists.

    Formats (autodetected by ``detect_preference``):
      trl          ``prompt`` + ``chosen``/``rejected``: strings (standard) or message lists
                   (conversational). Completions that repeat the prompt messages first (the
                   UltraFeedback *binarized* layout, with ``score_chosen``/``score_rejected``) are
                   cut to the part after the prompt.
      implicit     ``chosen``/``rejected`` only: message lists (or plain strings) sharing a prefix;
                   the prompt is the longest shared prefix followed by an assistant turn.
      hh           HH-RLHF transcripts ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``; split like
                   ``implicit`` (multi-turn prompt + final assistant replies; when the transcripts
                   diverge earlier, the completions hold every turn after the split).
      alpaca       ``instruction`` (+ ``input``, optional ``system``, ``history``) with
                   ``chosen``/``rejected`` strings; prompt = instruction + "\\n\\n" + input.
      sharegpt     ``conversations`` (from system/human/gpt, or role/content; also ``messages``)
                   with ``chosen``/``rejected`` as a turn dict, a string or a list of turns.
      ultrafeedback ``prompt`` + ``completions: [{model, response, overall_score | ratings}]``:
                   the best vs the worst completion (first one wins ties in ranking; a record
                   whose completions all score the same is an error). Sets ``chosen_model``,
                   ``rejected_model``, ``score_chosen``, ``score_rejected``.
    """
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    kind = detect_preference(record)
    if kind == "unknown":
        raise DataError(f"{where}: not a preference record: need 'chosen' and 'rejected' (or "
                        f"'prompt' + 'completions'); record has {sorted(record)}")
    out: dict[str, Any]
    if kind == "ultrafeedback":
        out = _ultrafeedback(record, where)
    elif kind == "hh":
        out = _split_shared(parse_hh(record["chosen"], where, "chosen"),
                            parse_hh(record["rejected"], where, "rejected"), where)
    elif kind == "implicit":
        c, r = record["chosen"], record["rejected"]
        if isinstance(c, str) and isinstance(r, str):
            out = _implicit_strings(c, r)
        else:
            out = _split_shared(_as_messages(c, where, "chosen", "assistant"),
                                _as_messages(r, where, "rejected", "assistant"), where)
    else:
        if kind == "alpaca":
            prompt = _alpaca_prompt(record, where)
        elif kind == "sharegpt":
            key = "conversations" if "conversations" in record else "messages"
            prompt = normalize_messages(_req(record, key, where), where, key)
            if "system" in record and isinstance(record["system"], str) and record["system"] \
                    and not (prompt and prompt[0]["role"] == "system"):
                prompt = [{"role": "system", "content": record["system"]}] + prompt
        else:
            prompt = _as_messages(_req(record, "prompt", where), where, "prompt", "user")
        out = {"prompt": prompt}
        for key in ("chosen", "rejected"):
            msgs = _as_messages(_req(record, key, where), where, key, "assistant")
            if len(msgs) > len(prompt) and prompt and msgs[:len(prompt)] == prompt:
                msgs = msgs[len(prompt):]  # binarized layout: completion repeats the prompt
            out[key] = msgs
        for key in ("score_chosen", "score_rejected"):
            if isinstance(record.get(key), (int, float)) and not isinstance(record[key], bool):
                out[key] = float(record[key])
    _check_preference(out, where)
    return out


def _implicit_strings(c: str, r: str) -> dict:
    k = 0
    while k < min(len(c), len(r)) and c[k] == r[k]:
        k += 1
    if k < min(len(c), len(r)) or len(c) != len(r):  # back up to a word boundary (as TRL does)
        cut = max(c.rfind(" ", 0, k), c.rfind("\n", 0, k))
        k = cut + 1 if cut >= 0 else 0
    prompt = [{"role": "user", "content": c[:k]}] if k else []
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": c[k:]}],
            "rejected": [{"role": "assistant", "content": r[k:]}]}


def _alpaca_prompt(record: dict, where: str) -> list[dict]:
    instruction = _str_field(record, "instruction", where)
    inp = _str_field(record, "input", where, required=False)
    if not instruction.strip():
        raise DataError(f"{where}: field 'instruction' is empty")
    msgs: list[dict] = []
    system = record.get("system")
    if isinstance(system, str) and system:
        msgs.append({"role": "system", "content": system})
    history = record.get("history") or []
    if not isinstance(history, list):
        raise DataError(f"{where}: field 'history': expected a list of [query, response] pairs")
    for i, turn in enumerate(history):
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2
                and all(isinstance(t, str) for t in turn)):
            raise DataError(f"{where}: field 'history[{i}]': expected [query, response] strings, "
                            f"got {_show(turn)}")
        msgs += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    text = instruction + ("\n\n" + inp if inp.strip() else "")
    msgs.append({"role": "user", "content": text})
    return msgs


def _score(c: dict, where: str, field: str) -> float:
    for key in ("overall_score", "score", "fine-grained_score"):
        v = c.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    ratings = c.get("ratings", c.get("annotations"))
    vals: list[float] = []
    if isinstance(ratings, dict):
        ratings = list(ratings.values())
    if isinstance(ratings, list):
        for v in ratings:
            if isinstance(v, dict):
                v = v.get("Rating", v.get("rating"))
            try:
                vals.append(float(v))
            except (TypeError, ValueError):
                continue  # UltraFeedback uses "N/A" for some aspects
    if not vals:
        raise DataError(f"{where}: field {field!r}: no score (need overall_score, score, "
                        f"fine-grained_score or ratings)")
    return sum(vals) / len(vals)


def _ultrafeedback(record: dict, where: str) -> dict:
    prompt = _as_messages(_req(record, "prompt", where), where, "prompt", "user")
    comps = record["completions"]
    if not isinstance(comps, list) or len(comps) < 2:
        raise DataError(f"{where}: field 'completions': need a list of at least 2 completions")
    scored = []
    for i, c in enumerate(comps):
        f = f"completions[{i}]"
        if not isinstance(c, dict):
            raise DataError(f"{where}: field {f!r}: expected an object, got {_show(c)}")
        text = c.get("response", c.get("completion", c.get("text")))
        if not isinstance(text, str):
            raise DataError(f"{where}: field '{f}.response': expected a string, got {_show(text)}")
        scored.append((_score(c, where, f), i, text, c.get("model")))
    best = max(scored, key=lambda s: (s[0], -s[1]))
    worst = min(scored, key=lambda s: (s[0], s[1]))
    if best[0] == worst[0]:
        raise DataError(f"{where}: field 'completions': every completion scores {best[0]}; "
                        "no preference to take")
    out = {"prompt": prompt, "chosen": [{"role": "assistant", "content": best[2]}],
           "rejected": [{"role": "assistant", "content": worst[2]}],
           "score_chosen": best[0], "score_rejected": worst[0]}
    if isinstance(best[3], str):
        out["chosen_model"] = best[3]
    if isinstance(worst[3], str):
        out["rejected_model"] = worst[3]
    return out


def _check_preference(out: dict, where: str) -> None:
    if out["prompt"] and out["prompt"][-1]["role"] == "assistant":
        raise DataError(f"{where}: field 'prompt': the prompt ends with an assistant turn")
    for key in ("chosen", "rejected"):
        msgs = out[key]
        if not msgs:
            raise DataError(f"{where}: field {key!r}: no completion")
        if msgs[0]["role"] != "assistant":
            raise DataError(f"{where}: field {key!r}: the completion must start with an "
                            f"assistant turn, got role {msgs[0]['role']!r}")


# -------------------------------------------------------------------------------------------- SFT
def to_conversation(record: dict, where: str = "<record>") -> list[dict]:
    """One SFT record -> messages. Formats: ``messages`` (role/content), ``conversations``
    (ShareGPT from/value or role/content), ``prompt``/``completion`` (strings or message lists),
    Alpaca ``instruction``/``input``/``output`` (+ optional ``system``, ``history``).
    Needs at least one assistant turn; every assistant turn must be non-empty."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        msgs = normalize_messages(record["messages"], where, "messages")
    elif "conversations" in record:
        msgs = normalize_messages(record["conversations"], where, "conversations")
        system = record.get("system")
        if isinstance(system, str) and system and msgs[0]["role"] != "system":
            msgs = [{"role": "system", "content": system}] + msgs
    elif "prompt" in record and "completion" in record:
        msgs = (_as_messages(record["prompt"], where, "prompt", "user")
                + _as_messages(record["completion"], where, "completion", "assistant"))
    elif "instruction" in record:
        msgs = _alpaca_prompt(record, where)
        msgs.append({"role": "assistant", "content": _str_field(record, "output", where)})
    else:
        raise DataError(f"{where}: no messages: expected 'messages', 'conversations', "
                        f"'prompt'+'completion' or 'instruction'+'output'; record has "
                        f"{sorted(record)}")
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"{where}: no assistant turn in the conversation")
    for i, m in enumerate(msgs):
        if m["role"] == "assistant" and not m["content"].strip():
            raise DataError(f"{where}: message {i} (assistant) is empty")
    return msgs


PROMPT_KEYS = ("prompt", "messages", "conversations", "instruction", "question", "text")


def to_prompt(rec: dict, where: str = "<record>") -> str | list[dict]:
    """The prompt of a record (for generation: the app's pairs, RL, the loop): a preference record's (the turns
    both replies answer, as the store imports it), else ``prompt`` / ``question`` / ``text`` (a string or
    messages), ``messages`` / ``conversations`` (a chat: all but a last assistant turn), Alpaca ``instruction``
    (+ ``input``). A string stays a string (one user turn)."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if detect_preference(rec) != "unknown":
        return to_preference(rec, where)["prompt"]
    for k in PROMPT_KEYS:
        if rec.get(k) is None:
            continue
        v = rec[k]
        if isinstance(v, str):
            if not v.strip():
                raise DataError(f"{where}: field {k!r} is empty")
            return f"{v}\n\n{rec['input']}" if k == "instruction" and rec.get("input") else v
        msgs = normalize_messages(v, where, k)
        if msgs and msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]
        if not msgs:
            raise DataError(f"{where}: field {k!r} has no user turn")
        return msgs
    raise DataError(f"{where}: no prompt field (expected one of {', '.join(PROMPT_KEYS)}, or a preference "
                    f"record; record has {sorted(rec)})")


def to_prompt_response(rec: dict, where: str) -> tuple[Any, Any]:
    """(prompt, response) of a record: prompt + response | completion, or messages ending in an assistant turn."""
    if "prompt" in rec:
        key = "response" if "response" in rec else "completion" if "completion" in rec else None
        if key is None:
            raise DataError(f"{where}: a record needs 'response' or 'completion' beside 'prompt'; has {sorted(rec)}")
        prompt, resp = rec["prompt"], rec[key]
        for name, v in (("prompt", prompt), (key, resp)):
            if not isinstance(v, (str, list)):
                raise DataError(f"{where}: field {name!r}: expected a string or a list of messages, got {v!r:.80}")
        if isinstance(prompt, list):
            prompt = normalize_messages(prompt, where, "prompt", allow_empty_list=True)
        if isinstance(resp, list):
            resp = normalize_messages(resp, where, key)
        return prompt, resp
    if "messages" in rec:
        msgs = normalize_messages(rec["messages"], where, "messages")
        if msgs[-1]["role"] != "assistant":
            raise DataError(f"{where}: field 'messages': the last message must be the assistant's response")
        return msgs[:-1], msgs[-1]["content"]
    raise DataError(f"{where}: need 'prompt' + 'response'/'completion' (or 'messages'); record has {sorted(rec)}")
