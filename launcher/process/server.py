"""One llama-server process for one model: start, wait for health, stop, and say why it died.

The server runs out of process so a crash or an out-of-memory kill takes down only that model.
Children die with chorus: PR_SET_PDEATHSIG in the child, plus atexit and signal cleanup here. Each
server leads its own process group and is stopped as a group, so a `llama_server:` wrapper script
that does not `exec` cannot leave the real server behind. PR_SET_PDEATHSIG reaches only that wrapper when
chorus is killed with SIGKILL, so each server is recorded (`launcher/process/state.py`) by the pid that listens on its
port and by its group, from the moment it is spawned; `chorus ps`/`stop` find it, and every start first stops
the recorded servers whose chorus is gone.

Each start writes its own log, `<logs_dir>/<model>-<port>.log` (llama-server's stdout and stderr). Before a
start the model's older logs are pruned (`prune_server_logs`): the newest `log_keep` (5) per model stay, each
cut to its last `log_cap_bytes` (2 MiB, where a failure shows), and the log of a server still running (its
port is bound) is never touched.

Files are owner-only: the logs dir is created 0700, logs and `running/` records are 0600, and the
API key reaches the server through `--api-key-file`, a 0600 file in `<logs_dir>/runtime` (0700),
never through argv (which any local user reads with `ps`). The key file is removed when the server
stops or fails to start.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import logging
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
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict

import psutil

from launcher.errors import (
    InvalidModelFile,
    InvalidServerSpec,
    PortInUse,
    ServerCrashed,
    ServerError,
    ServerFilesUnwritable,
    ServerOutOfMemory,
    ServerStartError,
    ServerStartTimeout,
    ServerStopped,
)
from launcher.process import state
from launcher.process.limits import MAX_N_CTX as MAX_N_CTX  # the n_ctx bounds, re-exported from their light home
from launcher.process.limits import MIN_N_CTX as MIN_N_CTX
from launcher.process.state import group_members

# llama-server keeps up to 32 copies of a slot's SWA cache by default (1.4 GiB for the demo at 32k x 3 slots),
# outside what the fit check admitted; chorus keeps a few and the memory estimate counts them.
CTX_CHECKPOINTS = 2
CHECKPOINT_FLAGS = frozenset({"-ctxcp", "--ctx-checkpoints", "--swa-checkpoints"})
# llama-server's HTTP layer (cpp-httplib) gives each connection a thread for as long as it is kept alive, from
# slots + 4 fixed threads plus dynamic ones; a new connection that finds none idle can wait in its job queue
# until another connection closes. Through chorus's pooled keep-alive connections (16 clients on 4 slots)
# that held a request 10-13 s (the others: 3-4.5 s) in 6 of 10 phases. With a fixed thread for every
# connection chorus's two clients may hold to one server (the engine's and the API proxy's, 64 each), none
# waits; each thread adds about 25 KiB of RSS, but reserves a stack of address space (8 MiB): under an
# address-space limit the server keeps its default count (`http_threads_args`), and a start that a hidden
# limit kills for want of threads is retried with it (`_start_on_a_free_port`).
HTTP_THREADS = 128
# What a llama-server that could not create a thread dies with (pthread_create's EAGAIN, uncaught).
THREADS_REFUSED = re.compile(r"std::system_error.*\n?.*Resource temporarily unavailable")

log = logging.getLogger("chorus.server")

LOG_TAIL_LINES = 25
PR_SET_PDEATHSIG = 1
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
LOG_KEEP = 5                    # llama-server logs kept per model, the new one included
LOG_CAP_BYTES = 2 * 1024 * 1024  # an older log is cut to its last 2 MiB
# llama-server's CPU threads meet at an OpenMP barrier after every op, and libgomp spins 300,000 times
# before sleeping there. Two servers busy at once (two models of concurrent runs) then take more threads
# than cores and spin through each other's time slices: on 2 cores a gemma and a smollm2 server generating
# together made 8-33 tok/s in all, against 75 and 120 each alone. 1,000 spins gave 60-70 together and a lone
# server about the same speed in a bare test, but cost a single pipeline run 3-7% beside its own busy client
# process, and one model's server serving many API requests alone 4-13% of its tokens/s, so it is only used
# where servers may be busy side by side (ServerOptions.shares_cores: concurrent runs expected and more than
# one server in play). A user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.
OMP_SPIN_ENV = {"GOMP_SPINCOUNT": "1000"}


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
    rpc: tuple[str, ...] = ()   # llama.cpp RPC workers (host:port) that hold part of the layers: --rpc

    def __post_init__(self) -> None:
        """Refuse values llama-server would misread (-c -1, -np 0) before any process starts."""
        for name, minimum in (("n_ctx", MIN_N_CTX), ("slots", 1), ("n_gpu_layers", -1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise InvalidServerSpec(self.model, name, value, minimum)
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise InvalidServerSpec(self.model, "threads", self.threads, 1)

    @property
    def family(self) -> tuple[object, ...]:
        """Everything that shapes the server but its slot count: within a family, more slots serve fewer.

        The chat template, threads and extra args change the command line, so they are part of it: two
        model names on one file with different templates must not share a server.
        """
        # The path as configured, made absolute without touching the disk: resolving symlinks would give
        # another key once the file's folder is gone (an unplugged disk), hiding the warm server that has it.
        return (os.path.abspath(self.model_path), self.n_ctx, self.n_gpu_layers, self.chat_template,
                self.threads, tuple(self.extra_args), tuple(self.rpc))

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
    log_keep: int = LOG_KEEP            # logs kept per model (see prune_server_logs)
    log_cap_bytes: int = LOG_CAP_BYTES  # each older log cut to its tail of this size
    state_dir: Path | None = None       # where running servers are recorded for `chorus ps`
    runtime_dir: Path | None = None     # where key files live; default <logs_dir>/runtime
    env: dict[str, str] = field(default_factory=dict)
    # asked at each start, with the spec starting: short OpenMP spinning (OMP_SPIN_ENV)
    shares_cores: Callable[[ServerSpec], bool] | None = None


def server_env(environ: Mapping[str, str], extra: Mapping[str, str], *, shares_cores: bool = False) -> dict[str, str]:
    """A server's environment: ours and the options', with short OpenMP spinning when it shares the cores
    with other busy servers, unless the user set OpenMP's waiting."""
    env = {**environ, **extra}
    env.pop("LLAMA_API_KEY", None)  # would add a key of the user's to ours
    if shares_cores and not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & env.keys():
        env.update(OMP_SPIN_ENV)
    return env


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


