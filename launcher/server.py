"""One llama-server process for one model: start, wait for health, stop, and say why it died.

The server runs out of process so a crash or an out-of-memory kill takes down only that model.
Children die with chorus: PR_SET_PDEATHSIG in the child, plus atexit and signal cleanup here.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
from tenacity import Retrying, retry_if_result, stop_after_delay, wait_exponential

from launcher import state
from launcher.errors import (
    InvalidModelFile,
    PortInUse,
    ServerCrashed,
    ServerError,
    ServerOutOfMemory,
    ServerStartError,
    ServerStartTimeout,
)

LOG_TAIL_LINES = 25
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class ServerSpec:
    """What makes two servers interchangeable (the pool key) plus how to run it."""

    model: str
    model_path: Path
    n_ctx: int = 4096           # per slot; the server gets n_ctx * slots in total
    n_gpu_layers: int = 0
    slots: int = 1
    threads: int | None = None
    chat_template: str | None = None
    extra_args: tuple[str, ...] = ()

    @property
    def family(self) -> tuple[object, ...]:
        """Everything that shapes the server but its slot count: within a family, more slots serve fewer.

        The chat template, threads and extra args change the command line, so they are part of it: two
        model names on one file with different templates must not share a server.
        """
        # The path as configured, made absolute without touching the disk: resolving symlinks would give
        # another key once the file's folder is gone (an unplugged disk), hiding the warm server that has it.
        return (os.path.abspath(self.model_path), self.n_ctx, self.n_gpu_layers, self.chat_template,
                self.threads, tuple(self.extra_args))

    def serves(self, wanted: ServerSpec) -> bool:
        """Whether a server of this spec can take `wanted`'s requests."""
        return self.family == wanted.family and self.slots >= wanted.slots

    @property
    def key(self) -> tuple[object, ...]:
        return (*self.family, self.slots)


@dataclass
class ServerOptions:
    host: str = "127.0.0.1"
    startup_timeout_s: float = 120.0
    stop_grace_s: float = 5.0
    port_retries: int = 3
    rlimit_as_bytes: int | None = None  # address-space cap for the child (tests, hard limits)
    log_verbosity: int | None = None    # llama.cpp -lv; higher shows buffer sizes
    state_dir: Path | None = None       # where running servers are recorded for `chorus ps`
    env: dict[str, str] = field(default_factory=dict)


def chat_template_args(template: str) -> list[str]:
    """llama-server flags for a chat template given as a built-in name, Jinja text, or a template file.

    Current llama.cpp uses Jinja by default and then reads --chat-template as template *text*, so a
    built-in name such as 'chatml' or 'gemma' needs --no-jinja to be looked up as a name.
    """
    if "{%" in template or "{{" in template:
        return ["--jinja", "--chat-template", template]
    if template.endswith((".jinja", ".j2", ".txt")) or os.sep in template:
        return ["--jinja", "--chat-template-file", str(Path(template).expanduser())]
    return ["--no-jinja", "--chat-template", template]


# ---------------------------------------------------------------- failure classification

_OOM = re.compile(r"out of memory|failed to allocate|cudaMalloc failed|std::bad_alloc|Cannot allocate memory"
                  r"|unable to allocate|ErrorOutOfDeviceMemory|failed to mmap", re.I)
_INVALID = re.compile(r"failed to load model|error loading model|invalid magic|failed to read magic"
                      r"|gguf_init_from_file|not a valid gguf|unknown model architecture"
                      r"|unsupported model|failed to read tensor info|tensor .* data is not within", re.I)
_PORT = re.compile(r"address already in use|couldn't bind|failed to bind|bind failed", re.I)


def _oom_kill_count() -> int | None:
    """The cgroup's OOM-kill counter, to tell the OOM killer's SIGKILL from a plain kill -9."""
    for path in ("/sys/fs/cgroup/memory.events", "/sys/fs/cgroup/memory/memory.oom_control"):
        try:
            text = Path(path).read_text()
        except OSError:
            continue
        m = re.search(r"oom_kill (\d+)", text)
        if m:
            return int(m.group(1))
    return None


def classify_exit(model: str, returncode: int | None, log_tail: str, *, command: list[str],
                  log_path: str | None, oom_kills_before: int | None = None,
                  starting: bool = True) -> ServerError:
    """Turn an exit status and the end of the log into the most specific typed error."""
    common = {"command": command, "log_tail": log_tail, "exit_code": returncode, "log_path": log_path}
    last = _last_error_line(log_tail)
    if _PORT.search(log_tail):
        return PortInUse(model, _line_matching(_PORT, log_tail), **common)
    if _OOM.search(log_tail):
        return ServerOutOfMemory(model, _line_matching(_OOM, log_tail), **common)
    if returncode == -signal.SIGKILL:
        after = _oom_kill_count()
        if oom_kills_before is not None and after is not None and after > oom_kills_before:
            return ServerOutOfMemory(model, "killed by the kernel's OOM killer", **common)
        return ServerCrashed(model, "killed by SIGKILL (kill -9, or the kernel's OOM killer)", **common)
    if _INVALID.search(log_tail):
        return InvalidModelFile(model, _line_matching(_INVALID, log_tail), **common)
    if returncode is not None and returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.Signals._value2member_map_ else str(
            -returncode)
        return ServerCrashed(model, f"killed by {name}", **common)
    what = f"exited with status {returncode}" + (f": {last}" if last else "")
    return (ServerStartError if starting else ServerCrashed)(model, what, **common)


