"""`chorus api` under load: K concurrent clients on a proxied model and on a pipeline, against a hand-started
llama-server given the same load.

One `chorus api` (loopback, `--max-runs 4`, a bounded queue) on the shipped config and the demo models.
Per K in 1, 4, 8, 16 (a bounded number of requests and a time limit per phase):

- **proxied model** (smollm2-135m, chat, `max_tokens` fixed and `ignore_eos`, so every answer is the same
  length): requests/s, aggregate completion tokens/s, p50/p95 latency, 429s. The **baseline** in the same
  run: the very argv of the llama-server chorus started for it (same slots, threads, n_ctx, flags) started
  by hand on another port, given the same load straight. The two sides take turns in short phases (8
  requests, 2K from K=8) in ABBA order for `--seconds-per-k` (160 s); each side's figure is over all of its
  phases. This host's speed jumps by up to 1.8x from one second to the next (a fixed CPU loop took
  0.13-0.24 s), so one phase can stray ±25% (`by_round`): four long rounds (the earlier design) put the
  same server against itself at 1.058, the turns of 2 s brought that to 0.98-1.00. `measurement_check`
  runs the same method with the hand server on both sides: how far noise alone moves the ratio.
  Target: chorus's tokens/s ≥ 0.95× the baseline's at every K.
- **pipeline** (`chorus/load`: two stages of smollm2): the same figures, and sessions recorded vs requests
  accepted (must be equal: nothing lost).

Then chorus's own RSS (the `chorus api` processes, not the llama-servers) after 30 requests and after 300
(a mix of proxied and pipeline requests, 8 at a time): flat within 5%. Last, `chorus eval` on the demo models
(the base pipeline, a few bundled questions, short answers), each in a fresh process, with
`--concurrency 1` and `--concurrency 3`: the second must take ≤ 0.8× the time of the first.

What the eval can gain is bounded by what one server gains from streams at once, so the same run measures it
on the hand-started server (before it stops): 3 requests at once against 3 of the same length one after
another, alternating, 4 rounds. `server_batching.gain` is that ratio of times (serial / at once), and
`eval.ratio_floor` is its inverse: the eval's ratio can go little below it, since nearly all of an eval's time
is in its servers (a gain of 1.0, as on these 2 CPU cores, leaves the target out of reach; where decoding
waits on memory bandwidth, as on a GPU, the gain nears the number of streams). Informational: it changes no
target.

The last line is one JSON object with the figures, the targets and pass/fail. Every process started here is
stopped on the way out (an exception, Ctrl-C or SIGTERM too).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[0] = str(REPO)  # not bench/: bench/launcher.py would shadow the launcher package

import httpx  # noqa: E402
import psutil  # noqa: E402
import yaml  # noqa: E402

from launcher.process.server import own_group_dying_with_parent, stop_process_group  # noqa: E402
from launcher.process.state import list_running  # noqa: E402

MODEL = "smollm2-135m"
PIPELINE = "load"
TOKENS = 32
TARGET_TOKENS_RATIO = 0.95
TARGET_RSS_GROWTH = 0.05
TARGET_EVAL_RATIO = 0.80
QUEUE = 64


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_config(root: Path) -> Path:
    """The shipped config on the repo's models/, history and logs in `root`, plus the two-stage `load` pipeline."""
    cfg = root / "config"
    subprocess.run(["cp", "-rL", str(REPO / "config"), str(cfg)], check=True)
    app = yaml.safe_load((cfg / "app.yaml").read_text())
    app.update(models_dir=str(REPO / "models"), sessions_dir=str(root / "sessions"), logs_dir=str(root / "logs"))
    (cfg / "app.yaml").write_text(yaml.safe_dump(app))
    (cfg / "pipelines").mkdir(exist_ok=True)
    (cfg / "pipelines" / f"{PIPELINE}.yaml").write_text(yaml.safe_dump({
        "name": PIPELINE, "description": "draft then refine, one small model (bench/api_load.py)",
        "defaults": {"max_tokens": 16, "temperature": 0.0, "seed": 7},
        "stages": [{"name": "draft", "models": [MODEL]},
                   {"name": "refine", "models": [MODEL],
                    "prompt": "Improve this answer to '{question}':\n{previous}"}]}, sort_keys=False))
    return cfg


