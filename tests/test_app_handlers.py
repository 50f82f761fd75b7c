"""The app's handlers called directly (no Gradio): screens, login throttling, idle expiry, gold pairs,
swapped re-asks, pausing, the per-annotator dashboard and the annotator-aware export."""

from __future__ import annotations

import json
import os
import random

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from app import handlers as H  # noqa: E402
from app.backend import Backend, Session, Store  # noqa: E402
from app.testing import seed_store  # noqa: E402
from app.throttle import LoginThrottle, ThrottlePolicy  # noqa: E402


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


@pytest.fixture
def db(tmp_path) -> str:
    url = f"sqlite:///{tmp_path}/prefs.db"
    seed_store(url)
    return url


def test_label_screens_without_gradio(db):
    b = Backend(Store(db))
    bad = H.login(b, Session(), "alice", "nope")
    assert bad.keep and bad.error == "Wrong name or password." and bad.login_message.startswith("⚠️")
    s = H.login(b, Session(), "alice", "pw-alice")
    d = s.data()
    assert s.logged_in and d["user"] == "alice" and d["comparison_id"] == 1 and d["remaining"] == 8
    nxt = H.submit(b, s.session, "A", d["request_id"], "why", None)
    assert nxt.data()["comparison_id"] == 2 and nxt.message.startswith("✓ Saved: A is better")
    again = H.submit(b, s.session, "A", d["request_id"])  # a double click: the page stays as it is
    assert again.keep and again.data() == {} and again.message is None
    back = H.undo(b, s.session)
    assert back.data()["comparison_id"] == 1 and back.message.startswith("↶ Undid")
    assert H.show_next(b, s.session).data()["request_id"] == back.data()["request_id"]
    anon = H.show_next(b, Session())
    assert anon.keep and "log in" in anon.error
    assert H.logout(b, s.session).data()["user"] is None


def test_admin_handlers_check_the_role_and_report_errors(db, tmp_path):
    b = Backend(Store(db))
    alice = b.login(Session(), "alice", "pw-alice")
    root = b.login(Session(), "root", "pw-root")
    for n in (H.dashboard(b, alice), H.mark_gold(b, alice, "1", "a"), H.annotator_action(b, alice, "bob", "pause"),
              H.export(b, alice, tmp_path, "conversational", True, 1)):
        assert "Only admins" in (n.error if isinstance(n, H.Dashboard) else n.message)
    n = H.mark_gold(b, root, "1, x", "a")
    assert not n.ok and "must be numbers" in n.message
    assert "No comparison 999" in H.mark_gold(b, root, "999", "a").message
    n = H.add_account(b, root, "carol", "pw-carol", "annotator")
    assert n.ok and ["carol", "annotator", "human", 0, ""] in n.people
    assert "Unknown action" in H.annotator_action(b, root, "bob", "delete").message


def _guess(backend, clock, name, password, wait_as_told=True):
    if wait_as_told:
        clock.advance(backend.throttle.wait(name, "10.0.0.9"))
    return H.login(backend, Session(), name, password, "10.0.0.9")


