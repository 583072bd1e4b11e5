"""The HTTP API's cost: workload W through `chorus api` against the same run in-process through Runner;
and how soon a plain OpenAI client sees the first visible delta of a streamed pipeline answer.

W = draft -> refine -> 3 experts in parallel -> synthesis: 6 completions of 64 tokens, greedy, fixed seed,
on the demo model. Both sides run the same pipeline file on the same config, each with its own warm
servers (the API process has its pool, this process has its own). After one warm-up run each, runs are
interleaved (API, in-process, API, ...; the order flips each round), each after a short wait for a
quieter CPU; the figures are medians and the ratio API / in-process of the wall time from request to
final answer. Target: ratio <= 1.02 warm. Both sides must give the same final text (greedy).

First visible delta: the time from the request to the first streamed chunk with a non-empty
`reasoning_content` or `content` (what a plain client such as Open WebUI shows), for pipeline "long"
(two earlier stages of 128 tokens, then a 16-token answer) and "short" (the same with 8-token earlier
stages), beside the time to the first `content` (all a client showed before the reasoning stream, which
grows with the earlier stages). Cold: the API's very first request (its servers not started), against
that run's own server start (the first call's time before its request: `(finished_at - started_at) -
total_s`). Targets: <= 2.0 s warm for both lengths; cold <= one server start + 2.0 s.

The last line is one JSON object with the figures, the targets and pass/fail. Every process this starts
(`chorus api` and, through it and through this process's pool, the llama-servers) is stopped on every
way out: normal end, an exception, SIGTERM, SIGHUP or Ctrl-C; on SIGKILL they die with us (PDEATHSIG).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from orchestrator.config.schema import load_config, load_pipeline  # noqa: E402
from orchestrator.history.store import SessionStore  # noqa: E402
from orchestrator.runs import Runner  # noqa: E402
from orchestrator.runtime import Runtime  # noqa: E402

DEMO = "gemma-3-270m-q4_k_m.gguf"
QUESTION = "Why is the sky blue?"
TARGET_WARM = 1.02
TARGET_VISIBLE_S = 2.0  # first visible delta, warm; cold: one server start plus this


def workload(max_tokens: int) -> dict[str, Any]:
    expert = "Question: {{ question }}\nAnswer: {{ previous }}\nReview and improve the answer:"
    return {
        "name": "w", "description": "W: draft -> refine -> 3 experts in parallel -> synthesis",
        "defaults": {"temperature": 0, "seed": 42, "max_tokens": max_tokens, "n_ctx": 1024},
        "stages": [
            {"name": "draft", "models": ["gemma3-270m"], "prompt": "Question: {{ question }}\nAnswer:"},
            {"name": "refine", "models": ["gemma3-270m"],
             "prompt": "Question: {{ question }}\nDraft: {{ previous }}\nRefined answer:"},
            {"name": "experts", "execution": "parallel", "prompt": expert,
             "models": [{"model": "gemma3-270m", "label": "facts", "system_prompt": "You check facts."},
                        {"model": "gemma3-270m", "label": "clarity", "system_prompt": "You edit for clarity."},
                        {"model": "gemma3-270m", "label": "skeptic", "system_prompt": "You are a skeptic."}],
             "aggregation": {"type": "synthesis", "synthesis_model": "gemma3-270m",
                             "synthesis_prompt": "Question: {{ question }}\n{% for r in responses %}Review "
                                                 "{{ loop.index }}: {{ r.text }}\n{% endfor %}Final answer:"}},
        ],
    }


def visible_workload(name: str, earlier_tokens: int) -> dict[str, Any]:
    """Two earlier stages of `earlier_tokens` each (reasoning), then a short answer (content)."""
    return {
        "name": name, "description": f"first visible delta: 2 earlier stages of {earlier_tokens} tokens",
        "defaults": {"temperature": 0, "seed": 42, "max_tokens": earlier_tokens, "n_ctx": 1024},
        "stages": [
            {"name": "draft", "models": ["gemma3-270m"], "prompt": "Question: {{ question }}\nAnswer:"},
            {"name": "refine", "models": ["gemma3-270m"],
             "prompt": "Question: {{ question }}\nDraft: {{ previous }}\nRefined answer:"},
            {"name": "answer", "models": ["gemma3-270m"], "max_tokens": 16,
             "prompt": "Question: {{ question }}\nNotes: {{ previous }}\nShort answer:"},
        ],
    }


def make_config(root: Path, model: Path, max_tokens: int) -> Path:
    config = root / "config"
    shutil.copytree(REPO / "config", config)
    models = root / "models"
    models.mkdir()
    (models / DEMO).symlink_to(model)
    app = yaml.safe_load((config / "app.yaml").read_text()) or {}
    app.update(models_dir=str(models), sessions_dir=str(root / "sessions"), logs_dir=str(root / "logs"))
    (config / "app.yaml").write_text(yaml.safe_dump(app))
    entries = yaml.safe_load((config / "models.yaml").read_text())
    entries["models"] = {"gemma3-270m": entries["models"]["gemma3-270m"]}  # the demo model only
    (config / "models.yaml").write_text(yaml.safe_dump(entries))
    (config / "pipelines").mkdir()
    (config / "pipelines" / "w.yaml").write_text(yaml.safe_dump(workload(max_tokens), sort_keys=False))
    for name, tokens in (("long", 128), ("short", 8)):
        (config / "pipelines" / f"{name}.yaml").write_text(
            yaml.safe_dump(visible_workload(name, tokens), sort_keys=False))
    return config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ApiServer:
    """`chorus api` in its own process group; `stop()` is safe to call twice and from a signal handler."""

    def __init__(self, config: Path, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "cli", "api", "--config-dir", str(config),
                                      "--port", str(self.port), "--max-runs", "2"], cwd=REPO, env=env,
                                     start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chorus api exited: {self.proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError("chorus api did not become ready")

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def wait_for_quiet_cpu(limit_pct: float = 50.0, max_wait_s: float = 10.0) -> float:
    """Wait (a little) for the CPU to calm down; returns the last reading (the machine may be shared)."""
    deadline = time.monotonic() + max_wait_s
    reading = psutil.cpu_percent(interval=0.5)
    while reading > limit_pct and time.monotonic() < deadline:
        reading = psutil.cpu_percent(interval=0.5)
    return reading


def via_api(client: httpx.Client, url: str) -> tuple[float, str]:
    start = time.perf_counter()
    r = client.post(f"{url}/v1/chat/completions", json={"model": "chorus/w", "messages": [
        {"role": "user", "content": QUESTION}]})
    wall = time.perf_counter() - start
    r.raise_for_status()
    body = r.json()
    if body["chorus"]["status"] != "completed":
        raise RuntimeError(f"API run ended {body['chorus']['status']}")
    return wall, body["choices"][0]["message"]["content"]


@dataclass
class Streamed:
    visible_s: float        # the first chunk with reasoning_content or content
    content_s: float        # the first chunk with content
    wall_s: float
    session_id: str


def streamed(client: httpx.Client, url: str, model: str) -> Streamed:
    """One streamed chat answer, read as a plain OpenAI client reads it (SSE `data:` lines)."""
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": QUESTION}]}
    start = time.perf_counter()
    visible = content = None
    session = ""
    with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            at = time.perf_counter() - start
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"API stream failed: {chunk['error']}")
            session = session or (chunk.get("chorus") or {}).get("session_id") or ""
            delta = chunk["choices"][0].get("delta", {}) if chunk.get("choices") else {}
            if delta.get("reasoning_content") or delta.get("content"):
                visible = at if visible is None else visible
            if delta.get("content"):
                content = at if content is None else content
    wall = time.perf_counter() - start
    if visible is None or content is None:
        raise RuntimeError(f"{model}: the stream had no visible delta or no content")
    return Streamed(visible, content, wall, session)


def server_start_s(sessions: Path, session_id: str) -> float:
    """How long the run's first call waited before its request: its server's start on cold servers."""
    first = SessionStore(sessions).load(session_id).stages[0].responses[0]
    if first.started_at is None or first.finished_at is None:
        raise RuntimeError("the first call has no timings")
    return (first.finished_at - first.started_at) - (first.total_s or 0.0)


def in_process(runner: Runner, pipeline: Any) -> tuple[float, str]:
    start = time.perf_counter()
    outcome = runner.run(pipeline, QUESTION, mode="manual")
    wall = time.perf_counter() - start
    if outcome.run.status != "completed":
        raise RuntimeError(f"in-process run ended {outcome.run.status}: {outcome.run.error}")
    return wall, outcome.run.final


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="measured runs per side (at least 3)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--model", type=Path, default=Path(os.environ.get("CHORUS_DEMO_MODEL", REPO / "models" / DEMO)))
    args = parser.parse_args()
    if args.runs < 3:
        parser.error("--runs must be at least 3")
    if not args.model.is_file():
        parser.error(f"demo model not found: {args.model}")

    server: ApiServer | None = None
    runtime: Runtime | None = None

    def stop_on_signal(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)  # unwinds into the finally below

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, stop_on_signal)
    root = Path(tempfile.mkdtemp(prefix="chorus-bench-api-"))
    try:
        config = make_config(root, args.model.resolve(), args.max_tokens)
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHORUS_")}
        env["CHORUS_ADMISSION_LEDGER"] = os.environ["CHORUS_ADMISSION_LEDGER"] = str(root / "admission.json")
        server = ApiServer(config, env)
        runtime = Runtime(load_config(config))
        runner = Runner(runtime)
        pipeline = load_pipeline(config / "pipelines" / "w.yaml")
        api_times: list[float] = []
        local_times: list[float] = []
        cpu: list[float] = []
        same_runs = True  # greedy: every run of a side gives that side's warm-up text
        visible: dict[str, list[Streamed]] = {"long": [], "short": []}
        with httpx.Client(timeout=900) as client:
            cold = streamed(client, server.url, "chorus/long")  # the API's first request: its server starts
            cold_start = server_start_s(root / "sessions", cold.session_id)
            print(f"cold long: first visible {cold.visible_s:.2f}s, first content {cold.content_s:.2f}s, "
                  f"server start {cold_start:.2f}s", file=sys.stderr, flush=True)
            warm_api = via_api(client, server.url)        # warm-up: starts each side's servers
            warm_local = in_process(runner, pipeline)
            texts = {"api": warm_api[1], "in_process": warm_local[1]}
            for i in range(args.runs):
                order = ("api", "local") if i % 2 == 0 else ("local", "api")
                for side in order:
                    cpu.append(wait_for_quiet_cpu())
                    if side == "api":
                        wall, text = via_api(client, server.url)
                        api_times.append(wall)
                        same_runs = same_runs and text == texts["api"]
                    else:
                        wall, text = in_process(runner, pipeline)
                        local_times.append(wall)
                        same_runs = same_runs and text == texts["in_process"]
                    print(f"round {i + 1} {side:5s} {wall:7.2f}s", file=sys.stderr, flush=True)
            streamed(client, server.url, "chorus/short")  # warm: the short pipeline's first run too
            for i in range(args.runs):
                for name in ("long", "short") if i % 2 == 0 else ("short", "long"):
                    cpu.append(wait_for_quiet_cpu())
                    got = streamed(client, server.url, f"chorus/{name}")
                    visible[name].append(got)
                    print(f"round {i + 1} {name:5s} first visible {got.visible_s:.2f}s, first content "
                          f"{got.content_s:.2f}s, whole {got.wall_s:.2f}s", file=sys.stderr, flush=True)
        api_median = statistics.median(api_times)
        local_median = statistics.median(local_times)
        ratio = api_median / local_median
        same_text = texts["api"] == texts["in_process"] and same_runs
        print(f"W warm, {args.runs} runs each: API median {api_median:.2f}s, in-process median "
              f"{local_median:.2f}s, ratio {ratio:.3f} (target <= {TARGET_WARM}); same final text: {same_text}")
        first = {name: statistics.median(r.visible_s for r in runs) for name, runs in visible.items()}
        content = {name: statistics.median(r.content_s for r in runs) for name, runs in visible.items()}
        pass_visible_warm = max(first.values()) <= TARGET_VISIBLE_S
        pass_visible_cold = cold.visible_s <= cold_start + TARGET_VISIBLE_S
        print(f"first visible delta, warm medians: long {first['long']:.2f}s, short {first['short']:.2f}s "
              f"(target <= {TARGET_VISIBLE_S}s); first content: long {content['long']:.2f}s, short "
              f"{content['short']:.2f}s; cold: {cold.visible_s:.2f}s with a {cold_start:.2f}s server start "
              f"(target <= {cold_start + TARGET_VISIBLE_S:.2f}s)")
        print(json.dumps({
            "bench": "api_overhead", "workload": "W: draft->refine->3 experts parallel->synthesis",
            "completions": 6, "max_tokens": args.max_tokens, "runs_per_side": args.runs,
            "api_s": [round(t, 3) for t in api_times], "in_process_s": [round(t, 3) for t in local_times],
            "api_median_s": round(api_median, 3), "in_process_median_s": round(local_median, 3),
            "ratio_warm": round(ratio, 4), "target_warm": TARGET_WARM, "pass_warm": ratio <= TARGET_WARM,
            "same_final_text": same_text,
            "first_visible_warm_s": {n: [round(r.visible_s, 3) for r in runs] for n, runs in visible.items()},
            "first_content_warm_s": {n: [round(r.content_s, 3) for r in runs] for n, runs in visible.items()},
            "first_visible_warm_median_s": {n: round(v, 3) for n, v in first.items()},
            "first_content_warm_median_s": {n: round(v, 3) for n, v in content.items()},
            "earlier_stage_tokens": {"long": 128, "short": 8},
            "target_first_visible_warm_s": TARGET_VISIBLE_S, "pass_first_visible_warm": pass_visible_warm,
            "first_visible_cold_s": round(cold.visible_s, 3), "first_content_cold_s": round(cold.content_s, 3),
            "server_start_cold_s": round(cold_start, 3),
            "target_first_visible_cold_s": round(cold_start + TARGET_VISIBLE_S, 3),
            "pass_first_visible_cold": pass_visible_cold,
            "cpu_percent_before_runs": cpu,
            "load_average": [round(x, 2) for x in os.getloadavg()], "cores": os.cpu_count(),
            "pass": ratio <= TARGET_WARM and same_text and pass_visible_warm and pass_visible_cold,
        }))
        return 0
    finally:
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)  # the cleanup itself is not interrupted
        if server is not None:
            server.stop()
        if runtime is not None:
            runtime.close()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