class Api:
    """`chorus api` in its own process group, dying with this process."""

    def __init__(self, cfg: Path, max_runs: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "cli", "api", "--config-dir", str(cfg), "--port",
                                      str(self.port), "--max-runs", str(max_runs), "--max-queue", str(QUEUE)],
                                     cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     preexec_fn=own_group_dying_with_parent)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chorus api exited: {self.proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("chorus api did not become ready")

    def rss_bytes(self) -> int:
        """chorus's own memory: the `chorus api` process and its Python children, not the llama-servers."""
        try:
            root = psutil.Process(self.proc.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return 0
        total = 0
        for p in procs:
            with contextlib.suppress(psutil.Error):
                if "llama-server" not in p.name():
                    total += p.memory_info().rss
        return total

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                stop_process_group(self.proc, grace_s=1.0)


class HandServer:
    """The argv chorus gave its server, started by hand on another port with its own key."""

    def __init__(self, argv: list[str], workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.key = "bench-baseline-key"
        key_file = workdir / "baseline.key"
        key_file.write_text(self.key + "\n")
        key_file.chmod(0o600)
        cmd = list(argv)
        cmd[cmd.index("--port") + 1] = str(self.port)
        cmd[cmd.index("--api-key-file") + 1] = str(key_file)
        self.cmd = cmd
        with (workdir / "baseline.log").open("wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                         preexec_fn=own_group_dying_with_parent)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the hand-started llama-server exited ({self.proc.returncode})")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("the hand-started llama-server did not become ready")

    def stop(self) -> None:
        stop_process_group(self.proc, grace_s=5.0)


# ---------------------------------------------------------------- load


@dataclass
class Phase:
    wall_s: float = 0.0
    latencies: list[float] = field(default_factory=list)
    tokens: int = 0
    ok: int = 0
    refused: int = 0
    failed: int = 0
    sessions: list[str] = field(default_factory=list)

    def add(self, other: Phase) -> None:
        self.wall_s += other.wall_s
        self.latencies += other.latencies
        self.tokens += other.tokens
        self.ok, self.refused, self.failed = self.ok + other.ok, self.refused + other.refused, \
            self.failed + other.failed
        self.sessions += other.sessions

    def figures(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        pct = (lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))], 3)) if lat else (lambda q: None)
        return {"requests": self.ok + self.refused + self.failed, "ok": self.ok, "refused_429": self.refused,
                "failed": self.failed, "wall_s": round(self.wall_s, 2),
                "requests_per_s": round(self.ok / self.wall_s, 3) if self.wall_s else 0.0,
                "tokens_per_s": round(self.tokens / self.wall_s, 2) if self.wall_s else 0.0,
                "p50_s": pct(0.50), "p95_s": pct(0.95)}


Send = Callable[[httpx.Client, int], tuple[int, int, str | None]]  # -> (status, completion tokens, session)


def load(send: Send, k: int, requests: int, time_limit_s: float) -> Phase:
    """`requests` requests from `k` clients at once (each sends its next when its last is answered)."""
    phase = Phase()
    lock = threading.Lock()
    counter = iter(range(requests))
    deadline = time.monotonic() + time_limit_s

    def client() -> None:
        with httpx.Client(timeout=600) as http:
            while time.monotonic() < deadline:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                t0 = time.perf_counter()
                try:
                    status, tokens, session = send(http, i)
                except httpx.HTTPError:
                    status, tokens, session = 0, 0, None
                took = time.perf_counter() - t0
                with lock:
                    if status == 200:
                        phase.ok += 1
                        phase.tokens += tokens
                        phase.latencies.append(took)
                        if session:
                            phase.sessions.append(session)
                    elif status == 429:
                        phase.refused += 1
                    else:
                        phase.failed += 1

    threads = [threading.Thread(target=client) for _ in range(k)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    phase.wall_s = time.perf_counter() - t0
    return phase


def paired(first: Send, second: Send, k: int, n: int, budget_s: float, time_limit_s: float
           ) -> tuple[Phase, Phase, list[float]]:
    """Short phases of `n` requests from `k` clients, the two sides in ABBA order, until `budget_s` is spent
    (whole ABBA quads, at least one): each side's figure is over all of its phases, so both meet the same
    moments of this host, whose speed jumps by up to 1.8x from one second to the next (a fixed CPU loop
    took 0.13-0.24 s); the paired ratios of each round say how far one phase can stray."""
    mine, theirs, ratios = Phase(), Phase(), []
    started, r = time.monotonic(), 0
    while r < 2 or r % 2 or time.monotonic() - started < budget_s:
        if r % 2 == 0:
            a = load(first, k, n, time_limit_s)
            b = load(second, k, n, time_limit_s)
        else:
            b = load(second, k, n, time_limit_s)
            a = load(first, k, n, time_limit_s)
        mine.add(a)
        theirs.add(b)
        a_tps, b_tps = a.figures()["tokens_per_s"], b.figures()["tokens_per_s"]
        ratios.append(a_tps / b_tps if b_tps else 0.0)
        r += 1
    return mine, theirs, ratios


def ratio_of(mine: Phase, theirs: Phase) -> float:
    m, t = mine.figures()["tokens_per_s"], theirs.figures()["tokens_per_s"]
    return round(m / t, 3) if t else 0.0


def spread(ratios: list[float]) -> dict[str, Any]:
    return {"rounds": len(ratios), "min": round(min(ratios), 3), "median": round(statistics.median(ratios), 3),
            "max": round(max(ratios), 3)}


def chat_body(model: str, i: int, stream: bool = False) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": f"Write a short note number {i} about rivers."}],
            "max_tokens": TOKENS, "temperature": 0.7, "seed": i, "ignore_eos": True, "stream": stream}