def test_thirty_guesses_fail_and_take_the_time_the_policy_says(db):
    clock = Clock()
    b = Backend(Store(db), clock=clock)
    policy = b.throttle.policies["account"]
    assert (policy.free, policy.base, policy.max_delay, policy.lock_after, policy.lock_seconds) == (3, 1, 30, 10, 900)
    t0 = clock()
    for _ in range(30):  # an attacker who waits exactly as long as told, then guesses again
        got = _guess(b, clock, "root", "wrong")
        assert got.keep and got.error.startswith("Wrong name or password.")
    # waits after failures 3..9: 1+2+4+8+16+30+30 s, then 900 s after each of failures 10..29
    assert clock() - t0 == 91 + 20 * 900
    right = _guess(b, clock, "root", "pw-root", wait_as_told=False)
    assert not right.logged_in and "locked for 15 min" in right.error
    # an admin (signing in from elsewhere) unlocks the account: the right password works again
    admin = H.login(b, Session(), "root", "pw-root", "10.0.0.1")
    assert not admin.logged_in and "locked" in admin.error  # the account is locked from every address
    b.throttle.unlock("root")  # e.g. from another app process's admin, or:
    admin = H.login(b, Session(), "root", "pw-root", "10.0.0.1").session
    for _ in range(10):
        _guess(b, clock, "alice", "wrong")
    assert "locked" in _guess(b, clock, "alice", "pw-alice", wait_as_told=False).error
    assert H.annotator_action(b, admin, "alice", "unlock").ok
    b.throttle.unlock_address("10.0.0.9")
    assert _guess(b, clock, "alice", "pw-alice", wait_as_told=False).logged_in
    # a name that does not exist gets word for word the same answers (bob has no failures yet)
    for _ in range(12):
        clock.advance(max(b.throttle.wait("nobody", "10.0.1.1"), b.throttle.wait("bob", "10.0.1.2")))
        a, c = H.login(b, Session(), "nobody", "x", "10.0.1.1"), H.login(b, Session(), "bob", "x", "10.0.1.2")
        assert a.error == c.error
    assert "locked" in c.error


def test_a_lock_out_survives_a_restart_and_is_shared_by_app_processes(db):
    clock = Clock()
    b = Backend(Store(db), clock=clock)
    for _ in range(10):
        _guess(b, clock, "root", "wrong")
    assert b.throttle.locked("root")
    b.store.close()  # the app is killed and started again (or a second app process on the same store)
    again = Backend(Store(db), clock=clock)
    assert again.throttle.locked("root") and again.throttle.locked("ROOT", "10.0.0.1")
    refused = _guess(again, clock, "root", "pw-root", wait_as_told=False)
    assert not refused.logged_in and "locked for 15 min" in refused.error
    assert [r["failures"] for r in again.throttle.blocked() if r["key"] == "root"] == [10]
    clock.advance(900)  # the lock-out ends on time, and a success forgets the account's failures
    assert _guess(again, clock, "root", "pw-root", wait_as_told=False).logged_in
    assert not any(r["key"] == "root" for r in Backend(Store(db), clock=clock).throttle.blocked())


def test_guessing_flat_out_is_refused_without_checking_the_password(db):
    clock = Clock()
    b = Backend(Store(db), clock=clock)
    errors = [_guess(b, clock, "root", "wrong", wait_as_told=False).error for _ in range(30)]
    assert errors[:2] == ["Wrong name or password."] * 2
    assert errors[2] == "Wrong name or password. Too many failed sign-ins: wait 1 s before trying again."
    assert all(e == "Too many failed sign-ins: wait 1 s before trying again." for e in errors[3:])  # unchecked
    assert not _guess(b, clock, "root", "pw-root", wait_as_told=False).logged_in  # refused while waiting
    clock.advance(1)
    assert _guess(b, clock, "root", "pw-root", wait_as_told=False).logged_in  # 3 of the 30 were checked


def test_address_throttle_slows_a_spray_over_many_names(db):
    clock = Clock()
    t = LoginThrottle(account=ThrottlePolicy(), address=ThrottlePolicy(free=5, lock_after=8), clock=clock)
    b = Backend(Store(db), clock=clock, throttle=t)
    for i in range(8):
        clock.advance(t.wait(f"user{i}", "10.0.0.9"))
        H.login(b, Session(), f"user{i}", "x", "10.0.0.9")
    assert t.locked("someone-new", "10.0.0.9") and not t.locked("someone-new", "10.0.0.10")
    assert {(r["kind"], r["key"]) for r in t.blocked()} >= {("address", "10.0.0.9"), ("account", "user0")}
    with pytest.raises(ValueError, match="inconsistent throttle policy"):
        ThrottlePolicy(free=5, lock_after=3)