class _ExitDetails(TypedDict):
    """The keyword arguments every ServerError that classify_exit builds shares."""

    command: list[str]
    log_tail: str
    exit_code: int | None
    log_path: str | None


def classify_exit(model: str, returncode: int | None, log_tail: str, *, command: list[str],
                  log_path: str | None, oom_kills_before: int | None = None,
                  starting: bool = True) -> ServerError:
    """Turn an exit status and the end of the log into the most specific typed error."""
    common: _ExitDetails = {"command": command, "log_tail": log_tail, "exit_code": returncode,
                            "log_path": log_path}
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
    if not starting and returncode in (0, -signal.SIGTERM, -signal.SIGINT):  # llama-server exits 0 on SIGTERM
        return ServerStopped(model, "stopped from outside (`chorus stop` in another process, or a service "
                             "manager): it exited as asked, it did not crash", **common)
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


def die_with_parent(sig: int = signal.SIGKILL, parent: int | None = None) -> None:
    """In a child between fork and exec: get `sig` when the thread that forked it exits (Linux only).

    This covers a parent killed with SIGKILL, where no handler or atexit of the parent can run. `parent`, the
    forking process's pid: if it died before the prctl took effect (we were reparented already), `sig` now.
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if parent is not None and os.getppid() != parent:
            os.kill(os.getpid(), sig)


def own_group_dying_with_parent(sig: int = signal.SIGKILL, parent: int | None = None) -> None:
    """preexec_fn for helper processes (Streamlit, a benchmark's baseline server): own group, dies with us.
    `parent`: our pid, taken before the fork (see die_with_parent)."""
    die_with_parent(sig, parent)
    os.setpgid(0, 0)


def http_threads_args(extra_args: tuple[str, ...] | list[str], rlimit_as: int | None) -> list[str]:
    """`--threads-http HTTP_THREADS` unless models.yaml sets it or an address-space limit is in force (ours
    for the child, or one this process inherited): 128 stacks reserve 1 GiB of it, and a server that cannot
    make its threads aborts before it could say it is out of memory."""
    import resource

    inherited = resource.getrlimit(resource.RLIMIT_AS)[0]
    if "--threads-http" in extra_args or rlimit_as is not None or inherited != resource.RLIM_INFINITY:
        return []
    return ["--threads-http", str(HTTP_THREADS)]


def _child_setup(rlimit_as: int | None, parent: int) -> None:  # runs in the child between fork and exec
    die_with_parent(signal.SIGKILL, parent)
    os.setpgid(0, 0)  # its own group: a Ctrl-C in the terminal reaches chorus, and stop() signals the group
    if rlimit_as is not None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (rlimit_as, rlimit_as))


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def stop_process_group(proc: subprocess.Popen[bytes], grace_s: float) -> None:
    """SIGTERM the whole group `proc` leads (SIGCONT too, for a stopped one), SIGKILL what is left after
    `grace_s`, and reap the leader. The group outlives its leader when a wrapper script did not `exec`."""
    pgid = proc.pid  # the child made itself a group leader (setpgid(0, 0)) before exec
    if proc.poll() is not None and not group_members(pgid):
        return
    _signal_group(pgid, signal.SIGTERM)
    _signal_group(pgid, signal.SIGCONT)  # a stopped (SIGSTOP, hung) process holds SIGTERM until continued
    deadline = time.monotonic() + grace_s
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace_s)
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if proc.poll() is None or group_members(pgid):
        _signal_group(pgid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()  # the leader, should it have left the group
    proc.wait(timeout=10)
    deadline = time.monotonic() + 5  # SIGKILLed members vanish once the kernel has torn them down
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.02)


def _private_dir(path: Path, *, tighten: bool) -> None:
    """Create `path` owner-only (0700). `tighten`: a dir of ours only chorus writes into is set to 0700 if
    looser, and one owned by another user is refused (they could read what we put there)."""
    path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
    if not tighten:
        return
    st = path.stat()
    if st.st_uid != os.geteuid():
        raise PermissionError(errno.EPERM, f"owned by uid {st.st_uid}, not by this user", str(path))
    if st.st_mode & 0o777 != PRIVATE_DIR_MODE:
        os.chmod(path, PRIVATE_DIR_MODE)


def _open_private(path: Path, flags: int) -> int:
    """Open (create) a file 0600; a file left by an earlier run is set to 0600 too."""
    fd = os.open(path, flags | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, PRIVATE_FILE_MODE)
    try:
        os.fchmod(fd, PRIVATE_FILE_MODE)
    except OSError:
        os.close(fd)
        raise
    return fd


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def find_server(base_url: str) -> ModelServer | None:
    """The server this process started at `base_url` (a dead one first: a new server may reuse the port)."""
    with _LIVE_LOCK:
        found = [s for s in _LIVE if s.port is not None and s.base_url == base_url.rstrip("/")]
    return min(found, key=lambda s: s.is_alive(), default=None)


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

def _runs(pid: int, binary: Path) -> bool:
    """Whether process `pid` is running the executable `binary` itself (Linux: /proc/<pid>/exe)."""
    try:
        return os.path.samefile(f"/proc/{pid}/exe", binary)
    except OSError:
        return False


class ModelServer:
    """A running llama-server. Create with `ModelServer(spec, binary, logs_dir).start()`."""

    def __init__(self, spec: ServerSpec, binary: Path, logs_dir: Path,
                 options: ServerOptions | None = None) -> None:
        self.spec = spec
        self.binary = Path(binary)
        self.logs_dir = Path(logs_dir)
        self.options = options or ServerOptions()
        self.api_key = secrets.token_urlsafe(24)
        self.runtime_dir = Path(self.options.runtime_dir or self.logs_dir / "runtime")
        self.key_path = self.runtime_dir / f"key-{os.getpid()}-{secrets.token_hex(6)}"
        self.port: int | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.listen_pid: int | None = None   # the process on the port: the real server behind a wrapper script
        self._record_pid: int | None = None  # the pid our `running/` record is filed under
        self.log_path: Path | None = None
        self.started_at: float | None = None
        self.ready_s: float | None = None
        self._stopping = False
        self._oom_kills_at_start: int | None = None
        self._default_http_threads = False  # set when a limit refused HTTP_THREADS (see _start_on_a_free_port)
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
        """The server's argv. The key is in a file: argv is world-readable through `ps` and /proc."""
        s = self.spec
        cmd = [str(self.binary), "-m", str(s.model_path), "-c", str(s.n_ctx * s.slots),
               "-ngl", str(s.n_gpu_layers), "-np", str(s.slots), "--host", self.options.host,
               "--port", str(port), "--no-webui", "--api-key-file", str(self.key_path), "--metrics",
               "--fit", "off", "--cache-ram", "0"]  # no host prompt cache: it grows outside what the fit check admitted
        if s.threads:
            cmd += ["-t", str(s.threads)]
        if s.chat_template:
            cmd += chat_template_args(s.chat_template)
        if self.options.log_verbosity is not None:
            cmd += ["-lv", str(self.options.log_verbosity)]
        if s.rpc:
            cmd += ["--rpc", ",".join(s.rpc)]
        if not CHECKPOINT_FLAGS & set(s.extra_args):  # bounded, counted by launcher/memory/estimate.py
            cmd += ["--ctx-checkpoints", str(CTX_CHECKPOINTS)]
        threads = [] if self._default_http_threads else http_threads_args(s.extra_args, self.options.rlimit_as_bytes)
        return cmd + threads + list(s.extra_args)

    def redacted_command(self) -> list[str]:
        cmd = self.command(self.port or 0)
        if "--api-key" in cmd:  # only from extra_args: ours goes through --api-key-file
            cmd[cmd.index("--api-key") + 1] = "***"
        return cmd

    # -- lifecycle
    def start(self, *, on_spawn: Callable[[], None] | None = None) -> ModelServer:
        """Spawn and wait until /health says ready; raise a typed ServerStartError otherwise. `on_spawn` is
        called once the process runs (the model loading), before the wait.

        Whatever goes wrong (a failed start, a timeout, Ctrl-C while loading), nothing is left behind:
        the process group is stopped and the key file removed.
        """
        if not Path(self.spec.model_path).is_file():  # llama-server would call it an invalid model file
            raise ServerStartError(self.model, f"model file not found: {self.spec.model_path}",
                                   command=self.redacted_command(),
                                   hint="Is the models directory there (a removable disk unplugged?) and the file "
                                        "still in it? Servers already running keep serving.")
        try:
            return self._start_on_a_free_port(on_spawn)
        except BaseException:
            self.stop(grace_s=min(self.options.stop_grace_s, 2.0))
            raise

    def _start_on_a_free_port(self, on_spawn: Callable[[], None] | None = None) -> ModelServer:
        last: ServerError | None = None
        for _ in range(max(1, self.options.port_retries) + 1):  # + 1: the HTTP threads fallback
            try:
                self._spawn(free_port(self.options.host))
                if on_spawn is not None:
                    on_spawn()
                    on_spawn = None
                self._wait_ready()
                return self
            except PortInUse as exc:  # someone took the port between our probe and the bind
                last = exc
                self._reap()
            except ServerCrashed as exc:
                if self._default_http_threads or not THREADS_REFUSED.search(exc.log_tail or ""):
                    raise
                # a limit we could not see (`ulimit -v` or a pids cap in a wrapper script or a container)
                # refused our HTTP threads: llama-server's own count, as before HTTP_THREADS
                log.warning("llama-server for '%s' could not create %d HTTP threads (%s); starting it with its "
                            "default count", self.model, HTTP_THREADS, _last_error_line(exc.log_tail) or exc.detail)
                self._default_http_threads = True
                last = exc
                self._reap()
        assert last is not None
        raise last

    def _prepare_files(self, port: int) -> int:
        """Logs dir (0700), this start's log (0600, returned open) and the key file (0600 in a 0700 dir).

        Any failure here is about the logs dir, not the binary: one ServerFilesUnwritable naming the path.
        """
        log_path = self.logs_dir / f"{_slug(self.spec.model)}-{port}.log"
        step = self.logs_dir
        try:
            _private_dir(self.logs_dir, tighten=False)  # the user's folder: created 0700, never chmod-ed
            _prune_quietly(self.logs_dir, self.spec.model, keep=self.options.log_keep - 1,
                           cap_bytes=self.options.log_cap_bytes, host=self.options.host)
            step = log_path
            fd = _open_private(log_path, os.O_WRONLY | os.O_APPEND)
            step = self.runtime_dir
            try:
                self._write_key_file()
            except BaseException:
                os.close(fd)
                raise
        except OSError as exc:
            raise ServerFilesUnwritable(self.model, str(step), exc.strerror or str(exc),
                                        command=self.redacted_command()) from None
        self.log_path = log_path
        return fd

    def _write_key_file(self) -> None:
        _private_dir(self.runtime_dir, tighten=True)
        _sweep_stale_keys(self.runtime_dir)
        with contextlib.suppress(FileNotFoundError):
            self.key_path.unlink()  # from an earlier try on another port
        fd = _open_private(self.key_path, os.O_WRONLY | os.O_EXCL)
        with os.fdopen(fd, "w") as f:
            f.write(self.api_key + "\n")

    def _remove_key_file(self) -> None:
        with contextlib.suppress(OSError):
            self.key_path.unlink()

    def _spawn(self, port: int) -> None:
        self._sweep_orphans()
        log_fd = self._prepare_files(port)
        self.port = port
        self._stopping = False
        self._oom_kills_at_start = _oom_kill_count()
        shares = self.options.shares_cores
        env = server_env(os.environ, self.options.env, shares_cores=shares is not None and shares(self.spec))
        cmd = self.command(port)
        rlimit = self.options.rlimit_as_bytes
        parent = os.getpid()

        def spawn() -> subprocess.Popen[bytes]:
            return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_fd, stderr=subprocess.STDOUT,
                                    env=env, close_fds=True, preexec_fn=lambda: _child_setup(rlimit, parent))

        self.started_at = time.monotonic()
        try:
            self.process = _SPAWNER.submit(spawn).result()
        except OSError as exc:
            raise ServerStartError(self.model, f"cannot run {self.binary}: {exc.strerror or exc}",
                                   command=self.redacted_command(), log_path=str(self.log_path),
                                   hint="Check the binary exists and is executable, or rebuild it with "
                                        "scripts/build_llama_server.sh.") from None
        finally:
            os.close(log_fd)
        with _LIVE_LOCK:
            _LIVE.add(self)
        self._write_state(self.process.pid)  # recorded while it loads: a kill -9 of chorus now leaves a trace

    def _wait_ready(self) -> None:
        import httpx  # after the spawn, as tenacity: the model loads meanwhile
        from tenacity import Retrying, retry_if_result, stop_after_delay, wait_exponential

        deadline = self.options.startup_timeout_s

        # one client for every probe, without a TLS context (the URL is plain http on loopback): a new client
        # per probe loaded the CA store each time, 40-90 ms of CPU taken from the loading server
        http = httpx.Client(timeout=2.0, verify=False)

        def probe() -> str:
            if self.process is None or self.process.poll() is not None:
                return "dead"
            try:
                r = http.get(f"{self.base_url}/health")
            except httpx.HTTPError:
                return "waiting"
            return "ready" if r.status_code == 200 else "waiting"

        retryer = Retrying(stop=stop_after_delay(deadline), wait=wait_exponential(multiplier=0.01, max=0.05),
                           retry=retry_if_result(lambda state: state == "waiting"),
                           retry_error_callback=lambda _state: "timeout")
        with http:
            state = retryer(probe)
        if state == "ready":
            self.ready_s = time.monotonic() - (self.started_at or time.monotonic())
            self._record_listener()
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

    def explain_lost_connection(self, lost: ServerError, wait_s: float = 2.0) -> ServerError:
        """`lost` ("connection lost") with why the server went away, if it exited within `wait_s`: its exit
        status or signal in the message, the log tail and path on the error. Else `lost` unchanged."""
        if self.process is None:
            return lost
        try:
            self.process.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            return lost  # still running: the connection broke for another reason
        died = self.failure(starting=False)
        if self.stopped_by_us:  # `chorus stop`, the Models page: SIGKILL after the grace time is ours, not OOM
            return ServerStopped(self.model, f"{lost.detail}; chorus stopped the server (chorus stop, or the "
                                 "UI's Models page)", command=died.command, log_tail=died.log_tail,
                                 exit_code=died.exit_code, log_path=died.log_path)
        cause = died.detail
        last = _last_error_line(died.log_tail)
        message = (f"{lost.detail}; the server has exited: {cause} (exit status {died.exit_code})"
                   + (f"; its log ends: {last}" if last else ""))
        hint = " ".join(h for h in (died.hint, f"Server log: {died.log_path}." if died.log_path else None) if h)
        return type(died)(self.model, message, command=died.command, log_tail=died.log_tail,
                          exit_code=died.exit_code, log_path=died.log_path, hint=hint or None)

    def stop(self, grace_s: float | None = None) -> None:
        """SIGTERM the process group, then SIGKILL it after the grace period. Safe to call twice."""
        with self._lock:
            proc = self.process
            if proc is not None and proc.poll() is None:
                self._stopping = True  # not for one already dead: that death was not ours
            if proc is not None:
                stop_process_group(proc, self.options.stop_grace_s if grace_s is None else grace_s)
            with _LIVE_LOCK:
                _LIVE.discard(self)
            self._forget_state()
            self._remove_key_file()

    def _sweep_orphans(self) -> None:
        """Stop the recorded servers whose chorus is gone (killed with -9: a wrapper's child outlived it)."""
        if self.options.state_dir is None:
            return
        try:
            swept = state.sweep_orphans(self.options.state_dir, grace_s=min(self.options.stop_grace_s, 5.0))
        except OSError as exc:
            log.debug("cannot sweep orphaned servers in %s: %s", self.options.state_dir, exc)
            return
        for record, result in swept:
            if result in ("stopped", "killed"):
                log.warning("%s an orphaned llama-server of '%s' (pid %d, port %d) left by chorus pid %d, which is "
                            "gone", result, record.model, record.pid, record.port, record.owner_pid)

    def _record_listener(self) -> None:
        """File the server under the pid listening on its port (behind a non-exec wrapper: the wrapper's child)."""
        if self.process is None or self.port is None:
            return
        leader = self.process.pid
        if _runs(leader, self.binary):  # spawned straight, no wrapper: it listens (a search costs 10 ms per start)
            self.listen_pid = leader
        else:
            self.listen_pid = state.listener(self.port, [leader, *group_members(leader)]) or leader
        if self.listen_pid != self._record_pid:
            self._write_state(self.listen_pid)

    def _write_state(self, pid: int) -> None:
        """Record the server for `chorus ps`, `chorus stop` and the orphan sweep under `pid`, in the group chorus
        made for it; a record that cannot be written costs only that listing."""
        if self.options.state_dir is None or self.process is None or self.port is None:
            return
        s = self.spec
        try:
            _private_dir(self.options.state_dir, tighten=True)
            state.write_record(self.options.state_dir, state.ServerRecord(
                pid=pid, port=self.port, model=s.model, model_path=str(s.model_path),
                n_ctx=s.n_ctx, n_gpu_layers=s.n_gpu_layers, slots=s.slots, owner_pid=os.getpid(),
                started_at=time.time(), log_path=str(self.log_path) if self.log_path else None,
                pgid=self.process.pid, create_time=state.start_time(pid), owner_create_time=state.own_start_time()))
        except OSError as exc:
            log.warning("cannot record the server for `chorus ps` in %s: %s", self.options.state_dir, exc)
            return
        if self._record_pid is not None and self._record_pid != pid:
            state.remove_record(self.options.state_dir, self._record_pid)
        self._record_pid = pid

    def _forget_state(self) -> None:
        if self.options.state_dir is not None and self._record_pid is not None:
            state.remove_record(self.options.state_dir, self._record_pid)
        self._record_pid = None

    def _reap(self) -> None:
        if self.process is not None:
            with contextlib.suppress(Exception):
                stop_process_group(self.process, 1.0)
        with _LIVE_LOCK:
            _LIVE.discard(self)
        self._forget_state()

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
            return int(psutil.Process(self.listen_pid or self.pid).memory_info().rss)
        except psutil.Error:
            return None

    def __repr__(self) -> str:
        state = "alive" if self.is_alive() else "stopped"
        return f"<ModelServer {self.model} pid={self.pid} port={self.port} {state}>"