def to_model(url: str, model: str, key: str | None = None) -> Send:
    headers = {"Authorization": f"Bearer {key}"} if key else {}

    def send(http: httpx.Client, i: int) -> tuple[int, int, str | None]:
        r = http.post(f"{url}/v1/chat/completions", json=chat_body(model, i), headers=headers)
        tokens = int(r.json().get("usage", {}).get("completion_tokens", 0)) if r.status_code == 200 else 0
        return r.status_code, tokens, None

    return send


def to_pipeline(url: str) -> Send:
    def send(http: httpx.Client, i: int) -> tuple[int, int, str | None]:
        body = {"model": f"chorus/{PIPELINE}", "messages": [{"role": "user", "content": f"Why do rivers bend? ({i})"}]}
        r = http.post(f"{url}/v1/chat/completions", json=body)
        if r.status_code != 200:
            return r.status_code, 0, r.headers.get("X-Chorus-Session")
        data = r.json()
        return 200, int(data.get("usage", {}).get("completion_tokens", 0)), data.get("chorus", {}).get("session_id")

    return send


def stream_gain(send: Send, streams: int, rounds: int) -> dict[str, Any]:
    """Time `streams` requests at once and as many of the same length in a row, alternating: the server's
    batching gain (1.0: streams at once cost what they cost one after another)."""
    together, in_a_row = [], []

    def from_index(first: int) -> Send:
        return lambda http, i: send(http, first + i)  # prompts no slot has cached

    for r in range(rounds):
        first = 1000 + 2 * r * streams
        together.append(load(from_index(first), streams, streams, 600).wall_s)
        in_a_row.append(load(from_index(first + streams), 1, streams, 600).wall_s)
    med_together, med_row = statistics.median(together), statistics.median(in_a_row)
    return {"streams": streams, "rounds": rounds, "together_s": round(med_together, 3),
            "in_a_row_s": round(med_row, 3), "gain": round(med_row / med_together, 3)}


def recorded(sessions_dir: Path, ids: list[str]) -> int:
    """How many of `ids` are saved with a final answer (the run's JSON record and final.txt)."""
    return sum(1 for s in ids if (sessions_dir / s / "final.txt").is_file())


def chorus_server_argv(cfg: Path, model: str) -> tuple[list[str], int]:
    logs = yaml.safe_load((cfg / "app.yaml").read_text())["logs_dir"]
    for rec in list_running(Path(logs) / "running"):
        if rec.model == model:
            return psutil.Process(rec.pid).cmdline(), rec.slots
    raise RuntimeError(f"no running server of {model} recorded")


# ---------------------------------------------------------------- eval


def eval_seconds(cfg: Path, concurrency: int, limit: int) -> tuple[float, str]:
    cmd = [sys.executable, "-m", "cli", "eval", "--config-dir", str(cfg), "--limit", str(limit),
           "--concurrency", str(concurrency), "--set", "defaults.max_tokens=24", "--set", "defaults.seed=3",
           "--json"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
    took = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"chorus eval --concurrency {concurrency} failed: {proc.stderr[-2000:]}")
    return took, proc.stderr.strip().splitlines()[0] if proc.stderr.strip() else ""


