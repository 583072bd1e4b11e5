"""A chorus pipeline vs the same generations driven by hand against the same llama-server, in one run.

Workload W: draft → refine → 3 experts in parallel → synthesis: 6 completions of 64 tokens, greedy, a fixed
seed, on the demo model (Gemma 3 270M, completion mode). The baseline is a short script (below, run as its
own process) that starts the same llama-server binary with the same flags (3 slots, and the threads, context
checkpoints and HTTP threads chorus passes: checked against the argv of chorus's server) and sends the same 6
requests with httpx, the 3 experts concurrently. Chorus runs W with its Runner, as `chorus run --manual W.yaml` does.

Measured in RUNS rounds, each after the CPU has gone idle:
  - cold: wall time from process start to final answer, the server's start included. The two processes of
    a round start one after the other, the baseline's first in even rounds and chorus's first in odd ones
    (the second starts beside the first one's idle warm server); the figure is the median over rounds of
    chorus's cold time over the baseline's (the ratio of the two medians is reported beside it);
  - warm: wall time of W with the server already up (chorus: later runs in the same process). Both
    processes of a round stay up, their servers warm, and W runs on one side then the other, WARM_RUNS
    pairs in ABBA order (the other side's server idle meanwhile). The figure is the median over every pair
    of chorus's time over the baseline's: W on this shared host drifted by 10-25% between rounds minutes
    apart, while the two runs of a pair are seconds apart and meet the same host. The fastest warm run of
    each process (the earlier figure) is reported beside it.
Targets: warm ratio <= 1.03, cold ratio <= 1.05, a second identical run starts 0 servers, and both produce
the same final text. The last line is one JSON object with the figures, targets and pass/fail.

The text is compared on W with the 3 experts sent one at a time, each side on a fresh server of its own,
after the timed runs. The timed runs' finals are not comparable: llama-server does not give bit-identical
logits when several slots decode in one batch, and which tokens share a batch depends on when each request
arrives (ggml-org/llama.cpp#7052, #6950), so two baseline runs differ now and then; a later run on the same
server reuses cached prompt prefixes computed in those batches, so it differs too. The timed finals are
still reported, with whether each side's agree. Chorus's `execution: sequential` runs one *model* at a time
(a model's calls share its slots at once), so on the check chorus's 3 experts are three names for the one
GGUF file: they share one server (one family), and the stage sends them one after another.

Every process it starts is stopped on every way out (finally, SIGTERM/SIGHUP/Ctrl-C).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path[0] = str(REPO)  # not bench/: bench/launcher.py would shadow the launcher package
MODEL = REPO / "models" / "gemma-3-270m-q4_k_m.gguf"
RUNS = int(os.environ.get("CHORUS_BENCH_RUNS", "5"))  # medians of 3 moved by 5% between idle runs
WARM_RUNS = 4  # back-to-back pairs per round, in ABBA order; one warm run moved by up to 30% when a neighbour was busy
QUESTION = "Why do leaves change colour in autumn?"
N_CTX, SLOTS, TOKENS, SEED = 1024, 3, 64, 42

ROLES = ["botanist", "chemist", "teacher"]
CHECK_ALIASES = ["gemma3-270m", "gemma3-270m-b", "gemma3-270m-c"]  # one file, one server: the text check


def pipeline_spec(one_at_a_time: bool = False) -> dict:
    """W as a chorus pipeline. In completion mode chorus sends `system_prompt + "\n\n" + prompt`, and a single
    answer passes through a stage unchanged: the baseline below builds exactly the same prompts.
    `one_at_a_time`: the experts are three names of the model (see CHECK_ALIASES), one after another."""
    experts = [{"model": name, "label": role, "system_prompt": f"As a {role}."}
               for name, role in zip(CHECK_ALIASES if one_at_a_time else ["gemma3-270m"] * 3, ROLES, strict=True)]
    return {"name": "W", "defaults": {"temperature": 0, "seed": SEED, "max_tokens": TOKENS, "n_ctx": N_CTX},
            "stages": [
                {"name": "draft", "models": ["gemma3-270m"], "prompt": "Question: {{ question }}\nAnswer:"},
                {"name": "refine", "models": ["gemma3-270m"],
                 "prompt": "Question: {{ question }}\nDraft: {{ previous }}\nBetter answer:"},
                {"name": "experts", "execution": "sequential" if one_at_a_time else "auto", "models": experts,
                 "prompt": "Question: {{ question }}\nAnswer: {{ previous }}\nComment:",
                 "aggregation": {"type": "synthesis", "synthesis_model": "gemma3-270m",
                                 "synthesis_prompt": "Question: {{ question }}\n{% for r in responses %}"
                                                     "Answer {{ loop.index }}: {{ r.text }}\n{% endfor %}"
                                                     "Final answer:"}},
            ]}


# ---------------------------------------------------------------- the two sides, each run as its own process


def baseline_child(binary: str, question: str, server_flags: str, mode: str = "timed") -> dict:
    """The hand-written script: start llama-server with chorus's flags (the ones chorus adds for this machine,
    `server_flags`, a JSON list, given by the parent), send W's 6 requests with httpx (mode "check": once, the
    experts one at a time)."""
    import asyncio
    import secrets
    import socket

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    key = secrets.token_hex(16)
    key_file = Path(tempfile.mkdtemp()) / "key"
    key_file.touch(0o600)
    key_file.write_text(key)
    cmd = [binary, "-m", str(MODEL), "-c", str(N_CTX * SLOTS), "-ngl", "0", "-np", str(SLOTS), "--host",
           "127.0.0.1", "--port", str(port), "--no-webui", "--api-key-file", str(key_file), "--metrics",
           "--fit", "off", "--cache-ram", "0", *json.loads(server_flags)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url, headers = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {key}"}
    try:
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise SystemExit(f"the hand-started llama-server exited with {proc.returncode}: {' '.join(cmd)}")
            time.sleep(0.05)

        async def gen(client: httpx.AsyncClient, prompt: str) -> str:
            body = {"stream": True, "temperature": 0, "seed": SEED, "prompt": prompt, "cache_prompt": True,
                    "n_predict": TOKENS}
            for attempt in (1, 2):  # llama-server may close an idle keep-alive connection: resend once
                text = ""
                try:
                    async with client.stream("POST", url + "/completion", json=body, headers=headers) as r:
                        async for line in r.aiter_lines():
                            if line.startswith("data:"):
                                text += json.loads(line[5:]).get("content") or ""
                    return text
                except httpx.RemoteProtocolError:
                    if attempt == 2 or text:
                        raise
            return text

        async def workload(parallel: bool = True) -> str:
            async with httpx.AsyncClient(timeout=600) as c:
                draft = await gen(c, f"Question: {question}\nAnswer:")
                better = await gen(c, f"Question: {question}\nDraft: {draft}\nBetter answer:")
                prompts = [f"As a {role}.\n\nQuestion: {question}\nAnswer: {better}\nComment:" for role in ROLES]
                if parallel:
                    experts = await asyncio.gather(*(gen(c, prompt) for prompt in prompts))
                else:
                    experts = [await gen(c, prompt) for prompt in prompts]
                answers = "".join(f"Answer {i + 1}: {t}\n" for i, t in enumerate(experts))
                return (await gen(c, f"Question: {question}\n{answers}Final answer:")).strip()

        if mode == "check":
            return {"final": asyncio.run(workload(parallel=False))}
        final = asyncio.run(workload())
        cold = since_process_start()
        serve_warm_runs({"cold_s": cold, "final": final}, lambda: asyncio.run(workload()))
        return {**rss_mib([proc.pid]), "server_argv": cmd}
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def rss_mib(server_pids: list[int]) -> dict[str, float]:
    """This Python process's resident memory beside its llama-server's (the model's mapped weights are the
    server's, not ours)."""
    servers = 0
    for pid in server_pids:
        with contextlib.suppress(psutil.Error):
            servers += psutil.Process(pid).memory_info().rss
    return {"own_rss_mib": round(psutil.Process().memory_info().rss / 2**20, 1),
            "server_rss_mib": round(servers / 2**20, 1)}


def serve_warm_runs(cold: dict, workload: Callable[[], object]) -> None:
    """After the cold run: say so (one JSON line), then run W each time the parent writes `run` (one JSON line
    back: its wall and this process's CPU seconds), until it writes `end`."""
    print(json.dumps(cold), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            return
        t1, cpu1 = time.perf_counter(), cpu_s()
        workload()
        print(json.dumps({"s": time.perf_counter() - t1, "cpu_s": cpu_s() - cpu1}), flush=True)


def cpu_s() -> float:
    """This process's CPU time (every thread), which the server's threads on the same cores do not get."""
    times = os.times()
    return times.user + times.system


def since_process_start() -> float:
    """Seconds since this process was created (the interpreter's own start-up included), to 10 ms: psutil's
    create_time() adds the boot time, which /proc/stat gives in whole seconds (up to 1 s off)."""
    with open("/proc/self/stat") as stat:
        start_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
    return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")


def chorus_child(config_dir: str, spec_path: str, question: str, mode: str = "timed") -> dict:
    """chorus as a user's script would drive it: load the config, run W, run it again warm (mode "check":
    once; `spec_path` is then W with its experts one at a time)."""
    from orchestrator.config.schema import load_config, load_pipeline
    from orchestrator.runs import Runner
    from orchestrator.runtime import Runtime

    runtime = Runtime(load_config(config_dir))
    try:
        pipeline = load_pipeline(Path(spec_path))
        outcome = Runner(runtime).run(pipeline, question, mode="manual")
        if mode == "check":
            return {"final": outcome.run.final.strip()}
        cold = since_process_start()
        starts = runtime.pool.starts
        serve_warm_runs({"cold_s": cold, "final": outcome.run.final.strip(), "status": outcome.run.status},
                        lambda: Runner(runtime).run(pipeline, question, mode="manual"))
        return {"starts_second": runtime.pool.starts - starts,
                **rss_mib([s.pid for s in runtime.running_servers() if s.pid is not None]),
                "server_argv": [a for s in runtime.running_servers() for a in psutil.Process(s.pid).cmdline()]}
    finally:
        runtime.close()


def server_flags_of(argv: list[str]) -> list[str]:
    """A llama-server argv without what differs by nature between two starts: the binary's path, the model's
    path, the port and the key file."""
    out, skip = [], False
    for arg in argv[1:]:
        if skip:
            skip = False
            continue
        if arg in ("-m", "--port", "--api-key-file"):
            skip = True
            continue
        out.append(arg)
    return out


def wait_idle(threshold: float = 15.0, timeout_s: float = 60.0) -> float:
    """Wait until the CPU is mostly idle (other work on a shared machine skews a timing)."""
    deadline = time.monotonic() + timeout_s
    load = psutil.cpu_percent(interval=1.0)
    while load > threshold and time.monotonic() < deadline:
        load = psutil.cpu_percent(interval=1.0)
    return load


class Side:
    """One side's process of a round: started (its cold run timed), then W on demand, then its figures."""

    def __init__(self, cmd: list[str], env: dict[str, str], children: list[subprocess.Popen], log: Path) -> None:
        self.log = log.open("w")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env=env, start_new_session=True)
        children.append(self.proc)
        self.children = children
        self.info = self._line()
        self.warm: list[dict] = []

    def _line(self) -> dict:
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            self.proc.wait(30)
            raise RuntimeError(f"a bench child failed ({self.proc.returncode}): "
                               f"{Path(self.log.name).read_text()[-2000:]}")
        return json.loads(line)

    def run_warm(self) -> float:
        self.proc.stdin.write("run\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        self.warm.append(self._line())
        return self.warm[-1]["s"]

    def end(self) -> dict:
        self.proc.stdin.write("end\n")  # type: ignore[union-attr]
        self.proc.stdin.close()  # type: ignore[union-attr]
        self.info.update(self._line())
        self.proc.wait(60)
        self.children.remove(self.proc)
        self.log.close()
        times = [w["s"] for w in self.warm]
        return {**self.info, "warm_s": min(times), "warm_all_s": times,
                "warm_cpu_s": statistics.median(w["cpu_s"] for w in self.warm)}


def run_child(cmd: list[str], env: dict[str, str], children: list[subprocess.Popen]) -> dict:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    children.append(proc)
    out, err = proc.communicate(timeout=900)
    children.remove(proc)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[1:3]} failed ({proc.returncode}): {err[-2000:]}")
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    sys.path.insert(0, str(REPO))
    from launcher.cpus import usable_cores
    from launcher.process.binary import find_llama_server
    from launcher.process.server import CTX_CHECKPOINTS, HTTP_THREADS

    binary = find_llama_server()
    server_flags = json.dumps(["-t", str(usable_cores()), "--ctx-checkpoints", str(CTX_CHECKPOINTS),
                               "--threads-http", str(HTTP_THREADS)])
    children: list[subprocess.Popen] = []

    def stop_children(*_: object) -> None:
        for proc in children:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        sys.exit(130)

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, stop_children)
    work = Path(tempfile.mkdtemp(prefix="chorus-overhead-"))
    config = work / "config"
    config.mkdir()
    (config / "app.yaml").write_text(json.dumps({
        "models_dir": str(MODEL.parent), "sessions_dir": str(work / "sessions"), "logs_dir": str(work / "logs")}))
    entry = {"file": MODEL.name, "default_n_ctx": N_CTX, "default_gpu_layers": 0}
    (config / "models.yaml").write_text(json.dumps({"models": {"gemma3-270m": entry}}))
    check_config = work / "check-config"
    check_config.mkdir()
    (check_config / "app.yaml").write_text((config / "app.yaml").read_text())
    (check_config / "models.yaml").write_text(json.dumps({"models": dict.fromkeys(CHECK_ALIASES, entry)}))
    spec_path = work / "W.yaml"
    spec_path.write_text(json.dumps(pipeline_spec()))
    check_path = work / "W-one-at-a-time.yaml"
    check_path.write_text(json.dumps(pipeline_spec(one_at_a_time=True)))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    base_cmd = [sys.executable, __file__, "--child", "baseline", str(binary), QUESTION, server_flags]
    chorus_cmd = [sys.executable, __file__, "--child", "chorus", str(config), str(spec_path), QUESTION]
    base, ours = [], []
    pairs: list[float] = []  # chorus's warm W over the baseline's, the two run back to back
    try:
        for i in range(RUNS):
            if i % 2 == 0:
                wait_idle()
                hand = Side(base_cmd, env, children, work / f"baseline-{i}.log")
                wait_idle()
                mine = Side(chorus_cmd, env, children, work / f"chorus-{i}.log")
            else:
                wait_idle()
                mine = Side(chorus_cmd, env, children, work / f"chorus-{i}.log")
                wait_idle()
                hand = Side(base_cmd, env, children, work / f"baseline-{i}.log")
            for j in range(WARM_RUNS):
                wait_idle()
                if j % 2 == 0:
                    theirs_s, ours_s = hand.run_warm(), mine.run_warm()
                else:
                    ours_s, theirs_s = mine.run_warm(), hand.run_warm()
                pairs.append(ours_s / theirs_s)
            base.append(hand.end())
            ours.append(mine.end())
            print(f"run {i + 1}: baseline cold {base[-1]['cold_s']:.2f}s warm {base[-1]['warm_all_s']} | "
                  f"chorus cold {ours[-1]['cold_s']:.2f}s warm {ours[-1]['warm_all_s']} | pairs "
                  f"{[round(r, 3) for r in pairs[-WARM_RUNS:]]}", flush=True)
        wait_idle()
        base_check = run_child([*base_cmd, "check"], env, children)["final"]
        ours_check = run_child([sys.executable, __file__, "--child", "chorus", str(check_config), str(check_path),
                                QUESTION, "check"], env, children)["final"]
    finally:
        for proc in children:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
    med = statistics.median
    cold_ratio = med(o["cold_s"] / b["cold_s"] for o, b in zip(ours, base, strict=True))
    cold_medians_ratio = med(o["cold_s"] for o in ours) / med(b["cold_s"] for b in base)
    warm_ratio = med(pairs)
    warm_min_ratio = med(o["warm_s"] for o in ours) / med(b["warm_s"] for b in base)
    # The text check: the experts one at a time, each side on a fresh server (see the docstring for why not
    # the timed runs'). Whether each side's timed runs agree is reported beside it.
    same_text = ours_check == base_check
    timed_matches = [o["final"] == b["final"] for o, b in zip(ours, base, strict=True)]
    base_agree = len({b["final"] for b in base}) == 1
    ours_agree = len({o["final"] for o in ours}) == 1
    zero_starts = all(o["starts_second"] == 0 for o in ours)
    same_flags = all(server_flags_of(o["server_argv"]) == server_flags_of(b["server_argv"])
                     for o, b in zip(ours, base, strict=True))
    print(f"median cold: baseline {med(b['cold_s'] for b in base):.2f}s, chorus {med(o['cold_s'] for o in ours):.2f}s"
          f" → {cold_medians_ratio:.3f}; median of the rounds' ratios {cold_ratio:.3f} (target ≤ 1.05)")
    print(f"warm, median of {len(pairs)} back-to-back pairs (chorus / baseline): ratio {warm_ratio:.3f} "
          f"(target ≤ 1.03); fastest per process, median: baseline {med(b['warm_s'] for b in base):.2f}s, chorus "
          f"{med(o['warm_s'] for o in ours):.2f}s → {warm_min_ratio:.3f}")
    print(f"RSS: chorus process {med(o['own_rss_mib'] for o in ours):.0f} MiB beside its server's "
          f"{med(o['server_rss_mib'] for o in ours):.0f} MiB; the hand script "
          f"{med(b['own_rss_mib'] for b in base):.0f} "
          f"MiB beside its server's {med(b['server_rss_mib'] for b in base):.0f} MiB")
    print(f"CPU per warm run of W: chorus process {med(o['warm_cpu_s'] for o in ours):.2f}s, the hand script "
          f"{med(b['warm_cpu_s'] for b in base):.2f}s (taken from the server's cores)")
    print(f"same final text, experts one at a time on fresh servers: {same_text}; timed runs (experts "
          f"batched on 3 slots): same per run {timed_matches}, baseline runs agree: {base_agree}, chorus runs "
          f"agree: {ours_agree}; second run started {[o['starts_second'] for o in ours]} servers")
    print(f"the hand script's llama-server had chorus's flags (port, key file and model path aside): {same_flags}")
    if not same_text:
        print(f"baseline final: {base_check!r}\nchorus final:   {ours_check!r}")
    result = {"bench": "pipeline_overhead", "runs": RUNS,
              "baseline_cold_s": [round(b["cold_s"], 3) for b in base],
              "chorus_cold_s": [round(o["cold_s"], 3) for o in ours],
              "baseline_warm_s": [round(b["warm_s"], 3) for b in base],
              "chorus_warm_s": [round(o["warm_s"], 3) for o in ours],
              "baseline_warm_all_s": [[round(t, 3) for t in b["warm_all_s"]] for b in base],
              "chorus_warm_all_s": [[round(t, 3) for t in o["warm_all_s"]] for o in ours],
              "baseline_warm_cpu_s": [round(b["warm_cpu_s"], 3) for b in base],
              "chorus_warm_cpu_s": [round(o["warm_cpu_s"], 3) for o in ours],
              "warm_pair_ratios": [round(r, 4) for r in pairs],
              "cold_ratio": round(cold_ratio, 4), "cold_medians_ratio": round(cold_medians_ratio, 4),
              "warm_ratio": round(warm_ratio, 4),
              "warm_fastest_per_process_ratio": round(warm_min_ratio, 4),
              "target_cold_ratio_max": 1.05, "target_warm_ratio_max": 1.03,
              "same_final_text": same_text, "final_text": ours_check,
              "timed_same_final_text_per_run": timed_matches,
              "baseline_timed_runs_agree": base_agree, "chorus_timed_runs_agree": ours_agree,
              "second_run_server_starts": [o["starts_second"] for o in ours],
              "same_server_flags": same_flags, "chorus_server_argv": ours[0]["server_argv"][1:],
              "chorus_rss_mib": [o["own_rss_mib"] for o in ours],
              "chorus_server_rss_mib": [o["server_rss_mib"] for o in ours],
              "baseline_script_rss_mib": [b["own_rss_mib"] for b in base],
              "baseline_server_rss_mib": [b["server_rss_mib"] for b in base],
              "pass": cold_ratio <= 1.05 and warm_ratio <= 1.03 and same_text and zero_starts and same_flags}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        side, args = sys.argv[2], sys.argv[3:]
        out = baseline_child(*args) if side == "baseline" else chorus_child(*args)
        print(json.dumps(out))
        sys.exit(0)
    sys.exit(main())