def _line_matching(pattern: re.Pattern[str], log_tail: str) -> str:
    """The first log line that matched, without llama.cpp's timestamp prefix."""
    for ln in log_tail.splitlines():
        if pattern.search(ln):
            return re.sub(r"^[\d.]+ [A-Z] ", "", ln.strip())[:300]
    return _last_error_line(log_tail)


def _last_error_line(log_tail: str) -> str:
    lines = [ln.strip() for ln in log_tail.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.search(r"error|fail|abort|exception|what\(\)", ln, re.I):
            return ln[:300]
    return lines[-1][:300] if lines else ""


# ---------------------------------------------------------------- process plumbing

# PR_SET_PDEATHSIG fires when the *thread* that forked exits, so every spawn happens on this one
# long-lived thread rather than on whichever short-lived worker asked for a server.
_SPAWNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chorus-spawner")
_LIVE: weakref.WeakSet[ModelServer] = weakref.WeakSet()
_LIVE_LOCK = threading.Lock()


def _child_setup(rlimit_as: int | None) -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    os.setpgid(0, 0)  # its own group: a Ctrl-C in the terminal reaches chorus, which stops it cleanly
    if rlimit_as is not None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (rlimit_as, rlimit_as))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def stop_all_servers() -> None:
    """Stop every server this process started (atexit and signal handlers call this)."""
    with _LIVE_LOCK:
        servers = list(_LIVE)
    for server in servers:
        with contextlib.suppress(Exception):
            server.stop(grace_s=1.0)


atexit.register(stop_all_servers)


def install_signal_cleanup() -> None:
    """Make SIGTERM/SIGHUP stop our servers before exiting (call from the main thread)."""
    def handler(signum: int, _frame: object) -> None:
        stop_all_servers()
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(ValueError, OSError):  # not the main thread, or not supported
            signal.signal(sig, handler)


# ---------------------------------------------------------------- the server