# ---------------------------------------------------------------- main


@contextlib.contextmanager
def stopping(stoppers: list[Callable[[], None]]) -> Iterator[None]:
    def on_signal(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, on_signal)
    try:
        yield
    finally:
        for stop in reversed(stoppers):
            with contextlib.suppress(Exception):
                stop()
        signal.signal(signal.SIGTERM, old)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ks", default="1,4,8,16", help="concurrent clients, comma-separated")
    ap.add_argument("--requests", type=int, default=8, help="proxied-model requests per phase (at least 2K)")
    ap.add_argument("--pipeline-requests", type=int, default=12, help="pipeline requests per K (at least K)")
    ap.add_argument("--time-limit-s", type=float, default=120.0, help="per phase")
    ap.add_argument("--seconds-per-k", type=float, default=160.0,
                    help="time for each K's proxied-model phases, both sides (ABBA rounds of short phases)")
    ap.add_argument("--check-k", type=int, default=4,
                    help="K of the method's own check, the hand server on both sides (0: none)")
    ap.add_argument("--max-runs", type=int, default=4)
    ap.add_argument("--eval-questions", type=int, default=6)
    ap.add_argument("--skip-eval", action="store_true")
    args = ap.parse_args()
    ks = [int(k) for k in args.ks.split(",")]

    stoppers: list[Callable[[], None]] = []
    result: dict[str, Any] = {"bench": "api_load", "model": MODEL, "pipeline": PIPELINE, "max_tokens": TOKENS,
                              "max_runs": args.max_runs, "max_queue": QUEUE, "seconds_per_k": args.seconds_per_k,
                              "phase_requests": args.requests,
                              "targets": {"tokens_per_s_vs_baseline": TARGET_TOKENS_RATIO,
                                          "rss_growth_30_to_300": TARGET_RSS_GROWTH,
                                          "eval_c3_vs_c1": TARGET_EVAL_RATIO, "sessions_equal_accepted": True}}
    with tempfile.TemporaryDirectory(prefix="chorus-api-load-") as tmp, stopping(stoppers):
        root = Path(tmp)
        cfg = make_config(root)
        sessions_dir = root / "sessions"
        api = Api(cfg, args.max_runs)
        stoppers.append(api.stop)
        http = httpx.Client(timeout=600)
        warm = http.post(f"{api.url}/v1/chat/completions", json=chat_body(MODEL, 0))
        warm.raise_for_status()
        http.post(f"{api.url}/v1/chat/completions",
                  json={"model": f"chorus/{PIPELINE}", "messages": [{"role": "user", "content": "Warm up."}]}
                  ).raise_for_status()
        argv, slots = chorus_server_argv(cfg, MODEL)
        result["slots"] = slots
        print(f"chorus started {MODEL} with {slots} slot(s); baseline argv: the same", file=sys.stderr)
        hand = HandServer(argv, root)
        stoppers.append(hand.stop)
        to_hand = to_model(hand.url, MODEL, hand.key)
        to_hand(http, 0)  # warm: the model mapped, the first prompt processed
        via_chorus = to_model(api.url, MODEL)

        per_k: list[dict[str, Any]] = []
        for k in ks:
            n = max(args.requests, 2 * k)
            mine, theirs, round_ratios = paired(via_chorus, to_hand, k, n, args.seconds_per_k, args.time_limit_s)
            pipe = load(to_pipeline(api.url), k, max(args.pipeline_requests, k), args.time_limit_s)
            saved = recorded(sessions_dir, pipe.sessions)
            m, t = mine.figures(), theirs.figures()
            ratio = ratio_of(mine, theirs)
            row = {"k": k, "model": m, "baseline": t, "tokens_per_s_ratio": ratio, "by_round": spread(round_ratios),
                   "pipeline": pipe.figures(),
                   "pipeline_accepted": pipe.ok, "pipeline_sessions_recorded": saved,
                   "pass": ratio >= TARGET_TOKENS_RATIO and saved == pipe.ok and pipe.failed == 0
                   and m["failed"] == 0}
            per_k.append(row)
            print(f"K={k:2d}  model {m['tokens_per_s']:7.1f} tok/s vs hand {t['tokens_per_s']:7.1f} "
                  f"(x{ratio:.3f}; {len(round_ratios)} rounds {min(round_ratios):.2f}-{max(round_ratios):.2f})  "
                  f"p50 {m['p50_s']}s p95 {m['p95_s']}s  429s {m['refused_429']}  |  pipeline "
                  f"{pipe.figures()['requests_per_s']:.2f} req/s p50 {pipe.figures()['p50_s']}s, "
                  f"sessions {saved}/{pipe.ok} accepted", file=sys.stderr)
        if args.check_k:
            # the method against itself: the hand server on both sides; how far from 1.0 noise alone moves it
            same_a, same_b, same_rounds = paired(to_hand, to_hand, args.check_k, max(args.requests, 2 * args.check_k),
                                                 args.seconds_per_k, args.time_limit_s)
            result["measurement_check"] = {"k": args.check_k, "tokens_per_s_ratio": ratio_of(same_a, same_b),
                                           "by_round": spread(same_rounds)}
            print(f"the method against itself (hand vs hand, K={args.check_k}): "
                  f"x{result['measurement_check']['tokens_per_s_ratio']:.3f}", file=sys.stderr)
        batching = stream_gain(to_hand, 3, 4)
        result["server_batching"] = {"model": MODEL, "slots": slots, **batching}
        print(f"the hand-started server: 3 requests at once {batching['together_s']:.2f} s, in a row "
              f"{batching['in_a_row_s']:.2f} s (gain x{batching['gain']:.3f})", file=sys.stderr)
        hand.stop()
        result["per_k"] = per_k

        # chorus's own memory: after 30 requests, then after 300 (every tenth a pipeline run)
        mixed_model, mixed_pipe = to_model(api.url, MODEL), to_pipeline(api.url)

        pipeline_ok: list[int] = []

        def mixed(client: httpx.Client, i: int) -> tuple[int, int, str | None]:
            if i % 10 != 9:
                return mixed_model(client, i)
            status, tokens, session = mixed_pipe(client, i)
            if status == 200:
                pipeline_ok.append(i)
            return status, tokens, session

        first = load(mixed, 8, 30, 600)
        time.sleep(1.0)
        rss_30 = api.rss_bytes()
        rest = load(mixed, 8, 270, 1200)
        time.sleep(1.0)
        rss_300 = api.rss_bytes()
        growth = (rss_300 - rss_30) / rss_30 if rss_30 else 1.0
        saved = recorded(sessions_dir, first.sessions + rest.sessions)
        result["rss"] = {"after_30_mib": round(rss_30 / 2**20, 1), "after_300_mib": round(rss_300 / 2**20, 1),
                         "growth": round(growth, 4), "requests_ok": first.ok + rest.ok,
                         "failed": first.failed + rest.failed, "refused_429": first.refused + rest.refused,
                         "pipeline_accepted": len(pipeline_ok), "pipeline_sessions_recorded": saved,
                         "pass": abs(growth) <= TARGET_RSS_GROWTH and first.failed + rest.failed == 0
                         and saved == len(pipeline_ok)}
        print(f"chorus RSS {rss_30 / 2**20:.1f} MiB after 30 requests, {rss_300 / 2**20:.1f} MiB after 300 "
              f"({growth:+.1%})", file=sys.stderr)
        health = http.get(f"{api.url}/health").json()
        result["health"] = health
        http.close()
        api.stop()

        if not args.skip_eval:
            one, line1 = eval_seconds(cfg, 1, args.eval_questions)
            three, line3 = eval_seconds(cfg, 3, args.eval_questions)
            ratio = round(three / one, 3)
            result["eval"] = {"questions": args.eval_questions, "concurrency_1_s": round(one, 2),
                              "concurrency_3_s": round(three, 2), "ratio": ratio, "pass": ratio <= TARGET_EVAL_RATIO,
                              "c1": line1, "c3": line3,
                              "ratio_floor": round(1 / result["server_batching"]["gain"], 3)}
            print(f"chorus eval: {one:.1f} s at --concurrency 1, {three:.1f} s at 3 (x{ratio:.3f})", file=sys.stderr)

    checks = [row["pass"] for row in result["per_k"]] + [result["rss"]["pass"]]
    if "eval" in result:
        checks.append(result["eval"]["pass"])
    result["pass"] = all(checks)
    result["load_avg"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result))
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
