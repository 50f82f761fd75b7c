"""The app's event handlers as plain functions over ``Backend``, each returning a screen dataclass.

``app.ui`` lays out the Gradio components and maps these dataclasses onto them; tests call the
handlers directly. A handler never raises for a user's mistake or a store outage: it returns a
screen with ``error`` set (and the UI shows a warning); anything unexpected is logged with its
traceback and shown the same way, so one bad request never takes the page down.
"""

from __future__ import annotations

import functools
import logging
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from app import dashboard as D
from app.backend import AppError, Backend, Session, View, parse_prompts

log = logging.getLogger("align.app")

NO_ACCOUNTS_HINT = (" There are no accounts yet: create one with `python -m app configs/app.yaml "
                    "--create_admin NAME:PASSWORD --serve false`.")


def _problem(fn_name: str, e: Exception) -> str:
    if isinstance(e, AppError):
        return str(e)
    log.error("%s failed:\n%s", fn_name, traceback.format_exc())
    return f"Unexpected error: {type(e).__name__}: {e}"


def guarded(make_error: Callable[[str], Any]):
    """Turn an exception in the handler into ``make_error(message)``."""
    def wrap(fn):
        @functools.wraps(fn)
        def run(*a, **kw):
            try:
                return fn(*a, **kw)
            except Exception as e:  # AppError or a bug: the page stays up and says what happened
                return make_error(_problem(fn.__name__, e))
        return run
    return wrap


# ----------------------------------------------------------------------------- annotator screen
@dataclass
class Screen:
    """The annotator page after an event.

    ``keep``: leave the page as it is (a repeated click, an error) apart from ``message`` (None:
    leave the status line too). Otherwise show ``session`` (logged in or not) with ``view``.
    """

    session: Session | None = None
    view: View | None = None
    message: str | None = ""
    error: str | None = None
    keep: bool = False
    login_message: str | None = None  # the login box's line (set by login / logout)
    clear_password: bool = False

    @property
    def logged_in(self) -> bool:
        return bool(self.session and self.session.user)

    def data(self) -> dict:
        """The screen as data (the page's hidden JSON: for API clients, tests and the load bench)."""
        if self.keep:
            return {"error": self.error} if self.error is not None else {}
        s = self.session or Session()
        out: dict = {"user": s.user, "role": s.role, "message": self.message}
        v = self.view
        if v is not None:
            out.update(request_id=v.request_id, comparison_id=v.comparison_id, empty=v.empty, paused=v.paused,
                       prompt=v.prompt, left=v.left_text, right=v.right_text, done=v.done, assigned=v.assigned,
                       remaining=v.remaining)
        return out


def _error_screen(msg: str) -> Screen:
    return Screen(keep=True, message=f"⚠️ {msg}", error=msg)


def login(backend: Backend, session: Session, name: str, password: str, address: str | None = None) -> Screen:
    try:
        session = backend.login(session, name, password, address)
        view = backend.next_view(session)
    except AppError as e:
        msg = str(e)
        if msg.startswith("Wrong") and not backend.has_accounts():
            msg += NO_ACCOUNTS_HINT
        return Screen(keep=True, message=None, error=msg, login_message=f"⚠️ {msg}", clear_password=True)
    return Screen(session, view, login_message="", clear_password=True)


def logout(backend: Backend, session: Session) -> Screen:
    return Screen(Session(), None, login_message="", clear_password=True)


@guarded(_error_screen)
def submit(backend: Backend, session: Session, choice: str, request_id: str, rationale: str | None = None,
           confidence: float | None = None) -> Screen:
    view, msg = backend.submit(session, choice, request_id, rationale, confidence)
    if view is None:  # duplicate click: already handled, the screen has moved on
        return Screen(keep=True, message=None)
    return Screen(session, view, f"✓ {msg} · press U to undo")


@guarded(_error_screen)
def show_next(backend: Backend, session: Session) -> Screen:
    return Screen(session, backend.current_view(session))


@guarded(_error_screen)
def undo(backend: Backend, session: Session) -> Screen:
    view, msg = backend.undo(session)
    return Screen(session, view, f"↶ {msg}")


# ----------------------------------------------------------------------------------- admin
@dataclass
class Notice:
    """An admin action's outcome: a Markdown line; ``ok`` (the UI then clears the form)."""

    message: str
    ok: bool = True
    path: str | None = None  # a file to download (export)
    people: list[list] | None = None  # the refreshed accounts table


def _notice_error(msg: str) -> Notice:
    return Notice(f"⚠️ {msg}", ok=False)


def people_rows(people: list[dict]) -> list[list]:
    return [[a["name"], a["role"], a["kind"], a["labels"], "paused" if a.get("paused") else ""] for a in people]


@guarded(_notice_error)
def generate(backend: Backend, session: Session, text: str | None, file: str | None, model_a: str | None,
             model_b: str | None, temperature: float | None, top_p: float | None, max_new_tokens: float | None,
             priority: float | None, seed: int | None = None,
             progress: Callable[[float, str], None] | None = None, limit: float | None = 0) -> Notice:
    """``limit``: how many of the file's prompts (its first; 0 = all)."""
    backend.require_admin(session)
    progress = progress or (lambda f, d: None)
    limit = int(limit or 0)
    if not parse_prompts(text, file, limit):  # check the input and the models before storing anything
        raise AppError("No prompts: paste one per line or upload a .jsonl file.")
    progress(0, "loading models")
    backend.load_model(model_a or "")
    if (model_b or "").strip():
        backend.load_model(model_b)
    ids = backend.add_prompts(session, text, file, limit=limit)
    res = backend.generate_pairs(session, ids, model_a or "", model_b, temperature=float(temperature or 0),
                                 top_p=float(top_p or 1), max_new_tokens=int(max_new_tokens or 1),
                                 priority=float(priority or 0), seed=seed, progress=progress)
    msg = (f"✓ {res['prompts']} prompts → **{res['comparisons']} new pairs** queued · {res['candidates']} candidates "
           f"in {res['seconds']:g} s ({res['seconds_per_candidate']:g} s each)")
    if res["identical"]:
        msg += f" · {res['identical']} prompts got two identical candidates (not queued; raise temperature)"
    return Notice(msg)