def test_sessions_expire_after_idle_time(db):
    clock = Clock()
    b = Backend(Store(db), clock=clock, idle_timeout=600)
    s = H.login(b, Session(), "alice", "pw-alice")
    clock.advance(599)
    assert not H.show_next(b, s.session).keep  # activity renews the session
    clock.advance(599)
    v = H.submit(b, s.session, "A", s.session.shown.request_id)
    assert not v.keep
    clock.advance(601)
    late = H.submit(b, s.session, "A", s.session.shown.request_id)
    assert late.keep and "expired" in late.error and s.session.user is None


def _world(url, n=40, n_gold=10):
    """Pairs whose better response says 'good'; ``n_gold`` more marked as gold."""
    s = Store(url).init()
    for name in ("careful", "lefty", "root"):
        s.add_annotator(name, "pw-" + name, "admin" if name == "root" else "annotator")
    for i in range(n + n_gold):
        pid = s.add_prompt(f"question {i}")
        good, bad = s.add_response(pid, f"good answer {i}"), s.add_response(pid, f"bad {i}")
        a, b_ = (good, bad) if i % 2 else (bad, good)
        cid = s.add_comparison(pid, a, b_, priority=1.0)
        if i >= n:
            s.set_gold(cid, "a" if a == good else "b")
    return s


def _label_all(b, name, pick):
    s = b.login(Session(), name, "pw-" + name)
    v = b.next_view(s)
    while not v.empty:
        v, _ = b.submit(s, pick(v), v.request_id)
    return s


def test_gold_and_swapped_reasks_measure_each_annotator(tmp_path):
    url = f"sqlite:///{tmp_path}/w.db"
    store = _world(url)
    b = Backend(store, overlap=2, gold_rate=0.2, reask_rate=0.2, reask_gap=3, rng=random.Random(0))
    _label_all(b, "careful", lambda v: "A" if v.left_text.startswith("good") else "B")
    _label_all(b, "lefty", lambda v: "A")  # always the left side
    assert len(store.gold()) == 10
    q = {r["name"]: r for r in store.annotator_quality()}
    c, lf = q["careful"], q["lefty"]
    assert c["gold_n"] >= 3 and c["gold_accuracy"] == 1.0 and c["reasks_n"] >= 3 and c["self_consistency"] == 1.0
    assert c["agreement"] is not None and 0.4 <= c["left_share"] <= 0.6
    assert lf["left_share"] == 1.0 and lf["self_consistency"] == 0.0  # swapped sides flip a side-picker
    assert lf["gold_accuracy"] < 1.0 and c["estimated_accuracy"] > lf["estimated_accuracy"]
    # re-asks are stored apart: each annotator has one label per pair
    assert len({lab.comparison_id for lab in store.labels(annotator="careful")}) == \
        len(store.labels(annotator="careful"))
    root = b.login(Session(), "root", "pw-root")
    d = H.dashboard(b, root)
    rows = {r[0]: r for r in d.quality}
    assert rows["careful"][4] == "100%" and rows["lefty"][9] == "100%" and d.error is None
    assert set(rows) == {"careful", "lefty", "root"}


@pytest.mark.parametrize("seed", range(6))
def test_every_annotator_gets_their_share_of_checks(tmp_path, seed):
    # checks come on a schedule, not by coin flip: 40 queued pairs and 10% gold + 20% re-asks make about
    # 55 pairs shown, so 4+ gold pairs and 8+ re-asks (the first waits for a label 3 old), whatever the seed
    store = _world(f"sqlite:///{tmp_path}/w.db", n=40, n_gold=10)
    b = Backend(store, gold_rate=0.1, reask_rate=0.2, reask_gap=3, rng=random.Random(seed))
    _label_all(b, "careful", lambda v: "A")
    q = {r["name"]: r for r in store.annotator_quality()}["careful"]
    assert q["labels"] - q["gold_n"] == 40 and q["reasks_n"] >= 8 and q["gold_n"] >= 4, q


