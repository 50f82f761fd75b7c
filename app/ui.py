"""The Gradio UI: login, the A/B labelling screen and the admin tabs, over ``app.backend.Backend``.

Named API endpoints (``gradio_client.Client(url).predict(..., api_name=...)``; one client = one
session, so call ``/login`` first): ``/login``, ``/logout``, ``/next``, ``/submit`` (choice in
A | B | tie | both_bad | skip, the displayed pair's request id, rationale, confidence), ``/undo``,
``/generate``, ``/import_pairs``, ``/dashboard``, ``/export``, ``/add_account``, ``/loop_run`` (rounds, wait).
"""

from __future__ import annotations

import functools
import logging
import tempfile
import traceback
from pathlib import Path
from typing import Any

import gradio as gr

from app import dashboard as D
from app.backend import AppError, Backend, Session, Store, View, parse_prompts
from app.loop_runner import LoopRunner, rounds_table, status_markdown
from app.render import chat_messages, header_html, response_markdown

log = logging.getLogger("align.app")
STATIC = Path(__file__).parent / "static"
CONFIDENCE = [("low", 1 / 3), ("medium", 2 / 3), ("high", 1.0)]
KEY_HINT = ('<div class="al-kbd">Keys: <kbd>1</kbd> A better · <kbd>2</kbd> B better · <kbd>3</kbd> tie · '
            '<kbd>4</kbd> both bad · <kbd>5</kbd> skip · <kbd>U</kbd> undo · <kbd>Esc</kbd> leaves the text box</div>')


def theme() -> gr.themes.Base:
    return gr.themes.Soft(primary_hue="indigo", neutral_hue="slate", radius_size="md",
                          font=["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Roboto", "sans-serif"]
                          ).set(block_padding="10px", layout_gap="12px")


def launch_kwargs(args: Any = None) -> dict:
    """Theme and CSS: Gradio 6 takes them in ``launch()`` / ``mount_gradio_app()``."""
    return {"theme": theme(), "css": (STATIC / "app.css").read_text(), "footer_links": ["api"]}


def _guidelines(path: str) -> str:
    p = Path(path)
    if not p.exists():
        return f"*No guidelines file found at `{path}` — set `guidelines:` in configs/app.yaml.*"
    return p.read_text(encoding="utf-8")


def _card_head(letter: str, hint: str) -> str:
    cls = "al-card-letter b" if letter == "B" else "al-card-letter"
    return f'<div class="al-card-head"><span class="{cls}">{letter}</span><span class="al-card-hint">{hint}</span></div>'


EMPTY_MD = """## All done — nothing left to label

There are no pairs waiting for you right now — thank you! New pairs appear here when the admin adds
prompts; press **Check again** to look."""