@guarded(_notice_error)
def import_pairs(backend: Backend, session: Session, file: str | None, queue: bool, priority: float | None) -> Notice:
    return Notice("✓ " + backend.import_pairs(session, file, bool(queue), float(priority or 0)))


@guarded(_notice_error)
def export(backend: Backend, session: Session, export_dir: Path, fmt: str, humans_only: bool,
           min_labels: float | None, aggregate: str = "majority") -> Notice:
    path, msg = backend.export(session, export_dir, format=fmt, min_labels=int(min_labels or 1),
                               kinds=["human"] if humans_only else None, aggregate=aggregate)
    return Notice("✓ " + msg, path=str(path))


@guarded(_notice_error)
def add_account(backend: Backend, session: Session, name: str, password: str, role: str) -> Notice:
    msg = backend.add_annotator(session, name, password, role)
    return Notice("✓ " + msg, people=people_rows(backend.people(session)))


@guarded(_notice_error)
def annotator_action(backend: Backend, session: Session, name: str, action: str) -> Notice:
    """``action``: 'pause' | 'resume' | 'unlock'."""
    if action == "unlock":
        msg = backend.unlock(session, name)
    elif action in ("pause", "resume"):
        msg = backend.set_paused(session, name, action == "pause")
    else:
        raise AppError(f"Unknown action {action!r}.")
    return Notice("✓ " + msg, people=people_rows(backend.people(session)))


@guarded(_notice_error)
def mark_gold(backend: Backend, session: Session, comparison_ids: str, answer: str) -> Notice:
    return Notice("✓ " + backend.mark_gold(session, comparison_ids, answer))


@guarded(_notice_error)
def import_gold(backend: Backend, session: Session, file: str | None) -> Notice:
    return Notice("✓ " + backend.import_gold(session, file))


QUALITY_HEADERS = ["annotator", "labels", "labels/hour", "s/label", "gold acc.", "gold n", "self-consistency",
                   "re-asks", "agreement", "left share", "est. accuracy", "status"]


def quality_rows(quality: list[dict]) -> list[list]:
    def f(x, pct=False):
        return "—" if x is None else (f"{100 * x:.0f}%" if pct else f"{x:g}")
    return [[q["name"], q["labels"], f(q["labels_per_hour"]), f(q["seconds_per_label"]),
             f(q["gold_accuracy"], True), q["gold_n"], f(q["self_consistency"], True), q["reasks_n"],
             f(q["agreement"], True), f(q["left_share"], True), f(q["estimated_accuracy"], True),
             "paused" if q["paused"] else "active"] for q in quality if q["kind"] == "human"]


@dataclass
class Dashboard:
    summary: str
    figures: dict[str, Any] = field(default_factory=dict)  # name -> matplotlib figure
    agreement: list[list] | None = None
    people: list[list] | None = None
    quality: list[list] | None = None
    blocked: list[list] | None = None
    error: str | None = None


@guarded(lambda msg: Dashboard(f"⚠️ {msg}", error=msg))
def dashboard(backend: Backend, session: Session) -> Dashboard:
    d = backend.dashboard(session)
    labels, stats = d["labels"], d["stats"]
    figs = {"time": D.labels_over_time(labels), "dist": D.label_distribution(labels),
            "bias": D.position_bias(d["quality"]), "secs": D.seconds_per_label(labels)}
    return Dashboard(D.summary_markdown(stats, labels), figs, D.agreement_table(stats, labels) or None,
                     people_rows(d["people"]), quality_rows(d["quality"]),
                     [[b["kind"], b["key"], b["failures"], b["wait_s"]] for b in d["blocked"]] or None)


@dataclass
class LoopScreen:
    message: str
    plot: str | None = None
    table: Any = None  # a pandas DataFrame: the rounds' figures
    log: str = ""
    rounds: int | None = None
    running: bool = False
    error: str | None = None


def _loop_error(msg: str) -> LoopScreen:
    return LoopScreen(f"⚠️ {msg}", error=msg)


def _loop_guard(fn):
    """A bad loop config or a run already going is the admin's to fix: say so, no traceback."""
    @functools.wraps(fn)
    def run(*a, **kw):
        try:
            return fn(*a, **kw)
        except (RuntimeError, OSError, ValueError) as e:
            return _loop_error(str(e))
    return guarded(_loop_error)(run)


@_loop_guard
def loop_status(backend: Backend, session: Session, runner) -> LoopScreen:
    from app.loop_runner import rounds_table, status_markdown

    backend.require_admin(session)
    st = runner.status()
    table = rounds_table(st["report"])
    return LoopScreen(status_markdown(st), st["plot"], None if table.empty else table, st["log"], st["rounds"],
                      st["running"])


@_loop_guard
def loop_run(backend: Backend, session: Session, runner, rounds: float | None, wait: bool) -> LoopScreen:
    backend.require_admin(session)
    started = runner.start(int(rounds) if rounds else None, wait=bool(wait))
    screen = loop_status(backend, session, runner)
    screen.message = f"{started}\n\n{screen.message}"
    return screen
