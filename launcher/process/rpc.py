"""llama.cpp RPC workers: ask one for its free memory over the wire, and start one (`chorus worker`).

A worker is upstream's `rpc-server` (built beside llama-server by scripts/build_llama_server.sh); a
llama-server started with `--rpc host:port,...` puts part of a model's layers on each worker. chorus speaks
just enough of the RPC protocol (ggml/src/ggml-rpc/ggml-rpc.cpp, protocol 7.x) to ask a worker what it has:

    request : | cmd (1 byte) | size (uint64 LE) | payload |      response: | size (uint64 LE) | payload |
    HELLO (14)             payload conn_caps[24] (zeros)      -> major, minor, patch, pad, conn_caps[24]
    DEVICE_COUNT (15)      no payload                         -> uint32 device_count
    GET_DEVICE_MEMORY (11) uint32 device                      -> uint64 free, uint64 total

A server answers nothing before HELLO, so the handshake always comes first. The protocol has no
authentication and lets any client write memory on the worker: a worker must only listen on a trusted
network (loopback, a private LAN, a VPN).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import socket
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from launcher.errors import ChorusError, ServerError, ServerStartError, connection_reason
from launcher.process.limits import RPC_DEFAULT_PORT
from launcher.units import MiB, fmt_bytes

PROTO_MAJOR = 7
CMD_GET_DEVICE_MEMORY = 11
CMD_HELLO = 14
CMD_DEVICE_COUNT = 15
CONN_CAPS_SIZE = 24
DEFAULT_PORT = RPC_DEFAULT_PORT  # defined in limits.py, which argument parsers import without this module
AS_BASELINE_BYTES = 256 * MiB  # the worker's own mappings (binary, libraries, stacks) above its --mem
_ENDPOINT = re.compile(r"^(?P<host>[A-Za-z0-9.-]+|\[[0-9A-Fa-f:]+\]):(?P<port>\d{1,5})$")


class RpcError(ChorusError):
    """A worker could not be asked (unreachable, not an rpc-server, another protocol version)."""

    def __init__(self, worker: str, message: str, *, hint: str | None = None, detail: str | None = None) -> None:
        super().__init__(f"RPC worker {worker}: {message}",
                         hint=hint or f"Is `chorus worker` running on {worker}, and is the port reachable?")
        self.worker = worker
        self.detail = message if detail is None else detail  # callers that add "no answer" get the reason only


class RpcWorkerShort(ChorusError):
    """A worker has less free memory than its share of a model's layers. need/have: worker -> bytes."""

    def __init__(self, model: str, need: dict[str, int], have: dict[str, int]) -> None:
        short = [w for w in need if need[w] > have.get(w, 0)]
        parts = ", ".join(f"worker {w}: needs {fmt_bytes(need[w])}, {fmt_bytes(have.get(w, 0))} free" for w in short)
        super().__init__(f"model '{model}' does not fit on its RPC workers ({parts})",
                         hint="Give the worker more memory (chorus worker --mem), add a worker to the model's "
                              "`rpc:` list, or lower n_ctx.")
        self.model = model
        self.need = dict(need)
        self.have = dict(have)


class RpcWorkerLost(ServerError):
    """A model's server failed because one of its RPC workers went away."""

    kind = "RPC worker lost"
    hint = "Restart `chorus worker` on that machine (or drop it from the model's `rpc:` list); other models go on."


class RpcLoadFailed(ServerStartError):
    """A server with RPC workers died while loading: llama.cpp aborts when a worker refuses a buffer."""

    kind = "failed to load onto its RPC workers"
    hint = ("A worker may be short of memory for its share (its `chorus worker --mem` cap, or what the machine "
            "has free): raise it, add a worker, or lower n_ctx. The server log has llama.cpp's own message.")


@dataclass(frozen=True)
class WorkerMemory:
    worker: str
    version: str
    free_bytes: int
    total_bytes: int


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """'host:port' -> (host, port); ValueError for anything else (llama-server splits on ':' the same way).

    The host must be an IPv4 address, a bracketed IPv6 address or a host name by RFC 1123: `999.1.1.1`
    passed the pattern before and only failed, obscurely, when llama-server tried to connect.
    """
    m = _ENDPOINT.match(endpoint.strip())
    if not m or not 0 < int(m.group("port")) < 65536:
        raise ValueError(f"'{endpoint}' is not host:port (e.g. 192.168.1.20:50052)")
    host = m.group("host")
    problem = _host_problem(host)
    if problem is not None:
        raise ValueError(f"'{endpoint}': {problem} (e.g. 192.168.1.20:50052 or gpu-box.lan:50052)")
    return host.strip("[]"), int(m.group("port"))


_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


def _host_problem(host: str) -> str | None:
    """Why `host` is not an address or a host name, or None when it is one."""
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return f"{host} is not an IPv6 address"
        return None
    if re.fullmatch(r"[0-9.]+", host):  # all digits and dots: an IPv4 address or nothing
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return f"{host} is not an IPv4 address (four numbers 0-255 separated by dots)"
        return None
    labels = host.rstrip(".").split(".")
    if len(host) > 253 or not all(_LABEL.match(label) for label in labels):
        return (f"{host!r} is not a host name (letters, digits and '-' in dot-separated parts of at most 63 "
                "characters, none starting or ending with '-')")
    if labels[-1].isdigit():
        return f"{host!r} is neither an IPv4 address nor a host name (a name's last part is not all digits)"
    return None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("connection closed by the worker")
        data += chunk
    return bytes(data)


