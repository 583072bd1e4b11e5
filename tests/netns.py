"""A small network of our own for tests and benches: namespaces joined by veth pairs, shaped, delayed, cut.

Why: loopback hides the network. An RPC worker or a replica on another machine sits behind a link with a
bandwidth, a latency, and a cable that can be pulled. This builds such links on one machine out of Linux
network namespaces:

    hub  --veth to-r1 10.213.1.1/30  <->  10.213.1.2/30 to-hub--  r1
         --veth to-r2 10.213.2.1/30  <->  10.213.2.2/30 to-hub--  r2     (one /30 per far namespace)

Every address exists only inside the namespaces made here and no namespace has a default route, so no
packet can leave the machine. Bandwidth is shaped with `tc ... tbf` on both ends of a link; latency is
added by `tests/netns_relay.py` (netem is not always built), a TCP relay that holds each chunk a fixed
time; `cut`/`restore` set the far end down and up, so the hub sees a black hole (no RST, no ICMP), as when
a machine or its cable goes away.

Needs Linux, root and iproute2: `unavailable()` says why not (for pytest.skip). Every process started here
and every namespace is removed by `close()` (also at exit), and namespaces a dead harness left behind
(their name holds its pid) are swept on the next start.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import itertools
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PREFIX = "chorusnet"
CLONE_NEWNET = 0x40000000
_STALE = re.compile(rf"^{PREFIX}-(\d+)-")
_counter = itertools.count(1)


def unavailable() -> str | None:
    """Why namespaces cannot be made here (None when they can): the reason a test skips with."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "needs root to create network namespaces (ip netns add); CI runs the suite as root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    if not hasattr(ctypes.CDLL(None), "setns"):
        return "libc has no setns()"
    probe = f"{PREFIX}-{os.getpid()}-probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=10)
    if made.returncode != 0:
        return f"`ip netns add` is not allowed here: {made.stderr.strip() or made.returncode}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=10)
    return None


def require() -> None:
    """pytest.skip with the reason when namespaces cannot be made."""
    import pytest

    reason = unavailable()
    if reason:
        pytest.skip(reason)


def _ip(*args: str, timeout: float = 10) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns(CLONE_NEWNET) failed")


