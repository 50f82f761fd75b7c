"""``python -m align.bench app``: the labelling app under load, over HTTP, with a server crash.

Starts ``python -m app`` on 127.0.0.1 (a fresh SQLite store unless ``--db``), then drives
``--annotators`` concurrent annotator sessions through the app's own HTTP API (the endpoints the
page calls: ``/gradio_api/run/login`` and ``/gradio_api/run/submit``; one Gradio session per
annotator). Two phases:
- human pace: each annotator thinks ``--think`` seconds (uniform) before each click; halfway through,
  the server gets ``kill -9`` and is started again; annotators log in again and go on;
- flat out: every annotator clicks as soon as the next pair is on screen.
Reports click-to-next-pair latency (one submit request: the label is committed and the next pair
comes back) p50 / p99 and labels/s, and checks that every acknowledged label (a 200 answer saying
"Saved") is in the store afterwards. Only localhost is ever contacted.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from align.bench.store import _pct, hardware

ROOT = Path(__file__).resolve().parents[2]
RECOVERY_S = 10.0  # after the first label past a restart, clicks still queue behind the re-logins


def seed(url: str, annotators: int, pairs: int) -> list[str]:
    from align.store import Store

    s = Store(url).init()
    names = [f"ann{i:03d}" for i in range(annotators)]
    for n in names:
        s.add_annotator(n, "pw-" + n)
    items = [{"prompt": f"load prompt {i}: what is {i} + {i}?", "chosen": f"It is {2 * i}.",
              "rejected": f"It is {2 * i + 1}, I think."} for i in range(pairs)]
    s.import_pairs(items, source="bench-app", labeller="bench-import", priority=1.0)
    s.close()
    return names


class Server:
    def __init__(self, url: str, log: Path, extra: list[str]):
        self.url, self.extra, self.log = url, extra, log
        self.base = ""
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        """Start the app on a free port (a restart takes a new one: Gradio will not bind a port that
        the killed server's connections still hold in TIME_WAIT). Clients read ``base`` per request."""
        from app.testing import free_port

        port = free_port()
        cmd = [sys.executable, "-m", "app", str(ROOT / "configs/app.yaml"), "--db", self.url, "--host", "127.0.0.1",
               "--port", str(port), "--guidelines", str(ROOT / "docs/guidelines.md"), *self.extra]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(self.log, "a"), stderr=subprocess.STDOUT)
        self.base = f"http://127.0.0.1:{port}"

    async def ready(self, client, timeout: float = 120.0) -> float:
        import httpx

        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout:
            if self.proc.poll() is not None:
                tail = "".join(self.log.read_text().splitlines(keepends=True)[-15:])
                raise RuntimeError(f"the app exited with {self.proc.returncode}:\n{tail}")
            try:
                if (await client.get(self.base + "/", timeout=2)).status_code == 200:
                    return time.perf_counter() - t0
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
        raise TimeoutError(f"the app did not answer within {timeout} s; see {self.log}")

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _info(payload: dict) -> dict:
    """The screen as data: the hidden JSON output of the page (see app.handlers.Screen.data)."""
    for x in reversed(payload.get("data") or []):
        if isinstance(x, dict) and ("user" in x or "error" in x):
            return x
    return {}


class Run:
    def __init__(self):
        self.lat: list[tuple[float, float]] = []  # (click time, seconds to the next pair)
        self.acked: list[tuple[str, int]] = []
        self.errors = 0
        self.relogins = 0


async def annotator(client, server: Server, name: str, n: int, think: tuple[float, float] | None, run: Run,
                    rng: random.Random) -> None:
    import httpx

    info: dict = {}
    session = None
    done = 0
    while done < n:
        try:
            if session is None:  # log in (again, after a restart: sessions live in the server's memory)
                session = uuid.uuid4().hex
                r = await client.post(server.base + "/gradio_api/run/login", json={"data": [name, "pw-" + name, None],
                                                           "session_hash": session})
                info = _info(r.json())
                if info.get("user") != name:
                    raise RuntimeError(f"login failed: {info}")
            if info.get("empty"):
                return
            if think:
                await asyncio.sleep(rng.uniform(*think))
            cid, choice = info["comparison_id"], rng.choice(["A", "B", "A", "B", "tie"])
            t = time.perf_counter()
            body = {"data": [choice, info["request_id"], "", None, None], "session_hash": session}
            r = await client.post(server.base + "/gradio_api/run/submit", json=body)
            dt = time.perf_counter() - t
            nxt = _info(r.json()) if r.status_code == 200 else {}
            if r.status_code != 200 or "error" in nxt or not str(nxt.get("message", "")).startswith("✓ Saved"):
                run.errors += 1
                session = None  # e.g. "Please log in first." after a restart
                run.relogins += 1
                continue
            run.lat.append((t, dt))
            run.acked.append((name, cid))
            info = nxt
            done += 1
        except (httpx.TransportError, ValueError, RuntimeError):  # server down / restarting
            run.errors += 1
            session = None
            await asyncio.sleep(0.2)


