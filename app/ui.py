"""The Gradio UI: login, the A/B labelling screen and the admin tabs, over ``app.backend.Backend``.

Named API endpoints (``gradio_client.Client(url).predict(..., api_name=...)``; one client = one
session, so call ``/login`` first): ``/login``, ``/logout``, ``/next``, ``/submit`` (choice in
A | B | tie | both_bad | skip, the displayed pair's request id, rationale, confidence), ``/undo``,
``/generate``, ``/import_pairs``, ``/dashboard``, ``/export``, ``/add_account``, ``/annotator_action``
(name, pause | resume | unlock), ``/mark_gold`` (ids, answer), ``/import_gold``, ``/loop_run`` (rounds, wait).

This file only lays out components and wires them: every handler is a plain function in
``app.handlers`` returning a dataclass, which the small ``_show_*`` functions here map onto components.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import gradio as gr

from app import handlers as H
from app.backend import Backend, Session, Store
from app.loop_runner import LoopRunner
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
    return (f'<div class="al-card-head"><span class="{cls}">{letter}</span>'
            f'<span class="al-card-hint">{hint}</span></div>')


EMPTY_MD = """## All done — nothing left to label

There are no pairs waiting for you right now — thank you! New pairs appear here when the admin adds
prompts; press **Check again** to look."""


def build_app(args) -> gr.Blocks:
    """The app on the store at ``args.db``; ``args`` is an ``AppArguments``."""
    store = Store(args.db, batch_labels=True)  # the server's threads share transactions and fsyncs
    try:
        store.init()
    except Exception as e:  # any driver's error: keep serving, the login screen says what is wrong
        log.warning("store %s not ready: %s", args.db, e)
    backend = Backend(store, overlap=args.overlap, gold_rate=args.gold_rate, reask_rate=args.reask_rate,
                      reask_gap=args.reask_gap, idle_timeout=60 * args.session_idle_minutes)
    export_dir = Path(args.export_dir) if args.export_dir else Path(tempfile.mkdtemp(prefix="align-export-"))
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
                        gr.Markdown(_guidelines(args.guidelines))
                    mode = gr.HTML(_mode_html(None), elem_id="al-mode", padding=False)
                    with gr.Column(elem_id="al-pair-col"):
                        gr.HTML('<div class="al-section-title">Prompt</div>', padding=False)
                        prompt_md = gr.Markdown("", elem_id="al-prompt-text", elem_classes="al-prompt-text",
                                                container=False, sanitize_html=True, line_breaks=True, max_height=300)
                        prompt_box = gr.Chatbot(show_label=False, height="auto", max_height=340,
                                                elem_id="al-prompt", elem_classes="al-prompt", buttons=[],
                                                feedback_options=None, allow_tags=False, sanitize_html=True,
                                                group_consecutive_messages=False, line_breaks=True)
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
                    with gr.Column(elem_classes="al-empty", elem_id="al-empty-col"):
                        empty_md = gr.Markdown(EMPTY_MD, elem_id="al-empty-text")
                        refresh_btn = gr.Button("Check again", variant="primary", size="sm", elem_id="al-refresh")
                    status = gr.Markdown("", elem_id="al-status", elem_classes="al-status")
                    rid = gr.Textbox(visible=False, elem_id="al-rid")
                    choice_box = gr.Textbox(visible=False)  # for the /submit API endpoint
                    submit_btn = gr.Button(visible=False)
                    info = gr.JSON(visible=False)  # the screen as data, for API clients and tests

                with gr.Tab("Admin", id="admin", visible=False) as admin_tab:
                    wire_admin = _admin_tab(args, backend, state, export_dir)

        # --------------------------------------------------------------- the annotator screen
        # The label path's outputs are value components only, and each screen gives all of them: in
        # Gradio 6 a skipped output or a visibility update rebuilds that block's config (pydantic JSON
        # schemas included) for the session — that was 30–40% of the server's time per click. Which of
        # pair / empty queue and text / chat prompt shows is switched by CSS on ``mode``'s classes
        # (static/app.css); only sign-in and sign-out change visibility.
        label_outs = [state, header, mode, prompt_md, prompt_box, left_md, right_md, rid, rationale, confidence,
                      status, empty_md, info]
        login_outs = [*label_outs, logout_btn, login_col, main_col, admin_tab, pw_box, login_msg]

        def show(screen: H.Screen, layout: bool = False) -> dict:
            """A ``Screen`` -> component updates; ``layout``: also the signed-in / signed-out layout."""
            out: dict = {info: screen.data()}
            if screen.error is not None:
                gr.Warning(screen.error)
            if screen.message is not None:
                out[status] = screen.message
            if screen.login_message is not None:
                out[login_msg] = screen.login_message
            if screen.clear_password:
                out[pw_box] = ""
            if screen.keep:
                return out
            s, v = screen.session or Session(), screen.view
            logged = bool(s.user)
            if layout:
                out.update({logout_btn: gr.update(visible=logged), login_col: gr.update(visible=not logged),
                            main_col: gr.update(visible=logged), admin_tab: gr.update(visible=s.is_admin)})
            out.update({state: s, rationale: "", confidence: None, mode: _mode_html(v), rid: "",
                        empty_md: PAUSED_MD if v is not None and v.paused else EMPTY_MD})
            if v is None:  # signed out
                out.update({header: header_html(None, None, title=title), prompt_md: "", prompt_box: [],
                            left_md: "", right_md: ""})
                return out
            out[header] = header_html(s.user, s.role, v.done, v.assigned, v.remaining, title)
            if v.empty:  # the hidden cards keep their text (skipped: rare, so its cost does not matter)
                return out
            chat = chat_messages(v.prompt)
            multi = len(v.prompt) > 1
            out.update({rid: v.request_id, prompt_md: "" if multi or not chat else chat[0]["content"],
                        prompt_box: chat if multi else [],
                        left_md: response_markdown(v.left_text, v.left_messages),
                        right_md: response_markdown(v.right_text, v.right_messages)})
            return out

        def client_address(request: gr.Request | None) -> str | None:
            return getattr(getattr(request, "client", None), "host", None)

        def do_login(name: str, password: str, session: Session, request: gr.Request):
            return show(H.login(backend, session, name, password, client_address(request)), layout=True)

        def do_logout(session: Session):
            return show(H.logout(backend, session), layout=True)

        def do_submit(choice: str, request_id: str, why: str, conf, session: Session):
            return show(H.submit(backend, session, choice, request_id, why, conf))

        def clicked(choice: str):
            def fn(request_id, why, conf, session):
                return do_submit(choice, request_id, why, conf, session)
            fn.__name__ = f"choose_{choice}"
            return fn

        label_inputs = [rid, rationale, confidence, state]
        fast = dict(outputs=label_outs, show_progress="hidden", trigger_mode="once", queue=False)
        login_btn.click(do_login, [name_box, pw_box, state], login_outs, api_name="login", concurrency_limit=8)
        pw_box.submit(do_login, [name_box, pw_box, state], login_outs, api_visibility="private")
        logout_btn.click(do_logout, [state], login_outs, api_name="logout")
        for btn, choice in ((btn_a, "A"), (btn_b, "B"), (btn_tie, "tie"), (btn_bad, "both_bad"), (btn_skip, "skip")):
            btn.click(clicked(choice), label_inputs, api_visibility="private", **fast)
        submit_btn.click(do_submit, [choice_box, *label_inputs], api_name="submit", **fast)
        btn_undo.click(lambda session: show(H.undo(backend, session)), [state], api_name="undo", **fast)
        refresh_btn.click(lambda session: show(H.show_next(backend, session)), [state], api_name="next", **fast)
        demo.load(None, js=(STATIC / "shortcuts.js").read_text())
        wire_admin()
    return demo


def _mode_html(view) -> str:
    """What the label tab shows, as classes that static/app.css switches on (pair or empty queue; a
    one-message prompt as text or a conversation as a chat)."""
    if view is None or view.empty:
        return '<div class="al-mode al-mode-empty"></div>'
    chat = "al-chat-multi" if len(view.prompt) > 1 else "al-chat-single"
    return f'<div class="al-mode al-mode-pair {chat}"></div>'


PAUSED_MD = """## Paused

