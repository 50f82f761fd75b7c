"""What the app does, without Gradio: sessions, the label path, admin actions.

The UI (``app.ui``) is a thin layer over ``Backend``; tests drive it directly too.

The label path is short and never generates: ``submit`` writes the label (one committed store
transaction) *then* fetches the next pre-generated comparison. Every displayed pair gets a fresh
``request_id`` that the page sends back with the click, so a double click, a key held down or a
retried request stores one label, and a stale click can never land on the next pair.
"""

from __future__ import annotations

import logging
import math
import random
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from align.data.formats import DataError, location, read_records, to_prompt
from align.store import Comparison, LabelExists, NotFound, Store, StoreError
from app.throttle import LoginThrottle

log = logging.getLogger("align.app")

# What the annotator clicks -> the store's choice. 'A'/'B' are the *displayed* sides.
DISPLAY_CHOICES = ("A", "B", "tie", "both_bad", "skip")
CHOICE_TEXT = {"A": "A is better", "B": "B is better", "tie": "Tie", "both_bad": "Both bad",
               "skip": "Skipped"}


class AppError(Exception):
    """A problem to show the user (a warning box); nothing stored is lost."""


@dataclass
class Shown:
    """The pair on an annotator's screen."""

    request_id: str
    comparison_id: int
    left: str  # 'a' | 'b': which of the comparison's responses is on the left (card "A")
    shown_at: float  # time.monotonic() when it was sent
    reask_of: int | None = None  # a swapped re-ask of this label id (stored apart, in reasks)


@dataclass
class Session:
    """Per-browser-session state (a ``gr.State``): who is logged in and what they see."""

    user: str | None = None
    role: str | None = None
    shown: Shown | None = None
    handled: dict[str, int] = field(default_factory=dict)  # request_id -> comparison id, recent
    last_seen: float = 0.0  # Backend.clock() of the last request (idle expiry)
    last_reask: tuple[int, Shown] | None = None  # (reask id, what was shown) for undo
    gold_due: float = 0.0  # credit towards the next gold pair / re-ask (a check is due at 1)
    reask_due: float = 0.0

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


@dataclass
class View:
    """Everything the annotator screen shows for one pair (or the empty queue)."""

    prompt: list[dict]
    left_text: str
    right_text: str
    left_messages: list[dict] | None
    right_messages: list[dict] | None
    request_id: str
    comparison_id: int | None
    done: int
    assigned: int
    remaining: int
    paused: bool = False  # the admin paused this annotator: nothing to label

    @property
    def empty(self) -> bool:
        return self.comparison_id is None


def _store_call(what: str, fn: Callable, *a, **kw):
    """Run a store call; turn database failures into an ``AppError`` the UI can show."""
    try:
        return fn(*a, **kw)
    except (AppError, LabelExists, NotFound, DataError, ValueError):
        raise
    except StoreError as e:
        raise AppError(f"{what}: {e}") from e
    except Exception as e:  # any DB-API / SQLAlchemy error (driver-specific classes): store unreachable
        msg = str(e).splitlines()[0][:300]
        raise AppError(f"{what}: the preference store is not reachable ({type(e).__name__}: {msg}). "
                       "Nothing was lost; try again in a moment.") from e