async def phase(server: Server, names: list[str], n: int, think, kill_at: float | None, seed_: int) -> dict:
    import httpx

    run = Run()
    limits = httpx.Limits(max_connections=len(names) + 8, max_keepalive_connections=len(names) + 8)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        await server.ready(client)
        tasks = [asyncio.create_task(annotator(client, server, nm, n, think, run, random.Random(seed_ + i)))
                 for i, nm in enumerate(names)]
        t0 = time.perf_counter()
        crash = {}
        if kill_at is not None:
            target = int(kill_at * n * len(names))
            while len(run.acked) < target and not all(t.done() for t in tasks):
                await asyncio.sleep(0.05)
            acked_before = len(run.acked)
            t_kill = time.perf_counter()
            server.kill9()
            server.start()
            restart = await server.ready(client)
            while len(run.acked) == acked_before and not all(t.done() for t in tasks):
                await asyncio.sleep(0.01)
            crash = {"acked_before_kill": acked_before, "restart_s": restart,
                     "kill_to_next_label_s": time.perf_counter() - t_kill,
                     "recovery": (t_kill, time.perf_counter() + RECOVERY_S)}
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    lat = [dt for _, dt in run.lat]
    out = {"labels": len(run.acked), "wall_s": wall, "labels_per_s": len(run.acked) / wall,
           "p50_ms": 1000 * _pct(lat, 0.5), "p99_ms": 1000 * _pct(lat, 0.99), "max_ms": 1000 * max(lat),
           "errors": run.errors, "acked": run.acked, **crash}
    if "recovery" in crash:  # steady state: without the clicks while 50 sessions log in again after the crash
        a, b = crash.pop("recovery")
        steady = [dt for t, dt in run.lat if not a <= t <= b]
        out.pop("recovery")
        out.update(steady_p50_ms=1000 * _pct(steady, 0.5), steady_p99_ms=1000 * _pct(steady, 0.99))
    return out


def lost(url: str, acked: list[tuple[str, int]]) -> int:
    """Acknowledged labels missing from the store (a label or, for a re-ask, a re-ask row)."""
    from align.store import Store

    s = Store(url)
    have = {(lab.annotator, lab.comparison_id) for lab in s.labels()}
    have |= {(r["annotator"], r["comparison_id"]) for r in s.reasks()}
    s.close()
    return sum(a not in have for a in acked)


@dataclass
class BenchArgs:
    """N annotator sessions against a running app over HTTP: click-to-next-pair latency, kill -9, lost labels"""

    annotators: int = 50
    labels: int = field(default=20, metadata={"help": "labels per annotator in each phase"})
    think: list[float] = field(default_factory=lambda: [2.0, 6.0],
                               metadata={"help": "human pace: MIN MAX seconds before each click, uniform"})
    phases: list[str] = field(default_factory=lambda: ["human", "flat"], metadata={"help": "human and/or flat"})
    no_kill: bool = field(default=False, metadata={"help": "do not kill -9 the server in the human phase"})
    db: str | None = field(default=None, metadata={"help": "SQLAlchemy URL (default: a fresh SQLite file)"})
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.phases, str):  # one phase as one word
            self.phases = [self.phases]
        if set(self.phases) - {"human", "flat"}:
            raise ValueError(f"phases must be human and/or flat, got {self.phases}")
        if len(self.think) != 2:
            raise ValueError(f"think takes MIN MAX seconds, got {self.think}")


def main(argv: list[str] | None = None) -> int:
    from align.config import parse, run_command

    (args,) = run_command(parse, [BenchArgs], argv, prog="python -m align.bench app")
    with tempfile.TemporaryDirectory() as tmp:
        url = args.db or f"sqlite:///{tmp}/bench-app.db"
        names = seed(url, args.annotators, args.annotators * args.labels * len(args.phases) + 100)
        server = Server(url, Path(tmp) / "server.log", ["--gold_rate", "0", "--reask_rate", "0"])
        server.start()
        rows = []
        try:
            for i, ph in enumerate(args.phases):
                kill = 0.5 if ph == "human" and not args.no_kill else None
                r = phase(server, names, args.labels, tuple(args.think) if ph == "human" else None, kill,
                          args.seed + 1000 * i)
                r = asyncio.run(r)
                r["lost"] = lost(url, r.pop("acked"))
                what = (f"{args.annotators} annotators, {'human pace' if ph == 'human' else 'flat out'}"
                        + (", kill -9 at half" if kill else ""))
                res = (f"click→next pair p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms; "
                       f"{r['labels_per_s']:.1f} labels/s ({r['labels']} labels, {r['wall_s']:.0f} s); "
                       f"lost {r['lost']}")
                if kill:
                    res += (f"; restart {r['restart_s']:.1f} s, kill→next label {r['kill_to_next_label_s']:.1f} s, "
                            f"{r['errors']} failed requests; outside the crash and the {RECOVERY_S:.0f} s after "
                            f"it: p50 {r['steady_p50_ms']:.0f} ms, p99 {r['steady_p99_ms']:.0f} ms")
                rows.append((what, res))
                print(what, "|", res, flush=True)
        finally:
            server.stop()
    print(f"\nhardware: {hardware()}")
    print("| run | result |\n| --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