def build_app(args) -> gr.Blocks:
    """The app on the store at ``args.db``; ``args`` is an ``AppArguments``."""
    store = Store(args.db)
    try:
        store.init()
    except Exception as e:  # keep serving: the login screen says what is wrong
        log.warning("store %s not ready: %s", args.db, e)
    backend = Backend(store, overlap=args.overlap)
    export_dir = Path(args.export_dir) if args.export_dir else Path(tempfile.mkdtemp(prefix="align-export-"))
    guidelines = _guidelines(args.guidelines)
    title = args.title

    with gr.Blocks(title=title, analytics_enabled=False, fill_width=True) as demo:
        demo.align_backend = backend  # for tests and embedding
        state = gr.State(Session())
        with gr.Row(equal_height=True, elem_classes="al-header-row"):
            header = gr.HTML(header_html(None, None, title=title), padding=False)
            logout_btn = gr.Button("Log out", size="sm", variant="secondary", visible=False, elem_id="al-logout",
                                   scale=0)

        # ------------------------------------------------------------------ login
        with gr.Column(visible=True, elem_classes="al-login") as login_col:
            gr.Markdown("## Sign in\nUse the account your project admin gave you.")
            name_box = gr.Textbox(label="Name", autofocus=True, elem_id="al-name")
            pw_box = gr.Textbox(label="Password", type="password", elem_id="al-password")
            login_btn = gr.Button("Sign in", variant="primary", elem_id="al-login-btn")
            login_msg = gr.Markdown("", elem_id="al-login-msg", elem_classes="al-login-msg")

        # ------------------------------------------------------------------ main
        with gr.Column(visible=False) as main_col:
            with gr.Tabs():
                with gr.Tab("Label", id="label"):
                    with gr.Accordion("Guidelines — how to judge a pair", open=False, elem_id="al-guidelines"):
                        gr.Markdown(guidelines)
                    with gr.Column(visible=True) as pair_col:
                        gr.HTML('<div class="al-section-title">Prompt</div>', padding=False)
                        prompt_md = gr.Markdown("", elem_id="al-prompt-text", elem_classes="al-prompt-text",
                                                container=False, sanitize_html=True, line_breaks=True, max_height=300)
                        prompt_box = gr.Chatbot(show_label=False, height="auto", max_height=340, visible=False,
                                                elem_id="al-prompt", elem_classes="al-prompt", buttons=[],
                                                feedback_options=None, allow_tags=False, sanitize_html=True, group_consecutive_messages=False,
                                                line_breaks=True)
                        with gr.Row(equal_height=True, elem_classes="al-cards"):
                            with gr.Column(elem_classes="al-card"):
                                gr.HTML(_card_head("A", "Response A"), padding=False)
                                left_md = gr.Markdown("", elem_id="al-left", elem_classes="al-card-body",
                                                      sanitize_html=True, line_breaks=True, max_height=560)
                            with gr.Column(elem_classes="al-card"):
                                gr.HTML(_card_head("B", "Response B"), padding=False)
                                right_md = gr.Markdown("", elem_id="al-right", elem_classes="al-card-body",
                                                       sanitize_html=True, line_breaks=True, max_height=560)
                        with gr.Row(elem_classes="al-actions"):
                            btn_a = gr.Button("◀  A is better   [1]", elem_id="btn-a", scale=3)
                            btn_tie = gr.Button("Tie   [3]", elem_id="btn-tie", variant="secondary", scale=2)
                            btn_bad = gr.Button("Both bad   [4]", elem_id="btn-bad", variant="secondary", scale=2)
                            btn_b = gr.Button("B is better  ▶   [2]", elem_id="btn-b", scale=3)
                        with gr.Row(equal_height=True):
                            rationale = gr.Textbox(label="Rationale (optional)", lines=1, max_lines=4,
                                                   placeholder="Why? (Esc to leave the box, then use the keys)",
                                                   elem_id="al-rationale", scale=4)
                            confidence = gr.Radio(CONFIDENCE, label="Confidence (optional)", value=None,
                                                  elem_id="al-confidence", scale=2)
                            with gr.Column(scale=1, min_width=120):
                                btn_skip = gr.Button("Skip   [5]", elem_id="btn-skip", size="sm", variant="secondary")
                                btn_undo = gr.Button("↶ Undo   [U]", elem_id="btn-undo", size="sm", variant="secondary")
                        gr.HTML(KEY_HINT, padding=False)
                    with gr.Column(visible=False, elem_classes="al-empty") as empty_col:
                        gr.Markdown(EMPTY_MD)
                        refresh_btn = gr.Button("Check again", variant="primary", size="sm", elem_id="al-refresh")
                    status = gr.Markdown("", elem_id="al-status", elem_classes="al-status")
                    rid = gr.Textbox(visible=False, elem_id="al-rid")
                    choice_box = gr.Textbox(visible=False)  # for the /submit API endpoint
                    submit_btn = gr.Button(visible=False)
                    info = gr.JSON(visible=False)  # the screen as data, for API clients and tests

                with gr.Tab("Admin", id="admin", visible=False) as admin_tab:
                    admin = _admin_tab(args, backend, state, export_dir)

        # --------------------------------------------------------------- wiring
        screen_outs = [state, header, logout_btn, login_col, main_col, admin_tab, prompt_md, prompt_box, left_md,
                       right_md, rid, rationale, confidence, status, pair_col, empty_col, info]
        n_screen = len(screen_outs)

        def screen(session: Session, view: View | None, msg: str = "", clear_inputs: bool = True) -> tuple:
            logged = bool(session.user)
            data = {"user": session.user, "role": session.role, "message": msg}
            if view is None:
                head = header_html(session.user, session.role, title=title)
                chat, left, right, r, empty = [], "", "", "", False
                multi = False
            else:
                data.update(request_id=view.request_id, comparison_id=view.comparison_id, empty=view.empty,
                            prompt=view.prompt, left=view.left_text, right=view.right_text, done=view.done,
                            assigned=view.assigned, remaining=view.remaining)
                head = header_html(session.user, session.role, view.done, view.assigned, view.remaining, title)
                chat = chat_messages(view.prompt)
                multi = len(view.prompt) > 1
                left = response_markdown(view.left_text, view.left_messages)
                right = response_markdown(view.right_text, view.right_messages)
                r, empty = view.request_id, view.empty
            return (session, head, gr.update(visible=logged), gr.update(visible=not logged),
                    gr.update(visible=logged), gr.update(visible=session.is_admin),
                    gr.update(value="" if multi or not chat else chat[0]["content"], visible=not multi),
                    gr.update(value=chat if multi else [], visible=multi), left, right, r,
                    "" if clear_inputs else gr.skip(), None if clear_inputs else gr.skip(), msg,
                    gr.update(visible=logged and not empty), gr.update(visible=logged and empty), data)

        def keep(msg: Any, error: str | None = None) -> tuple:
            """Leave the screen as it is; show ``msg`` in the status line (and ``error`` to API clients)."""
            out = [gr.skip()] * n_screen
            out[screen_outs.index(status)] = msg
            if error is not None:
                out[screen_outs.index(info)] = {"error": error}
            return tuple(out)

        def guarded(fn):
            @functools.wraps(fn)
            def run(*a):
                try:
                    return fn(*a)
                except AppError as e:
                    gr.Warning(str(e))
                    return keep(f"⚠️ {e}", str(e))
                except Exception as e:  # never let one bad request take the page down
                    log.error("%s failed:\n%s", fn.__name__, traceback.format_exc())
                    gr.Warning(f"Unexpected error: {type(e).__name__}: {e}")
                    return keep(f"⚠️ Unexpected error: {type(e).__name__}: {e}", f"{type(e).__name__}: {e}")
            return run

        def do_login(name: str, password: str, session: Session):
            try:
                session = backend.login(session, name, password)
                view = backend.next_view(session)
            except AppError as e:
                msg = str(e)
                if msg.startswith("Wrong") and not backend.has_accounts():
                    msg += (" There are no accounts yet: create one with `python -m app configs/app.yaml "
                            "--create_admin NAME:PASSWORD --serve false`.")
                return (*keep("", msg), "", f"⚠️ {msg}")
            return (*screen(session, view), "", "")

        def do_logout(session: Session):
            return (*screen(Session(), None), "", "")

        @guarded
        def do_submit(choice: str, request_id: str, why: str, conf, session: Session):
            view, msg = backend.submit(session, choice, request_id, why, conf)
            if view is None:  # duplicate click: already handled, the screen has moved on
                return keep(gr.skip())
            return screen(session, view, f"✓ {msg} · press U to undo")

        def clicked(choice: str):
            def fn(request_id, why, conf, session):
                return do_submit(choice, request_id, why, conf, session)
            fn.__name__ = f"choose_{choice}"
            return fn

        @guarded
        def do_next(session: Session):
            return screen(session, backend.current_view(session))

        @guarded
        def do_undo(session: Session):
            view, msg = backend.undo(session)
            return screen(session, view, f"↶ {msg}")

        label_inputs = [rid, rationale, confidence, state]
        fast = dict(outputs=screen_outs, show_progress="hidden", trigger_mode="once", queue=False,
                    )
        login_outs = [*screen_outs, pw_box, login_msg]
        login_btn.click(do_login, [name_box, pw_box, state], login_outs, api_name="login", concurrency_limit=8)
        pw_box.submit(do_login, [name_box, pw_box, state], login_outs, api_visibility="private")
        logout_btn.click(do_logout, [state], login_outs, api_name="logout")
        for btn, choice in ((btn_a, "A"), (btn_b, "B"), (btn_tie, "tie"), (btn_bad, "both_bad"), (btn_skip, "skip")):
            btn.click(clicked(choice), label_inputs, api_visibility="private", **fast)
        submit_btn.click(do_submit, [choice_box, *label_inputs], api_name="submit", **fast)
        btn_undo.click(do_undo, [state], api_name="undo", **fast)
        refresh_btn.click(do_next, [state], api_name="next", **fast)
        demo.load(None, js=(STATIC / "shortcuts.js").read_text())
        admin.wire()
    return demo