class Backend:
    """One per app process: owns the ``Store``, the login throttle and the generation models.

    ``gold_rate`` / ``reask_rate``: shares of served pairs that are gold pairs / swapped re-asks
    of the annotator's own labels (at least ``reask_gap`` labels old). ``idle_timeout``: seconds
    of inactivity after which a session must log in again (0 = never). ``clock`` drives expiry
    and the throttle (wall time: the throttle's counts are kept in the store across restarts; injectable
    for tests).
    """

    def __init__(self, store: Store, *, overlap: int = 1, rng: random.Random | None = None,
                 gold_rate: float = 0.0, reask_rate: float = 0.0, reask_gap: int = 5,
                 idle_timeout: float = 0.0, throttle: LoginThrottle | None = None,
                 clock: Callable[[], float] = time.time):
        if not (0 <= gold_rate <= 1 and 0 <= reask_rate <= 1 and gold_rate + reask_rate <= 1):
            raise ValueError(f"gold_rate and reask_rate must be in [0, 1] with a sum <= 1, got "
                             f"{gold_rate} and {reask_rate}")
        self.store = store
        self.overlap = overlap
        self.rng = rng or random.Random(secrets.randbits(64))
        self.gold_rate, self.reask_rate, self.reask_gap = gold_rate, reask_rate, reask_gap
        self.idle_timeout = idle_timeout
        self.clock = clock
        self.throttle = throttle or LoginThrottle(clock=clock, counts=store)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._models: dict[str, Any] = {}
        self._models_lock = threading.Lock()
        self._progress_cache: dict[str, tuple[float, dict]] = {}

    def _lock(self, user: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(user, threading.Lock())

    # ------------------------------------------------------------------------- accounts
    def login(self, session: Session, name: str, password: str, address: str | None = None) -> Session:
        """A new session for ``name``; throttled per name and per client ``address``. The answer is
        the same whether the name exists or not."""
        name = (name or "").strip()
        if not name or not password:
            raise AppError("Enter your name and password.")
        t = self.throttle  # its counts are in the store: every call is a store call
        wait = _store_call("Login failed", t.wait, name, address)
        if wait > 0:
            raise AppError(_wait_message(wait, _store_call("Login failed", t.locked, name, address)))
        who = _store_call("Login failed", self.store.verify_annotator, name, password)
        if who is None:
            wait = _store_call("Login failed", t.failed, name, address)
            msg = "Wrong name or password."
            if wait > 0:
                msg += " " + _wait_message(wait, _store_call("Login failed", t.locked, name, address))
            raise AppError(msg)
        _store_call("Login failed", t.succeeded, name, address)
        # the credits start at a random phase, so annotators do not all get a check at the same count
        return Session(user=who.name, role=who.role, last_seen=self.clock(),
                       gold_due=self.rng.random(), reask_due=self.rng.random())

    def health(self) -> tuple[bool, str]:
        """(True, the store) when the store answers, else (False, why)."""
        try:
            self.store.schema_version()
            return True, repr(self.store)
        except Exception as e:  # any driver's error means "not healthy"
            return False, f"{type(e).__name__}: {e}"

    def has_accounts(self) -> bool:
        try:
            return any(a.get("has_password") for a in self.store.list_annotators())
        except Exception:  # any store failure: don't claim "no accounts" when the store is down
            return True

    def add_annotator(self, session: Session, name: str, password: str, role: str) -> str:
        self.require_admin(session)
        name = (name or "").strip()
        if not name or not password:
            raise AppError("An account needs a name and a password.")
        if len(password) < 4:
            raise AppError("Use a password of at least 4 characters.")
        _store_call("Could not add the account", self.store.add_annotator, name, password, role)
        return f"Added {role} **{name}**."

    def people(self, session: Session) -> list[dict]:
        self.require_admin(session)
        return _store_call("Could not list the accounts", self.store.list_annotators)

    def set_paused(self, session: Session, name: str, paused: bool) -> str:
        """Pause (no more pairs; labels kept) or resume an annotator."""
        self.require_admin(session)
        name = (name or "").strip()
        if not name:
            raise AppError("Pick an annotator first.")
        try:
            _store_call("Could not change the account", self.store.set_paused, name, paused)
        except NotFound as e:
            raise AppError(f"No annotator named {name!r}.") from e
        log.warning("admin %r %s annotator %r", session.user, "paused" if paused else "resumed", name)
        return f"{'Paused' if paused else 'Resumed'} **{name}**."

    def unlock(self, session: Session, name: str) -> str:
        """Clear an account's failed-login count and lock-out."""
        self.require_admin(session)
        name = (name or "").strip()
        if not name:
            raise AppError("Pick an account first.")
        had = _store_call("Could not unlock", self.throttle.unlock, name)
        return f"Unlocked **{name}**." if had else f"**{name}** had no failed sign-ins."

    def dashboard(self, session: Session) -> dict:
        """What the dashboard shows: labels, store stats, accounts, per-annotator quality, lock-outs."""
        self.require_admin(session)
        labels = _store_call("Could not read the labels", self.store.labels)
        try:
            stats = self.store.stats()
        except (StoreError, ImportError, ValueError, ArithmeticError) as e:  # extras: plots come from labels
            log.warning("stats unavailable: %s", e)
            stats = None
        quality = _store_call("Could not compute annotator statistics", self.store.annotator_quality)
        return {"labels": labels, "stats": stats, "people": self.people(session), "quality": quality,
                "blocked": _store_call("Could not read the lock-outs", self.throttle.blocked)}

    # ------------------------------------------------------------------------- gold pairs
    def mark_gold(self, session: Session, comparison_ids: str, answer: str) -> str:
        """Mark comparisons (ids separated by commas/spaces) with a known answer, given in the
        store's A/B terms ('a' | 'b' | 'tie' | 'both_bad'; 'none' unmarks)."""
        self.require_admin(session)
        try:
            ids = [int(x) for x in (comparison_ids or "").replace(",", " ").split()]
        except ValueError as e:
            raise AppError(f"Comparison ids must be numbers separated by commas, got {comparison_ids!r}.") from e
        if not ids:
            raise AppError("Give the ids of the comparisons to mark.")
        ans = None if answer in (None, "", "none") else answer
        for cid in ids:
            try:
                _store_call("Could not mark the gold pair", self.store.set_gold, cid, ans, source="app")
            except NotFound as e:
                raise AppError(f"No comparison {cid}.") from e
            except ValueError as e:
                raise AppError(str(e)) from e
        return (f"Marked {len(ids)} pair(s) as gold (answer {ans!r})." if ans
                else f"Unmarked {len(ids)} pair(s).")

    def import_gold(self, session: Session, file: str | None) -> str:
        self.require_admin(session)
        if not file:
            raise AppError("Upload a preference file (.jsonl / .json) first.")
        try:
            n = _store_call("Gold import failed", self.store.import_gold, file, source=Path(file).name)
        except DataError as e:
            raise AppError(f"Nothing imported — {_short_path(str(e), file)}") from e
        return f"{n} gold pairs from {Path(file).name} (the file's chosen response is the answer)."

    # ---------------------------------------------------------------------- label path
    PROGRESS_TTL = 15.0  # s: counting the open queue scans every queued pair; the header can lag a little

    def _progress(self, user: str, labelled: int = 0) -> dict:
        """The header's counts, from the store at most every ``PROGRESS_TTL`` s per annotator and
        moved along locally in between (``labelled``: +1 after a label, -1 after an undo)."""
        now = time.monotonic()
        with self._locks_guard:
            got = self._progress_cache.get(user)
            if got is not None and now - got[0] < self.PROGRESS_TTL:
                done = max(0, got[1]["done"] + labelled)
                left = max(0, got[1]["remaining"] - labelled)
                p = {"done": done, "remaining": left, "assigned": done + left}
                self._progress_cache[user] = (got[0], p)
                return p
        p = _store_call("Could not read progress", self.store.progress, user, self.overlap)
        with self._locks_guard:
            self._progress_cache[user] = (time.monotonic(), p)
        return p

    def _check_instead(self, session: Session, comp: Comparison) -> tuple[Comparison, str | None, int | None]:
        """A gold pair or a swapped re-ask in place of the queue's ``comp`` when one is due: (pair, left, reask_of).

        Checks come on a schedule, not by coin flip: each pair served adds the rate to a credit and a
        check is due at 1, so every annotator gets their share (at 25% a coin leaves one annotator in
        thirty without a re-ask in twelve pairs). A gold check with no gold pair left is spent (that
        lasts); a re-ask with no label old enough yet stays due, and the cap keeps the catch-up short."""
        session.gold_due += self.gold_rate
        session.reask_due = min(session.reask_due + self.reask_rate, 2.0)
        if session.gold_due >= 1:
            session.gold_due -= 1
            gold = _store_call("Could not fetch the next pair", self.store.next_gold, session.user, self.rng)
            if gold is not None:
                return gold, None, None
        if session.reask_due >= 1:
            lab = _store_call("Could not fetch the next pair", self.store.next_reask, session.user,
                              self.reask_gap, self.rng)
            if lab is not None:
                session.reask_due -= 1
                comp = _store_call("Could not load the pair", self.store.get_comparison, lab.comparison_id)
                return comp, ("b" if lab.left == "a" else "a"), lab.id
        return comp, None, None

    def next_view(self, session: Session, *, comparison_id: int | None = None,
                  left: str | None = None, reask_of: int | None = None, labelled: int = 0) -> View:
        """Show the next pair (or ``comparison_id``, e.g. after undo) with a random left side.

        While the annotator's queue is not empty, a ``gold_rate`` share of pairs are gold pairs and
        a ``reask_rate`` share re-ask one of their older labels with the sides swapped; the screen
        is the same for all three (the annotator cannot tell them apart)."""
        self._require_user(session)
        comp = None
        if comparison_id is not None:
            try:
                comp = _store_call("Could not load the pair", self.store.get_comparison, comparison_id)
            except NotFound:
                comp, reask_of = None, None
        if comp is None:
            reask_of = None
            who = _store_call("Could not read the account", self.store.get_annotator, session.user)
            if who.paused:
                session.shown = None
                prog = self._progress(session.user, labelled)
                return View([], "", "", None, None, "", None, prog["done"], prog["assigned"], prog["remaining"],
                            paused=True)
            comp = _store_call("Could not fetch the next pair", self.store.next_comparison,
                               session.user, self.overlap)
            if comp is not None:
                comp, left, reask_of = self._check_instead(session, comp)
        prog = self._progress(session.user, labelled)
        if comp is None:
            session.shown = None
            return View([], "", "", None, None, "", None, prog["done"], prog["assigned"], prog["remaining"])
        left = left if left in ("a", "b") else self.rng.choice("ab")
        session.shown = Shown(secrets.token_hex(12), comp.id, left, time.monotonic(), reask_of)
        a, b = comp.response_a, comp.response_b
        lm, rm = (a, b) if left == "a" else (b, a)
        return View(comp.prompt, _text(lm), _text(rm), lm, rm, session.shown.request_id, comp.id,
                    prog["done"], prog["assigned"], prog["remaining"])

    def submit(self, session: Session, choice: str, request_id: str, rationale: str | None = None,
               confidence: float | None = None) -> tuple[View | None, str]:
        """Store the label for the pair on screen, then return the next pair.

        Returns ``(view, message)``; ``view`` is None when the click was a duplicate of one
        already handled (the screen already moved on) — the UI then leaves the page as it is.
        """
        self._require_user(session)
        if choice not in DISPLAY_CHOICES:
            raise AppError(f"Unknown choice {choice!r}.")
        with self._lock(session.user):
            shown = session.shown
            if shown is None or request_id != shown.request_id:
                return None, ""  # a stale or repeated click: that pair was handled already
            store_choice = {"A": shown.left, "B": "b" if shown.left == "a" else "a"}.get(choice, choice)
            seconds = round(time.monotonic() - shown.shown_at, 3)
            rationale = (rationale or "").strip() or None
            labelled = 0
            try:
                if shown.reask_of is not None:
                    rid = _store_call("Could not save your label", self.store.submit_reask, shown.reask_of,
                                      store_choice, left=shown.left, seconds=seconds, request_id=request_id)
                    session.last_reask = (rid, shown)
                else:
                    _store_call("Could not save your label", self.store.submit_label, shown.comparison_id,
                                session.user, store_choice, left=shown.left, rationale=rationale,
                                confidence=confidence, seconds=seconds, request_id=request_id)
                    session.last_reask, labelled = None, 1
                msg = f"Saved: {CHOICE_TEXT[choice]}"
            except LabelExists:  # labelled in another tab meanwhile: keep that one
                msg = "You had already labelled this pair (kept your earlier label)"
            except NotFound:
                msg = "That pair was removed from the store; skipped it"
            session.handled[request_id] = shown.comparison_id
            if len(session.handled) > 50:
                session.handled.pop(next(iter(session.handled)))
            return self.next_view(session, labelled=labelled), msg

    def undo(self, session: Session) -> tuple[View, str]:
        """Delete the annotator's last label and show that pair again, same sides as before."""
        self._require_user(session)
        with self._lock(session.user):
            if session.last_reask is not None:  # the last answer was a re-ask: take that back
                rid, shown = session.last_reask
                session.last_reask = None
                _store_call("Could not undo", self.store.delete_reask, rid)
                return (self.next_view(session, comparison_id=shown.comparison_id, left=shown.left,
                                       reask_of=shown.reask_of), "Undid your last label")
            last = _store_call("Could not undo", self.store.undo_last, session.user)
            if last is None:
                return self.next_view(session) if session.shown is None else self.current_view(session), \
                    "Nothing to undo"
            view = self.next_view(session, comparison_id=last.comparison_id, left=last.left, labelled=-1)
            what = {"a": "A", "b": "B"}.get(last.choice, last.choice)
            if last.choice in ("a", "b") and last.left in ("a", "b"):  # say it in displayed sides
                what = "A" if last.choice == last.left else "B"
            return view, f"Undid your last label ({CHOICE_TEXT.get(what, what)})"

    def current_view(self, session: Session) -> View:
        """The pair already on screen, re-sent (same request id), or the next one."""
        self._require_user(session)
        if session.shown is None:
            return self.next_view(session)
        s = session.shown
        rid, shown_at = s.request_id, s.shown_at
        view = self.next_view(session, comparison_id=s.comparison_id, left=s.left, reask_of=s.reask_of)
        if session.shown is not None and session.shown.comparison_id == s.comparison_id:
            session.shown.request_id, session.shown.shown_at = rid, shown_at
            view.request_id = rid
        return view

    # ----------------------------------------------------------------------- admin
    def _require_user(self, session: Session) -> None:
        if session is None or not session.user:
            raise AppError("Please log in first.")
        now = self.clock()
        if self.idle_timeout and now - session.last_seen > self.idle_timeout:
            session.user = session.role = session.shown = None
            raise AppError("Your session expired after inactivity; please log in again.")
        session.last_seen = now

    def require_admin(self, session: Session) -> None:
        self._require_user(session)
        if not session.is_admin:
            raise AppError("Only admins can do this.")

    def add_prompts(self, session: Session, text: str | None, file: str | None,
                    source: str = "app", limit: int = 0) -> list[int]:
        """Store prompts from pasted text (one per line) and/or a JSON/JSONL file (its first ``limit``
        records; 0 = all); their ids."""
        self.require_admin(session)
        prompts = parse_prompts(text, file, limit)
        if not prompts:
            raise AppError("No prompts: paste one per line or upload a .jsonl file.")
        ids = []
        for p in prompts:
            ids.append(_store_call("Could not store the prompts", self.store.add_prompt, p, source=source))
        return list(dict.fromkeys(ids))

    def load_model(self, path: str):
        """A cached ``(model, tokenizer)``; imports torch/transformers only now."""
        path = (path or "").strip()
        if not path:
            raise AppError("Give a model directory (a run's final/ or any Hugging Face causal LM).")
        p = Path(path).expanduser()
        if not p.exists():
            raise AppError(f"Model directory not found: {path}")
        if p.is_dir() and not ((p / "config.json").exists() or (p / "adapter_config.json").exists()):
            raise AppError(f"{path} is not a model directory (no config.json; a run's model is in final/)")
        key = str(p.resolve())
        with self._models_lock:
            if key not in self._models:
                from align.models import default_device, load, load_tokenizer  # lazy: torch is heavy

                try:
                    self._models[key] = (load(p, device=default_device(), key="models"), load_tokenizer(p, "models"))
                except Exception as e:  # a broken dir fails in transformers/safetensors/torch in many ways
                    raise AppError(f"Could not load the model in {path}: {type(e).__name__}: {e}") from e
            return self._models[key]

    def generate_pairs(self, session: Session, prompt_ids: Sequence[int], model_a: str,
                       model_b: str | None = None, *, temperature: float = 0.8, top_p: float = 0.95,
                       max_new_tokens: int = 64, priority: float = 0.0, seed: int | None = None,
                       progress: Callable[[float, str], None] | None = None) -> dict:
        """Two candidates per prompt (two samples of one model, or one from each of two), stored as
        responses with model id and settings, then one queued comparison per prompt."""
        self.require_admin(session)
        if not prompt_ids:
            raise AppError("No prompts to generate for.")
        if max_new_tokens < 1 or not 0 <= temperature <= 5 or not 0 < top_p <= 1:
            raise AppError("Sampling settings out of range: max_new_tokens ≥ 1, 0 ≤ temperature ≤ 5, "
                           "0 < top_p ≤ 1.")
        model_b = (model_b or "").strip() or None
        models = [model_a.strip()] + ([model_b] if model_b else [])
        loaded = [self.load_model(m) for m in models]  # fail fast, before any work
        from align.generate import generate

        do_sample = temperature > 0
        settings = {"temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens,
                    "do_sample": do_sample, "seed": seed}
        prompts = [self.store.get_prompt(i)["messages"] for i in prompt_ids]
        outs: list[list[tuple[str, str]]] = [[] for _ in prompts]  # (model id, text) x2 per prompt
        n_each = 2 if len(models) == 1 else 1
        batch = 8  # prompts per generate call: on a CPU one call takes minutes, and progress moves per call
        total = len(models) * len(prompts)
        done = 0
        t0 = time.monotonic()
        for name, (model, tok) in zip(models, loaded):
            for start in range(0, len(prompts), batch):
                chunk = prompts[start : start + batch]
                if progress:
                    progress(done / total, f"{name}: replies to prompts {start + 1}-{start + len(chunk)} "
                                           f"of {len(prompts)}")
                try:
                    texts = generate(model, tok, chunk, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                     temperature=temperature or 1.0, top_p=top_p,
                                     num_return_sequences=n_each, seed=seed)
                except Exception as e:  # torch/tokenizer errors of any class: show them, keep the app
                    raise AppError(f"Generation with {name} failed: {type(e).__name__}: {e}") from e
                for j, replies in enumerate(texts):
                    outs[start + j].extend((name, t) for t in replies)
                done += len(chunk)
        seconds = time.monotonic() - t0  # generation only: the models were loaded before
        made = 0
        for pid, ((ma, ta), (mb, tb)) in zip(prompt_ids, outs):
            cid = _store_call("Could not store a comparison", self.store.add_candidates, pid, ta, tb, model_a=ma,
                              model_b=mb, settings=settings, priority=priority, source="app:generate")
            made += cid is not None
        n = 2 * len(prompt_ids)
        return {"prompts": len(prompt_ids), "comparisons": made, "identical": len(prompt_ids) - made,
                "candidates": n, "seconds": round(seconds, 1), "seconds_per_candidate": round(seconds / n, 2)}

    def import_pairs(self, session: Session, file: str | None, queue: bool, priority: float = 0.0) -> str:
        self.require_admin(session)
        if not file:
            raise AppError("Upload a preference file (.jsonl / .json) first.")
        try:
            report = _store_call("Import failed", self.store.import_file, file, source=Path(file).name,
                                 priority=priority if queue else None)
        except DataError as e:
            raise AppError(f"Nothing imported — {_short_path(str(e), file)}") from e
        return report.summary().replace(str(file), Path(file).name)

    def export(self, session: Session, out_dir: str | Path, *, format: str = "conversational",
               min_labels: int = 1, min_agreement: float = 0.0, kinds: Sequence[str] | None = None,
               aggregate: str = "majority") -> tuple[Path, str]:
        """TRL preference rows; ``aggregate`` 'majority' or 'reliability' (annotator-aware, with
        ``p_chosen`` and ``weight`` columns)."""
        self.require_admin(session)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"preferences-{format}-{aggregate}-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
        res = _store_call("Export failed", self.store.export, path, format=format, min_labels=min_labels,
                          min_agreement=min_agreement, kinds=list(kinds) if kinds else None,
                          aggregate=aggregate, soft=aggregate == "reliability")
        n = sum(res.get("files", {}).values()) if isinstance(res, dict) else "?"
        how = "annotator-aware (soft labels)" if aggregate == "reliability" else "majority vote"
        return path, f"Exported **{n}** pairs ({how}) in TRL {format} format → `{path.name}`"


def _wait_message(wait: float, locked: bool) -> str:
    if locked:
        return (f"Too many failed sign-ins: sign-in is locked for {math.ceil(wait / 60)} min "
                "(an admin can unlock it).")
    return f"Too many failed sign-ins: wait {math.ceil(wait)} s before trying again."


def _short_path(msg: str, path: str) -> str:
    return msg.replace(str(path), Path(path).name)


def _text(messages: list[dict]) -> str:
    return "\n\n".join(m.get("content", "") for m in messages)


# ----------------------------------------------------------------------------- parsing helpers
def parse_prompts(text: str | None, file: str | None, limit: int = 0) -> list:
    """Prompts from pasted lines and/or a JSON/JSONL file (``prompt``: string or messages;
    ``messages``; ``instruction`` (+ ``input``); ``question``; ``text``; else a preference record's
    prompt, e.g. an HH ``chosen``/``rejected`` transcript). ``limit``: the file's first records only
    (0 = all): a 300-record file need not mean 600 candidates. Errors name the line."""
    if limit < 0:
        raise AppError(f"The number of prompts to take from the file must be >= 0 (0 = all), got {limit}.")
    out: list = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if file:
        try:
            for n, (key, rec) in enumerate(read_records(file)):
                if limit and n >= limit:
                    break
                out.append(to_prompt(rec, location(Path(file).name, key)))
        except DataError as e:
            raise AppError(f"Nothing added — {_short_path(str(e), file)}") from e
    return out