def _sweep_stale_keys(runtime_dir: Path) -> None:
    """Remove key files of chorus processes that are gone (killed with -9: no cleanup ran; their servers
    died with them through PR_SET_PDEATHSIG, so the keys open nothing, but they should not linger)."""
    for path in runtime_dir.glob("key-*-*"):
        m = re.fullmatch(r"key-(\d+)-[0-9a-f]+", path.name)
        if m and not psutil.pid_exists(int(m.group(1))):
            with contextlib.suppress(OSError):
                path.unlink()


def prune_server_logs(logs_dir: Path, model: str, *, keep: int, cap_bytes: int = LOG_CAP_BYTES,
                      host: str = "127.0.0.1") -> list[Path]:
    """Remove all but the newest `keep` of `model`'s logs (`<model>-<port>.log`); cut the kept ones to their
    last `cap_bytes`. The log of a server still running (its port is bound) is neither removed nor cut, and
    it counts among the kept. Returns the removed paths.

    llama-server writes its log through its stdout, so chorus cannot rotate a live one; pruning at each
    start bounds what piles up (47 files after 25 runs before) to `keep` per model.
    """
    pattern = re.compile(re.escape(_slug(model)) + r"-(\d{1,5})\.log")
    found: list[tuple[float, Path, int]] = []
    for path in Path(logs_dir).iterdir():
        m = pattern.fullmatch(path.name)
        if m and not path.is_symlink() and path.is_file():
            found.append((path.stat().st_mtime, path, int(m.group(1))))
    idle = [(mtime, path) for mtime, path, port in found if not _port_bound(host, port)]
    kept = len(found) - len(idle)  # the running servers' logs come first among the kept
    removed: list[Path] = []
    for _mtime, path in sorted(idle, key=lambda f: f[0], reverse=True):
        if kept < keep:
            kept += 1
            _cap_log(path, cap_bytes)
        else:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _prune_quietly(logs_dir: Path, model: str, *, keep: int, cap_bytes: int, host: str) -> None:
    """Pruning is housekeeping: a log it cannot remove (read-only folder, a race) never stops a start."""
    try:
        removed = prune_server_logs(logs_dir, model, keep=max(0, keep), cap_bytes=cap_bytes, host=host)
    except OSError as exc:
        log.debug("cannot prune the logs of %s in %s: %s", model, logs_dir, exc)
        return
    if removed:
        log.debug("removed %d old log(s) of %s", len(removed), model)


def _port_bound(host: str, port: int) -> bool:
    """Whether something listens on `port` (a running server: its log is still being written)."""
    if not 0 < port < 65536:
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def _cap_log(path: Path, cap_bytes: int) -> None:
    """Keep a log's last `cap_bytes` (from a line start), marked as cut, written 0600 in place of the old."""
    st = path.stat()
    size = st.st_size
    if size <= cap_bytes:
        return
    with open(path, "rb") as f:
        f.seek(size - cap_bytes)
        tail = f.read()
    tail = tail[tail.find(b"\n") + 1:] if b"\n" in tail else tail
    tmp = path.with_name(path.name + ".cut")
    fd = _open_private(tmp, os.O_WRONLY | os.O_TRUNC)
    with os.fdopen(fd, "wb") as f:
        f.write(f"[chorus: the first {size - len(tail)} bytes of this log were cut]\n".encode())
        f.write(tail)
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))  # keeps its place in the newest-first order
    os.replace(tmp, path)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:60] or "model"