class _Admin:
    def __init__(self):
        self.wire = lambda: None


def _admin_tab(args, backend: Backend, state: gr.State, export_dir: Path) -> _Admin:
    """The admin sub-tabs; every handler re-checks the role on the server."""
    models = list(args.models) + ["", ""]
    runner = LoopRunner(args.loop_config, args.db)
    admin = _Admin()
    with gr.Tabs():
        with gr.Tab("Prompts → pairs"):
            gr.Markdown("Add prompts and generate **two candidates per prompt** — two samples of one model, "
                        "or one from each of two models. They are stored with the model id and sampling "
                        "settings and queued as comparisons for the annotators.")
            with gr.Row():
                with gr.Column(scale=3):
                    prompts_text = gr.Textbox(label="Prompts, one per line", lines=6, elem_id="al-prompts")
                    prompts_file = gr.File(label="…or a .jsonl / .json file (prompt, messages, instruction, "
                                                 "question or text per record)", file_types=[".jsonl", ".json", ".gz"],
                                           type="filepath", height=110)
                with gr.Column(scale=2):
                    model_a = gr.Textbox(label="Model 1 (a run's final/ or an HF causal LM dir)", value=models[0])
                    model_b = gr.Textbox(label="Model 2 (optional; empty = two samples of model 1)", value=models[1])
                    with gr.Row():
                        temperature = gr.Number(label="temperature", value=args.temperature, minimum=0, maximum=5,
                                                step=0.05)
                        top_p = gr.Number(label="top_p", value=args.top_p, minimum=0.01, maximum=1, step=0.01)
                        max_new = gr.Number(label="max_new_tokens", value=args.max_new_tokens, minimum=1,
                                            precision=0)
                    priority = gr.Number(label="Queue priority (higher = labelled first)", value=args.priority)
                    gen_btn = gr.Button("Add prompts & generate pairs", variant="primary", elem_id="al-generate")
            gen_msg = gr.Markdown("")
        with gr.Tab("Import pairs"):
            gr.Markdown("Upload a preference file (TRL / HH / UltraFeedback / ShareGPT styles; see docs/store.md). "
                        "The file's choice is stored as the label of the `dataset` labeller; a bad record "
                        "stops the import and nothing from the file is stored.")
            imp_file = gr.File(label="Preference file", file_types=[".jsonl", ".json", ".gz"], type="filepath",
                               height=110)
            with gr.Row():
                imp_queue = gr.Checkbox(label="Also queue these pairs for human annotators", value=False)
                imp_priority = gr.Number(label="priority", value=0.0)
            imp_btn = gr.Button("Import", variant="primary")
            imp_msg = gr.Markdown("")
        with gr.Tab("Dashboard") as dash_tab:
            with gr.Row():
                dash_summary = gr.Markdown("Press refresh.")
                dash_btn = gr.Button("↻ Refresh", size="sm", scale=0, min_width=100)
            with gr.Row():
                p_time = gr.Plot(show_label=False)
                p_dist = gr.Plot(show_label=False)
            with gr.Row():
                p_bias = gr.Plot(show_label=False)
                p_secs = gr.Plot(show_label=False)
            agree = gr.Dataframe(headers=["annotator 1", "annotator 2", "pairs", "agreement", "Cohen κ"],
                                 label="Agreement (pairs both labelled, skips left out)", interactive=False)
            people = gr.Dataframe(headers=["name", "role", "kind", "labels"], label="Labellers",
                                  interactive=False)
        with gr.Tab("Loop") as loop_tab:
            gr.Markdown("The closed loop on this store (`align.loop`, config `" + args.loop_config + "`): the "
                        "policy writes candidates, the reward model picks the pairs, **annotators label them "
                        "here**, then a new reward model trains on the labels and the policy learns (the config's "
                        "`policy_trainer`: DPO on the labelled pairs, or PPO/GRPO against the new reward model), and "
                        "the next round's candidates come back to the Label tab. Training runs in its own "
                        "process; labelling goes on meanwhile.")
            with gr.Row():
                loop_md = gr.Markdown("Press refresh.", elem_id="al-loop-status")
                loop_rounds = gr.Number(label="rounds", value=None, precision=0, minimum=1, scale=0, min_width=90)
                loop_wait = gr.Checkbox(label="keep running: train each round as soon as it is labelled", value=False,
                                        scale=0, min_width=200, elem_id="al-loop-wait")
                loop_btn = gr.Button("▶ Run the loop", variant="primary", scale=0, min_width=150,
                                     elem_id="al-loop-run")
                loop_refresh = gr.Button("↻ Refresh", size="sm", scale=0, min_width=100)
            with gr.Row():
                loop_plot = gr.Image(show_label=False, type="filepath", height=300, elem_id="al-loop-plot")
                loop_table = gr.Dataframe(headers=["round", "pairs", "EM greedy", "EM sampled", "maj@k", "preferred",
                                                   "RM accuracy"], label="Held-out figures per round (0 = start)",
                                          interactive=False)
            loop_log = gr.Textbox(label="Log (last lines)", lines=12, max_lines=12, interactive=False,
                                  elem_id="al-loop-log")
            loop_timer = gr.Timer(3.0, active=False)
        with gr.Tab("Export"):
            gr.Markdown("Majority vote per comparison over non-skip labels; ties, both-bad and split votes "
                        "are dropped. Rows are TRL preference rows (`prompt`, `chosen`, `rejected`).")
            with gr.Row():
                exp_format = gr.Dropdown(["conversational", "standard"], value="conversational", label="format")
                exp_humans = gr.Checkbox(label="human labels only", value=True)
                exp_min = gr.Number(label="min labels per pair", value=1, precision=0, minimum=1)
            exp_btn = gr.Button("Export", variant="primary")
            exp_file = gr.File(label="Download", interactive=False)
            exp_msg = gr.Markdown("")
        with gr.Tab("Accounts"):
            with gr.Row():
                acc_name = gr.Textbox(label="Name")
                acc_pw = gr.Textbox(label="Password", type="password")
                acc_role = gr.Radio(["annotator", "admin"], value="annotator", label="Role")
            acc_btn = gr.Button("Add account", variant="primary")
            acc_msg = gr.Markdown("")

    def err(e: Exception) -> str:
        if not isinstance(e, AppError):
            log.error("admin action failed:\n%s", traceback.format_exc())
        msg = str(e) if isinstance(e, AppError) else f"Unexpected error: {type(e).__name__}: {e}"
        gr.Warning(msg)
        return f"⚠️ {msg}"

    def do_generate(session, text, file, ma, mb, temp, tp, mnt, prio, progress=gr.Progress()):
        try:
            backend._require_admin(session)
            prompts = parse_prompts(text, file)  # check the input and the models before storing anything
            if not prompts:
                raise AppError("No prompts: paste one per line or upload a .jsonl file.")
            progress(0, desc="loading models")
            backend.load_model(ma or "")
            if (mb or "").strip():
                backend.load_model(mb)
            ids = backend.add_prompts(session, text, file)
            res = backend.generate_pairs(session, ids, ma or "", mb, temperature=float(temp or 0),
                                         top_p=float(tp or 1), max_new_tokens=int(mnt or 1),
                                         priority=float(prio or 0), seed=args.seed,
                                         progress=lambda f, d: progress(f, desc=d))
        except Exception as e:
            return err(e), gr.skip(), gr.skip()
        msg = f"✓ {res['prompts']} prompts → **{res['comparisons']} new pairs** queued"
        if res["identical"]:
            msg += f" · {res['identical']} prompts got two identical candidates (not queued; raise temperature)"
        return msg, "", None

    def do_import(session, file, queue, prio):
        try:
            return "✓ " + backend.import_pairs(session, file, bool(queue), float(prio or 0)), None
        except Exception as e:
            return err(e), gr.skip()

    def do_dashboard(session):
        try:
            backend._require_admin(session)
            labels = backend.store.labels()
            try:
                stats = backend.store.stats()
            except Exception as e:  # stats are extras: the plots come from the labels
                log.warning("stats unavailable: %s", e)
                stats = None
            people_rows = [[a["name"], a["role"], a["kind"], a["labels"]] for a in backend.store.list_annotators()]
        except Exception as e:
            return (err(e), *[gr.skip()] * 6)
        return (D.summary_markdown(stats, labels), D.labels_over_time(labels), D.label_distribution(labels),
                D.position_bias(labels), D.seconds_per_label(labels), D.agreement_table(stats, labels) or None,
                people_rows)

    def do_export(session, fmt, humans, min_labels):
        try:
            path, msg = backend.export(session, export_dir, format=fmt, min_labels=int(min_labels or 1),
                                       kinds=["human"] if humans else None)
            return str(path), "✓ " + msg
        except Exception as e:
            return None, err(e)

    def do_account(session, name, pw, role):
        try:
            msg = backend.add_annotator(session, name, pw, role)
            rows = [[a["name"], a["role"], a["kind"], a["labels"]] for a in backend.store.list_annotators()]
            return "✓ " + msg, "", "", rows
        except Exception as e:
            return err(e), gr.skip(), gr.skip(), gr.skip()

    def loop_err(e: Exception) -> str:  # a bad config or a run already going: say so, no traceback
        return err(AppError(str(e)) if isinstance(e, (RuntimeError, OSError, ValueError)) else e)

    def do_loop_status(session):
        try:
            backend._require_admin(session)
            st = runner.status()
        except Exception as e:
            return loop_err(e), *[gr.skip()] * 4, gr.Timer(active=False)
        return (status_markdown(st), st["plot"], rounds_table(st["report"]) or None, st["log"], st["rounds"],
                gr.Timer(active=st["running"]))

    def do_loop_run(session, rounds, wait):
        try:
            backend._require_admin(session)
            gr.Info(runner.start(int(rounds) if rounds else None, wait=bool(wait)))
        except Exception as e:
            loop_err(e)
        return do_loop_status(session)

    def wire():
        loop_outs = [loop_md, loop_plot, loop_table, loop_log, loop_rounds, loop_timer]
        loop_btn.click(do_loop_run, [state, loop_rounds, loop_wait], loop_outs, api_name="loop_run",
                       concurrency_limit=1)
        for ev in (loop_refresh.click, loop_tab.select, loop_timer.tick):
            ev(do_loop_status, [state], loop_outs, api_visibility="private", concurrency_limit=2)
        gen_btn.click(do_generate, [state, prompts_text, prompts_file, model_a, model_b, temperature, top_p,
                                    max_new, priority], [gen_msg, prompts_text, prompts_file],
                      api_name="generate", concurrency_limit=1, concurrency_id="generate")
        imp_btn.click(do_import, [state, imp_file, imp_queue, imp_priority], [imp_msg, imp_file],
                      api_name="import_pairs", concurrency_limit=2)
        dash_outs = [dash_summary, p_time, p_dist, p_bias, p_secs, agree, people]
        dash_btn.click(do_dashboard, [state], dash_outs, api_name="dashboard", concurrency_limit=2)
        dash_tab.select(do_dashboard, [state], dash_outs, api_visibility="private", concurrency_limit=2)
        exp_btn.click(do_export, [state, exp_format, exp_humans, exp_min], [exp_file, exp_msg], api_name="export",
                      concurrency_limit=2)
        acc_btn.click(do_account, [state, acc_name, acc_pw, acc_role], [acc_msg, acc_name, acc_pw, people],
                      api_name="add_account")

    admin.wire = wire
    return admin


def create_fastapi_app(args):
    """A FastAPI app with the labelling UI mounted at ``/`` (under ``args.root_path`` behind a proxy)
    and ``GET /healthz`` (200 when the store answers, 503 otherwise)."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    api = FastAPI(title=args.title)
    demo = build_app(args)

    @api.get("/healthz")
    def healthz():
        try:
            demo.align_backend.store.schema_version()
            return {"ok": True, "store": repr(demo.align_backend.store)}
        except Exception as e:
            return JSONResponse({"ok": False, "error": f"{type(e).__name__}: {e}"}, status_code=503)

    demo.queue(default_concurrency_limit=8)
    return gr.mount_gradio_app(api, demo, path="/", root_path=args.root_path or None, **launch_kwargs(args))