def test_undo_of_a_reask_takes_back_the_reask(tmp_path):
    store = _world(f"sqlite:///{tmp_path}/w.db", n=12, n_gold=0)
    b = Backend(store, reask_rate=1.0, reask_gap=2, rng=random.Random(1))
    s = b.login(Session(), "careful", "pw-careful")
    v = b.next_view(s)
    for _ in range(3):
        v, _ = b.submit(s, "A", v.request_id)
    assert s.shown.reask_of is not None  # the 4th pair is a re-ask of the 1st label, sides swapped
    first = store.labels(annotator="careful")[0]
    assert s.shown.comparison_id == first.comparison_id and s.shown.left != first.left
    v, _ = b.submit(s, "B", v.request_id)
    assert len(store.reasks()) == 1 and len(store.labels(annotator="careful")) == 3
    v, msg = b.undo(s)
    assert store.reasks() == [] and len(store.labels(annotator="careful")) == 3 and msg == "Undid your last label"
    assert s.shown.comparison_id == first.comparison_id and s.shown.reask_of == first.id


def test_paused_annotator_gets_no_pairs(db):
    b = Backend(Store(db))
    root = b.login(Session(), "root", "pw-root")
    alice = H.login(b, Session(), "alice", "pw-alice").session
    rid = alice.shown.request_id
    assert H.annotator_action(b, root, "alice", "pause").ok
    after = H.submit(b, alice, "A", rid)  # the pair on screen is still saved
    assert after.data()["paused"] and after.data()["empty"] and len(b.store.labels(annotator="alice")) == 1
    assert H.show_next(b, alice).data()["paused"]
    assert "paused" in H.people_rows(b.people(root))[0] or any(r[4] == "paused" for r in H.people_rows(b.people(root)))
    H.annotator_action(b, root, "alice", "resume")
    assert not H.show_next(b, alice).data()["paused"]


def test_annotator_aware_export_has_soft_labels(tmp_path):
    store = _world(f"sqlite:///{tmp_path}/w.db", n=30, n_gold=10)
    b = Backend(store, overlap=3, gold_rate=0.3, rng=random.Random(2))
    rng = random.Random(3)
    store.add_annotator("random1", "pw-random1")
    store.add_annotator("random2", "pw-random2")
    _label_all(b, "careful", lambda v: "A" if v.left_text.startswith("good") else "B")
    _label_all(b, "random1", lambda v: rng.choice("AB"))
    _label_all(b, "random2", lambda v: rng.choice("AB"))
    root = b.login(Session(), "root", "pw-root")
    truth = {}
    for cid in range(1, 41):
        c = store.get_comparison(cid)
        truth[cid] = "a" if c.text_a.startswith("good") else "b"

    def correct(rows):
        return sum(r["chosen"][0]["content"].startswith("good") for r in rows), len(rows)

    maj, _ = store.export_rows(kinds=["human"], with_meta=True)
    rel, rep = store.export_rows(kinds=["human"], with_meta=True, aggregate="reliability", soft=True)
    ok_maj, n_maj = correct(maj["train"])
    ok_rel, n_rel = correct(rel["train"])
    assert ok_rel / n_rel > ok_maj / n_maj and ok_rel / n_rel >= 0.95, (ok_maj, n_maj, ok_rel, n_rel)
    for r in rel["train"]:
        assert 0.5 < r["p_chosen"] <= 1 and r["weight"] == pytest.approx(2 * r["p_chosen"] - 1, abs=1e-5)
    n = H.export(b, root, tmp_path / "exp", "conversational", True, 1, aggregate="reliability")
    rows = [json.loads(x) for x in open(n.path)]
    assert n.ok and "annotator-aware" in n.message and {"p_chosen", "weight"} <= set(rows[0])
    with pytest.raises(ValueError, match="aggregate must be one of"):
        store.export_rows(aggregate="vote")