def _enter(target: int) -> int:
    """Move the calling thread into network namespace `target`; a descriptor of the one it was in."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        _setns(target)
    except BaseException:
        os.close(own)
        raise
    return own


def _leave(own: int) -> None:
    """Move the calling thread back into `own` (from `_enter`)."""
    try:
        _setns(own)
    finally:
        os.close(own)


@dataclass(frozen=True)
class Link:
    """The veth pair between the hub and one far namespace."""

    far: str
    index: int

    @property
    def hub_if(self) -> str:
        return f"to-{self.far}"[:15]

    @property
    def far_if(self) -> str:
        return "to-hub"

    @property
    def hub_ip(self) -> str:
        return f"10.213.{self.index}.1"

    @property
    def far_ip(self) -> str:
        return f"10.213.{self.index}.2"


class NetLab:
    """Namespaces `hub` and each of `far`, the hub joined to each by its own link.

    Use as a context manager; `close()` is idempotent and also registered with atexit.
    """

    def __init__(self, far: Sequence[str], hub: str = "hub") -> None:
        if not far or len(set(far)) != len(far) or hub in far:
            raise ValueError("far namespaces: one or more distinct names, none the hub's")
        self.tag = f"{os.getpid()}-{next(_counter)}"
        self.hub = hub
        self.names = {n: f"{PREFIX}-{self.tag}-{n}" for n in (hub, *far)}
        self.links = {f: Link(f, i + 1) for i, f in enumerate(far)}
        self.processes: list[subprocess.Popen[bytes]] = []
        self._made: list[str] = []
        self._closed = False

    def __enter__(self) -> NetLab:
        try:
            self.up()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ building and removing

    def up(self) -> None:
        sweep_stale()
        atexit.register(self.close)
        for name in self.names.values():
            _ip("netns", "add", name)
            self._made.append(name)
            _ip("-n", name, "link", "set", "lo", "up")
        hub = self.names[self.hub]
        for link in self.links.values():
            far = self.names[link.far]
            # made inside the namespaces at once: neither end ever exists in the machine's own namespace
            _ip("link", "add", link.hub_if, "netns", hub, "type", "veth", "peer", "name", link.far_if, "netns", far)
            _ip("-n", hub, "addr", "add", f"{link.hub_ip}/30", "dev", link.hub_if)
            _ip("-n", far, "addr", "add", f"{link.far_ip}/30", "dev", link.far_if)
            _ip("-n", hub, "link", "set", link.hub_if, "up")
            _ip("-n", far, "link", "set", link.far_if, "up")
        for link in self.links.values():
            self.wait_carrier(link.far)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for proc in self.processes:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        for proc in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        for name in self._made:  # anything else still in them (a server started by code run `inside`)
            _kill_members(name)
        for name in self._made:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)
        self._made.clear()
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)

    # ------------------------------------------------------------ shaping, cutting, counting

    def shape(self, far: str, rate_mbit: float) -> None:
        """Cap the link at `rate_mbit` each way (tbf on both ends); 0 removes the cap."""
        link = self.links[far]
        for ns, dev in ((self.hub, link.hub_if), (far, link.far_if)):
            name = self.names[ns]
            if rate_mbit <= 0:
                subprocess.run(["tc", "-n", name, "qdisc", "del", "dev", dev, "root"], capture_output=True, timeout=10)
                continue
            # at least one 250 Hz tick of bytes, or tbf cannot reach the rate; never below 64 KiB (GSO packets)
            burst = max(64 * 1024, int(rate_mbit * 1e6 / 8 / 250))
            done = subprocess.run(["tc", "-n", name, "qdisc", "replace", "dev", dev, "root", "tbf",
                                   "rate", f"{rate_mbit}mbit", "burst", str(burst), "latency", "200ms"],
                                  capture_output=True, text=True, timeout=10)
            if done.returncode != 0:
                raise RuntimeError(f"tc tbf on {dev} in {ns}: {done.stderr.strip()}")

    def cut(self, far: str) -> None:
        """Set the far end of the link down: the hub's packets vanish (no RST, no ICMP), as a pulled cable."""
        link = self.links[far]
        _ip("-n", self.names[far], "link", "set", link.far_if, "down")

    def restore(self, far: str) -> None:
        link = self.links[far]
        _ip("-n", self.names[far], "link", "set", link.far_if, "up")
        self.wait_carrier(far)

    def wait_carrier(self, far: str, timeout_s: float = 10.0) -> None:
        """Until both ends report the link up (veth takes a moment after `link set up`)."""
        link = self.links[far]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            states = [self._link_json(ns, dev).get("operstate")
                      for ns, dev in ((self.hub, link.hub_if), (far, link.far_if))]
            if states == ["UP", "UP"]:
                return
            time.sleep(0.05)
        raise TimeoutError(f"link hub-{far} not up within {timeout_s:.0f}s")

    def counters(self, far: str) -> tuple[int, int]:
        """Bytes (received, sent) on the hub's end of the link to `far`, from the kernel's counters."""
        stats = self._link_json(self.hub, self.links[far].hub_if, stats=True)["stats64"]
        return int(stats["rx"]["bytes"]), int(stats["tx"]["bytes"])

    def routes(self, ns: str) -> list[dict[str, object]]:
        return list(json.loads(_ip("-n", self.names[ns], "-j", "route", "show") or "[]"))

    def _link_json(self, ns: str, dev: str, *, stats: bool = False) -> dict[str, object]:
        args = ["-n", self.names[ns], "-j", *(["-s"] if stats else []), "link", "show", "dev", dev]
        return dict(json.loads(_ip(*args))[0])

    # ------------------------------------------------------------ running things in a namespace

    def argv(self, ns: str, cmd: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.names[ns], *cmd]

    def popen(self, ns: str, cmd: Sequence[str], *, log: Path | None = None,
              stdout: int | None = None, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start `cmd` in namespace `ns`, in its own process group, killed by `close()` (or with us)."""
        from launcher.process.server import own_group_dying_with_parent

        parent = os.getpid()
        out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - handed to the child
        try:
            proc = subprocess.Popen(self.argv(ns, cmd), stdin=subprocess.DEVNULL,
                                    stdout=stdout if stdout is not None else out,
                                    stderr=out if log else subprocess.DEVNULL, cwd=REPO, env=env,
                                    preexec_fn=lambda: own_group_dying_with_parent(parent=parent))
        finally:
            if not isinstance(out, int):
                out.close()
        self.processes.append(proc)
        return proc

    def relay(self, ns: str, listen: str, to: str, delay_ms: float, *, mode: str = "relay",
              log: Path | None = None) -> tuple[subprocess.Popen[bytes], int]:
        """Start tests/netns_relay.py in `ns` (a delaying relay to `to`, or an echo server); (process, port)."""
        cmd = [sys.executable, "-m", "tests.netns_relay", "--mode", mode, "--listen", listen,
               "--delay-ms", str(delay_ms)] + (["--to", to] if mode == "relay" else [])
        proc = self.popen(ns, cmd, log=log, stdout=subprocess.PIPE)
        line = _read_line(proc, timeout_s=20.0)
        if not line.startswith("ready "):
            raise RuntimeError(f"relay in {ns} did not start: {line!r}")
        return proc, int(line.split()[1])

    @contextlib.contextmanager
    def inside(self, ns: str) -> Iterator[None]:
        """Run this thread in namespace `ns` for the block: its sockets, threads and child processes live
        there, and so do the llama-servers chorus starts meanwhile. Start long-lived children from a
        long-lived thread (they die with the thread that forked them, PR_SET_PDEATHSIG).

        chorus forks every llama-server from one long-lived spawner thread, which is moved in for the block
        too, and back after. Left alone, a server started in the block ran wherever that thread had been
        made: outside when an earlier test had started a server (the split server of
        test_netns_worker_lost could not reach its worker), and inside a namespace that is then deleted
        when the thread was first made in the block (every later server of the process unreachable)."""
        from launcher.process import server as server_process

        spawner = server_process._SPAWNER
        spawner.submit(lambda: None).result()  # its thread made now, out here, if it was not yet
        target = os.open(f"/run/netns/{self.names[ns]}", os.O_RDONLY)
        try:
            own = _enter(target)
            try:
                spawner_own = spawner.submit(_enter, target).result()
                try:
                    yield
                finally:
                    spawner.submit(_leave, spawner_own).result()
            finally:
                _leave(own)
        finally:
            os.close(target)


def _read_line(proc: subprocess.Popen[bytes], timeout_s: float) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    data = b""
    while b"\n" not in data and time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        chunk = os.read(proc.stdout.fileno(), 256)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()


def _kill_members(name: str) -> None:
    """SIGKILL every process still in namespace `name` (ours by construction), bounded wait."""
    for _ in range(20):
        found = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, timeout=10)
        pids = [int(p) for p in found.stdout.split() if p.isdigit() and int(p) != os.getpid()]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def sweep_stale() -> list[str]:
    """Delete namespaces this harness made in a process that is gone (killed before its cleanup ran)."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    removed = []
    for line in listed.splitlines():
        name = line.split()[0] if line.split() else ""
        m = _STALE.match(name)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            _kill_members(name)
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)
            removed.append(name)
    return removed


def ours() -> list[str]:
    """The namespaces of this harness that exist now (any process)."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    return [line.split()[0] for line in listed.splitlines() if line.startswith(f"{PREFIX}-")]