Your admin has paused labelling for your account. Your labels so far are saved; press **Check again**
once the admin has resumed it."""


def _notice(n: H.Notice) -> str:
    if not n.ok:
        gr.Warning(n.message.removeprefix("⚠️ "))
    return n.message


def _admin_tab(args, backend: Backend, state: gr.State, export_dir: Path):
    """Lay out the admin sub-tabs; returns a function that wires them (called once every component
    of the page exists). Every handler re-checks the role on the server."""
    models = list(args.models) + ["", ""]
    runner = LoopRunner(args.loop_config, args.db)
    with gr.Tabs():
        with gr.Tab("Prompts → pairs"):
            gr.Markdown("Add prompts and generate **two candidates per prompt** — two samples of one model, "
                        "or one from each of two models. They are stored with the model id and sampling "
                        "settings and queued as comparisons for the annotators.")
            with gr.Row():
                with gr.Column(scale=3):
                    prompts_text = gr.Textbox(label="Prompts, one per line", lines=6, elem_id="al-prompts")
                    prompts_file = gr.File(label="…or a .jsonl / .json file (prompt, messages, instruction, "
                                                 "question or text per record, or a preference file)",
                                           file_types=[".jsonl", ".json", ".gz"], type="filepath", height=110,
                                           elem_id="al-prompts-file")
                    prompts_limit = gr.Number(label="…its first N prompts (0 = all)", value=0, minimum=0, precision=0,
                                              elem_id="al-prompts-limit")
                with gr.Column(scale=2):
                    model_a = gr.Textbox(label="Model 1 (a run's final/ or an HF causal LM dir)", value=models[0])
                    model_b = gr.Textbox(label="Model 2 (optional; empty = two samples of model 1)", value=models[1])
                    with gr.Row():
                        temperature = gr.Number(label="temperature", value=args.temperature, minimum=0, maximum=5,
                                                step=0.05)
                        top_p = gr.Number(label="top_p", value=args.top_p, minimum=0.01, maximum=1, step=0.01)
                        max_new = gr.Number(label="max_new_tokens", value=args.max_new_tokens, minimum=1,
                                            precision=0, elem_id="al-max-new")
                    priority = gr.Number(label="Queue priority (higher = labelled first)", value=args.priority)
                    gen_btn = gr.Button("Add prompts & generate pairs", variant="primary", elem_id="al-generate")
            gen_msg = gr.Markdown("", elem_id="al-gen-msg")
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
        with gr.Tab("Gold pairs"):
            gr.Markdown(f"Pairs with a **known answer**, mixed into every annotator's queue ({args.gold_rate:.0%} of "
                        f"the pairs shown; swapped re-asks of their own earlier labels: {args.reask_rate:.0%}). "
                        "Annotators cannot tell them from other pairs; the dashboard shows each one's gold "
                        "accuracy. Answers are about the stored responses A/B (the export's `comparison_id`).")
            with gr.Row():
                gold_ids = gr.Textbox(label="Comparison ids (comma separated)", elem_id="al-gold-ids")
                gold_answer = gr.Radio(["a", "b", "tie", "both_bad", "none"], value="a", label="Known answer",
                                       elem_id="al-gold-answer")
                gold_btn = gr.Button("Mark as gold", variant="primary", elem_id="al-gold-mark", scale=0)
            gold_file = gr.File(label="…or import a preference file as gold (chosen = the answer)",
                                file_types=[".jsonl", ".json", ".gz"], type="filepath", height=110)
            gold_imp_btn = gr.Button("Import gold pairs", variant="secondary")
            gold_msg = gr.Markdown("", elem_id="al-gold-msg")
        with gr.Tab("Dashboard") as dash_tab:
            with gr.Row():
                dash_summary = gr.Markdown("Press refresh.")
                dash_btn = gr.Button("↻ Refresh", size="sm", scale=0, min_width=100, elem_id="al-dash-refresh")
            quality = gr.Dataframe(headers=H.QUALITY_HEADERS, label="Annotators (left share 50% = no position bias; "
                                   "est. accuracy: Dawid–Skene)", interactive=False, elem_id="al-quality")
            with gr.Row():
                who = gr.Textbox(label="Annotator", scale=2, elem_id="al-who")
                pause_btn = gr.Button("Pause", size="sm", scale=0, min_width=90, elem_id="al-pause")
                resume_btn = gr.Button("Resume", size="sm", scale=0, min_width=90, elem_id="al-resume")
                unlock_btn = gr.Button("Unlock sign-in", size="sm", scale=0, min_width=130, elem_id="al-unlock")
            who_msg = gr.Markdown("", elem_id="al-who-msg")
            blocked = gr.Dataframe(headers=["kind", "account / address", "failed sign-ins", "wait (s)"],
                                   label="Failed sign-ins", interactive=False)
            with gr.Row():
                p_time = gr.Plot(show_label=False)
                p_dist = gr.Plot(show_label=False)
            with gr.Row():
                p_bias = gr.Plot(show_label=False)
                p_secs = gr.Plot(show_label=False)
            agree = gr.Dataframe(headers=["annotator 1", "annotator 2", "pairs", "agreement", "Cohen κ"],
                                 label="Agreement (pairs both labelled, skips left out)", interactive=False)
            people = gr.Dataframe(headers=["name", "role", "kind", "labels", "status"], label="Labellers",
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
                loop_table = gr.Dataframe(label="Held-out figures per round (0 = start)", interactive=False,
                                          elem_id="al-loop-table")
            loop_log = gr.Textbox(label="Log (last lines)", lines=12, max_lines=12, interactive=False,
                                  elem_id="al-loop-log")
            loop_timer = gr.Timer(3.0, active=False)
        with gr.Tab("Export"):
            gr.Markdown("Rows are TRL preference rows (`prompt`, `chosen`, `rejected`). **Majority vote** per "
                        "comparison over non-skip labels (ties, both-bad and split votes are dropped), or "
                        "**annotator-aware**: each annotator weighed by their estimated accuracy (Dawid–Skene, "
                        "anchored by gold pairs), with a soft label `p_chosen` and a `weight` per row.")
            with gr.Row():
                exp_format = gr.Dropdown(["conversational", "standard"], value="conversational", label="format")
                exp_agg = gr.Radio([("majority vote", "majority"), ("annotator-aware", "reliability")],
                                   value="majority", label="aggregation")
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

    def do_generate(session, text, file, ma, mb, temp, tp, mnt, prio, limit, progress=gr.Progress()):  # noqa: B008 (Gradio injects it)
        n = H.generate(backend, session, text, file, ma, mb, temp, tp, mnt, prio, seed=args.seed,
                       progress=lambda f, d: progress(f, desc=d), limit=limit)
        return {gen_msg: _notice(n), **({prompts_text: "", prompts_file: None} if n.ok else {})}

    def do_import(session, file, queue, prio):
        n = H.import_pairs(backend, session, file, queue, prio)
        return {imp_msg: _notice(n), **({imp_file: None} if n.ok else {})}

    def do_gold(session, ids, answer):
        return {gold_msg: _notice(H.mark_gold(backend, session, ids, answer))}

    def do_gold_import(session, file):
        n = H.import_gold(backend, session, file)
        return {gold_msg: _notice(n), **({gold_file: None} if n.ok else {})}

    def do_dashboard(session):
        d = H.dashboard(backend, session)
        if d.error is not None:
            gr.Warning(d.error)
            return {dash_summary: d.summary}
        f = d.figures
        return {dash_summary: d.summary, p_time: f["time"], p_dist: f["dist"], p_bias: f["bias"], p_secs: f["secs"],
                agree: d.agreement, people: d.people, quality: d.quality, blocked: d.blocked}

    def annotator(action: str):
        def fn(session, name):
            n = H.annotator_action(backend, session, name, action)
            out = {who_msg: _notice(n)}
            if n.ok:
                out.update(do_dashboard(session))
            return out
        fn.__name__ = f"annotator_{action}"
        return fn

    def do_export(session, fmt, humans, min_labels, agg):
        n = H.export(backend, session, export_dir, fmt, humans, min_labels, aggregate=agg or "majority")
        return {exp_msg: _notice(n), exp_file: n.path}

    def do_account(session, name, pw, role):
        n = H.add_account(backend, session, name, pw, role)
        return {acc_msg: _notice(n), **({acc_name: "", acc_pw: "", people: n.people} if n.ok else {})}

    def show_loop(ls: H.LoopScreen) -> dict:
        if ls.error is not None:
            gr.Warning(ls.error)
            return {loop_md: ls.message, loop_timer: gr.Timer(active=False)}
        return {loop_md: ls.message, loop_plot: ls.plot, loop_table: ls.table, loop_log: ls.log,
                loop_rounds: ls.rounds, loop_timer: gr.Timer(active=ls.running)}

    def wire():
        loop_outs = [loop_md, loop_plot, loop_table, loop_log, loop_rounds, loop_timer]
        loop_btn.click(lambda s, r, w: show_loop(H.loop_run(backend, s, runner, r, w)),
                       [state, loop_rounds, loop_wait], loop_outs, api_name="loop_run", concurrency_limit=1)
        for ev in (loop_refresh.click, loop_tab.select, loop_timer.tick):
            ev(lambda s: show_loop(H.loop_status(backend, s, runner)), [state], loop_outs,
               api_visibility="private", concurrency_limit=2)
        gen_btn.click(do_generate, [state, prompts_text, prompts_file, model_a, model_b, temperature, top_p,
                                    max_new, priority, prompts_limit], [gen_msg, prompts_text, prompts_file],
                      api_name="generate", concurrency_limit=1, concurrency_id="generate",
                      show_progress_on=[gen_msg])  # not over the form: it stays readable for minutes on a CPU
        imp_btn.click(do_import, [state, imp_file, imp_queue, imp_priority], [imp_msg, imp_file],
                      api_name="import_pairs", concurrency_limit=2)
        gold_btn.click(do_gold, [state, gold_ids, gold_answer], [gold_msg], api_name="mark_gold")
        gold_imp_btn.click(do_gold_import, [state, gold_file], [gold_msg, gold_file], api_name="import_gold")
        dash_outs = [dash_summary, p_time, p_dist, p_bias, p_secs, agree, people, quality, blocked]
        dash_btn.click(do_dashboard, [state], dash_outs, api_name="dashboard", concurrency_limit=2)
        dash_tab.select(do_dashboard, [state], dash_outs, api_visibility="private", concurrency_limit=2)
        for btn, action in ((pause_btn, "pause"), (resume_btn, "resume"), (unlock_btn, "unlock")):
            btn.click(annotator(action), [state, who], [who_msg, *dash_outs], api_visibility="private",
                      concurrency_limit=2)
        api_action = gr.Textbox(visible=False)
        api_btn = gr.Button(visible=False)
        api_btn.click(lambda s, n, a: {who_msg: _notice(H.annotator_action(backend, s, n, a))},
                      [state, who, api_action], [who_msg], api_name="annotator_action")
        exp_btn.click(do_export, [state, exp_format, exp_humans, exp_min, exp_agg], [exp_file, exp_msg],
                      api_name="export", concurrency_limit=2)
        acc_btn.click(do_account, [state, acc_name, acc_pw, acc_role], [acc_msg, acc_name, acc_pw, people],
                      api_name="add_account")

    return wire


def create_fastapi_app(args):
    """A FastAPI app with the labelling UI mounted at ``/`` (under ``args.root_path`` behind a proxy)
    and ``GET /healthz`` (200 when the store answers, 503 otherwise)."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    api = FastAPI(title=args.title)
    demo = build_app(args)

    @api.get("/healthz")
    def healthz():
        ok, what = demo.align_backend.health()
        return {"ok": True, "store": what} if ok else JSONResponse({"ok": False, "error": what}, status_code=503)

    demo.queue(default_concurrency_limit=8)
    return gr.mount_gradio_app(api, demo, path="/", root_path=args.root_path or None, **launch_kwargs(args))