def _call(sock: socket.socket, cmd: int, payload: bytes, expect: int) -> bytes:
    sock.sendall(bytes([cmd]) + struct.pack("<Q", len(payload)) + payload)
    size = struct.unpack("<Q", _recv_exact(sock, 8))[0]
    if size != expect:
        raise ConnectionError(f"unexpected reply size {size} (wanted {expect}) to command {cmd}")
    return _recv_exact(sock, size)


def query_memory(endpoint: str, *, timeout_s: float = 3.0) -> WorkerMemory:
    """Free and total memory of the worker's devices (summed), over the RPC protocol. RpcError on failure."""
    try:
        host, port = parse_endpoint(endpoint)
    except ValueError as exc:
        raise RpcError(endpoint, str(exc)) from None
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            hello = _call(sock, CMD_HELLO, bytes(CONN_CAPS_SIZE), 4 + CONN_CAPS_SIZE)
            major, minor, patch = hello[0], hello[1], hello[2]
            if major != PROTO_MAJOR:
                raise RpcError(endpoint, f"speaks RPC protocol {major}.{minor}.{patch}, chorus knows {PROTO_MAJOR}.x",
                               hint="Run the rpc-server of the same llama.cpp build as llama-server.")
            count = struct.unpack("<I", _call(sock, CMD_DEVICE_COUNT, b"", 4))[0]
            free = total = 0
            for device in range(count):
                f, t = struct.unpack("<QQ", _call(sock, CMD_GET_DEVICE_MEMORY, struct.pack("<I", device), 16))
                free, total = free + f, total + t
    except RpcError:
        raise
    except (OSError, ConnectionError, struct.error) as exc:
        reason = connection_reason(exc)
        raise RpcError(endpoint, f"no answer: {reason}", detail=reason) from None
    return WorkerMemory(endpoint, f"{major}.{minor}.{patch}", free, total)


def probe(endpoint: str, timeout_s: float = 1.0) -> bool:
    """Whether the worker answers the handshake now."""
    try:
        query_memory(endpoint, timeout_s=timeout_s)
    except RpcError:
        return False
    return True


# ---------------------------------------------------------------- running a worker


def worker_command(binary: Path, host: str, port: int, *, threads: int | None = None,
                   cache: bool = False) -> list[str]:
    cmd = [str(binary), "-H", host, "-p", str(port)]
    if threads:
        cmd += ["-t", str(threads)]
    if cache:
        cmd.append("-c")
    return cmd


def _limit_as(mem_bytes: int | None) -> None:  # in the child, between fork and exec
    os.setpgid(0, 0)
    if mem_bytes is not None:
        import resource

        cap = mem_bytes + AS_BASELINE_BYTES
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))


@dataclass
class WorkerProcess:
    """An rpc-server this process started (tests, the benchmark, `chorus worker`)."""

    endpoint: str
    process: subprocess.Popen[bytes]
    log_path: Path | None

    def stop(self, grace_s: float = 3.0) -> None:
        from launcher.process.server import stop_process_group

        stop_process_group(self.process, grace_s)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, 9)
        self.process.wait(timeout=10)


def start_worker(binary: Path, host: str = "127.0.0.1", port: int = DEFAULT_PORT, *, mem_mb: int | None = None,
                 threads: int | None = None, log_path: Path | None = None, ready_timeout_s: float = 15.0,
                 dies_with_parent: bool = True) -> WorkerProcess:
    """Start an rpc-server and wait until it answers the handshake.

    rpc-server has no memory flag: `mem_mb` caps the worker's address space (RLIMIT_AS, plus a baseline for
    its own mappings), so an allocation past it fails on the worker instead of swapping the machine. The
    memory it *reports* stays the machine's free memory.
    """
    from launcher.process.server import die_with_parent

    mem = mem_mb * MiB if mem_mb else None

    def setup() -> None:
        if dies_with_parent:
            die_with_parent()
        _limit_as(mem)

    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 - handed to the child
    env = {**os.environ, "MALLOC_ARENA_MAX": "1"}  # per-thread malloc arenas reserve address space
    try:
        proc = subprocess.Popen(worker_command(binary, host, port, threads=threads), stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=setup, env=env)
    finally:
        if not isinstance(out, int):  # a log file, not subprocess.DEVNULL
            out.close()
    worker = WorkerProcess(f"{host}:{port}", proc, log_path)
    deadline = time.monotonic() + ready_timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:] if log_path and log_path.exists() else ""
            raise RpcError(worker.endpoint, f"rpc-server exited with status {proc.returncode}: {tail.strip()}",
                           hint="Is the port free? `chorus worker --port` picks another.")
        if probe(worker.endpoint, timeout_s=0.5):
            return worker
        time.sleep(0.1)
    worker.stop()
    raise RpcError(worker.endpoint, f"rpc-server did not answer within {ready_timeout_s:.0f}s")