class ModelServer:
    """A running llama-server. Create with `ModelServer(spec, binary, logs_dir).start()`."""

    def __init__(self, spec: ServerSpec, binary: Path, logs_dir: Path,
                 options: ServerOptions | None = None) -> None:
        self.spec = spec
        self.binary = Path(binary)
        self.logs_dir = Path(logs_dir)
        self.options = options or ServerOptions()
        self.api_key = secrets.token_urlsafe(24)
        self.port: int | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None
        self.started_at: float | None = None
        self.ready_s: float | None = None
        self._stopping = False
        self._oom_kills_at_start: int | None = None
        self._lock = threading.Lock()

    # -- identity
    @property
    def model(self) -> str:
        return self.spec.model

    @property
    def base_url(self) -> str:
        return f"http://{self.options.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def command(self, port: int) -> list[str]:
        s = self.spec
        cmd = [str(self.binary), "-m", str(s.model_path), "-c", str(s.n_ctx * s.slots),
               "-ngl", str(s.n_gpu_layers), "-np", str(s.slots), "--host", self.options.host,
               "--port", str(port), "--no-webui", "--api-key", self.api_key, "--metrics", "--fit", "off",
               "--cache-ram", "0"]  # no host prompt cache: it grows outside what the fit check admitted
        if s.threads:
            cmd += ["-t", str(s.threads)]
        if s.chat_template:
            cmd += chat_template_args(s.chat_template)
        if self.options.log_verbosity is not None:
            cmd += ["-lv", str(self.options.log_verbosity)]
        return cmd + list(s.extra_args)

    def redacted_command(self) -> list[str]:
        cmd = self.command(self.port or 0)
        if "--api-key" in cmd:
            cmd[cmd.index("--api-key") + 1] = "***"
        return cmd

    # -- lifecycle
    def start(self) -> ModelServer:
        """Spawn and wait until /health says ready; raise a typed ServerStartError otherwise."""
        if not Path(self.spec.model_path).is_file():  # llama-server would call it an invalid model file
            raise ServerStartError(self.model, f"model file not found: {self.spec.model_path}",
                                   command=self.redacted_command(),
                                   hint="Is the models directory there (a removable disk unplugged?) and the file "
                                        "still in it? Servers already running keep serving.")
        last: ServerError | None = None
        for _ in range(max(1, self.options.port_retries)):
            try:
                self._spawn(free_port(self.options.host))
                self._wait_ready()
                return self
            except PortInUse as exc:  # someone took the port between our probe and the bind
                last = exc
                self._reap()
        assert last is not None
        raise last

    def _spawn(self, port: int) -> None:
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.port = port
        self.log_path = self.logs_dir / f"{_slug(self.spec.model)}-{port}.log"
        self._stopping = False
        self._oom_kills_at_start = _oom_kill_count()
        env = {**os.environ, **self.options.env}
        cmd = self.command(port)
        rlimit = self.options.rlimit_as_bytes

        def spawn() -> subprocess.Popen[bytes]:
            with open(self.log_path, "ab") as log:  # type: ignore[arg-type]
                return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                        env=env, close_fds=True, preexec_fn=lambda: _child_setup(rlimit))

        self.started_at = time.monotonic()
        try:
            self.process = _SPAWNER.submit(spawn).result()
        except OSError as exc:
            raise ServerStartError(self.model, f"cannot run {self.binary}: {exc.strerror or exc}",
                                   command=self.redacted_command(), log_path=str(self.log_path),
                                   hint="Check the binary exists and is executable, or rebuild it with "
                                        "scripts/build_llama_server.sh.") from None
        with _LIVE_LOCK:
            _LIVE.add(self)

    def _wait_ready(self) -> None:
        deadline = self.options.startup_timeout_s

        def probe() -> str:
            if self.process is None or self.process.poll() is not None:
                return "dead"
            try:
                r = httpx.get(f"{self.base_url}/health", timeout=2.0)
            except httpx.HTTPError:
                return "waiting"
            return "ready" if r.status_code == 200 else "waiting"

        retryer = Retrying(stop=stop_after_delay(deadline), wait=wait_exponential(multiplier=0.01, max=0.1),
                           retry=retry_if_result(lambda state: state == "waiting"),
                           retry_error_callback=lambda _state: "timeout")
        state = retryer(probe)
        if state == "ready":
            self.ready_s = time.monotonic() - (self.started_at or time.monotonic())
            self._write_state()
            return
        if state == "dead":
            raise self.failure(starting=True)
        self.stop()
        raise ServerStartTimeout(self.model, f"no healthy answer within {deadline:.0f}s",
                                 command=self.redacted_command(), log_tail=self.log_tail(),
                                 log_path=str(self.log_path))

    def is_alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def failure(self, *, starting: bool = False) -> ServerError:
        """Why the (dead) process died, as a typed error."""
        rc = self.process.wait(timeout=5) if self.process else None
        return classify_exit(self.model, rc, self.log_tail(), command=self.redacted_command(),
                             log_path=str(self.log_path) if self.log_path else None,
                             oom_kills_before=self._oom_kills_at_start, starting=starting)

    def stop(self, grace_s: float | None = None) -> None:
        """SIGTERM, then SIGKILL after the grace period. Safe to call twice."""
        with self._lock:
            self._stopping = True
            proc = self.process
            if proc is not None and proc.poll() is None:
                grace = self.options.stop_grace_s if grace_s is None else grace_s
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
                    proc.send_signal(signal.SIGCONT)  # a stopped (SIGSTOP, hung) process holds SIGTERM until continued
                try:
                    proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    proc.wait(timeout=10)
            with _LIVE_LOCK:
                _LIVE.discard(self)
            if self.options.state_dir and proc is not None:
                state.remove_record(self.options.state_dir, proc.pid)

    def _write_state(self) -> None:
        if self.options.state_dir is None or self.process is None or self.port is None:
            return
        s = self.spec
        state.write_record(self.options.state_dir, state.ServerRecord(
            pid=self.process.pid, port=self.port, model=s.model, model_path=str(s.model_path), n_ctx=s.n_ctx,
            n_gpu_layers=s.n_gpu_layers, slots=s.slots, owner_pid=os.getpid(), started_at=time.time(),
            log_path=str(self.log_path) if self.log_path else None))

    def _reap(self) -> None:
        if self.process is not None:
            with contextlib.suppress(Exception):
                self.process.wait(timeout=5)
        with _LIVE_LOCK:
            _LIVE.discard(self)

    @property
    def stopped_by_us(self) -> bool:
        return self._stopping

    # -- observation
    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode("utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def rss_bytes(self) -> int | None:
        if not self.is_alive():
            return None
        try:
            return int(psutil.Process(self.pid).memory_info().rss)
        except psutil.Error:
            return None

    def __repr__(self) -> str:
        state = "alive" if self.is_alive() else "stopped"
        return f"<ModelServer {self.model} pid={self.pid} port={self.port} {state}>"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:60] or "model"
