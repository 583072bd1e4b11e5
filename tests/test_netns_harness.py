"""The network harness itself (tests/netns.py): isolated namespaces, a shaped link, a delaying relay, a
link cut and restored, and nothing left behind. Root only; skipped with the reason elsewhere."""

from __future__ import annotations

import socket
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

from tests import netns
from tests.netns import NetLab


@pytest.fixture
def lab() -> Iterator[NetLab]:
    netns.require()
    with NetLab(["r1"]) as built:
        yield built


def _echo(lab: NetLab, delay_ms: float = 0.0) -> int:
    _, port = lab.relay("r1", f"{lab.links['r1'].far_ip}:0", "", delay_ms, mode="echo")
    return port


def _round_trips(sock: socket.socket, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        sock.sendall(b"x")
        assert sock.recv(1) == b"x"
        times.append(time.perf_counter() - t0)
    return times


def _throughput_mbit(sock: socket.socket, nbytes: int) -> float:
    """Bytes sent and echoed back at once; the echo of the last byte ends the clock."""
    payload = b"\0" * nbytes
    sender = threading.Thread(target=sock.sendall, args=(payload,))
    t0 = time.perf_counter()
    sender.start()
    got = 0
    while got < nbytes:
        chunk = sock.recv(1 << 20)
        assert chunk, "echo closed early"
        got += len(chunk)
    elapsed = time.perf_counter() - t0
    sender.join(timeout=30)
    return nbytes * 8 / elapsed / 1e6


def test_a_namespace_reaches_its_neighbour_over_the_link_and_has_no_route_out(lab: NetLab) -> None:
    port = _echo(lab)
    link = lab.links["r1"]
    with lab.inside("hub"), socket.create_connection((link.far_ip, port), timeout=5) as sock:
        assert _round_trips(sock, 3)
    for ns in ("hub", "r1"):
        routes = lab.routes(ns)
        assert routes and all(r["dst"] != "default" for r in routes), routes
        assert {r["dst"] for r in routes} == {f"10.213.{link.index}.0/30"}
    rx, tx = lab.counters("r1")
    assert rx > 0 and tx > 0  # the bytes went over the veth, not a loopback


def test_tbf_caps_the_link_at_its_rate(lab: NetLab) -> None:
    port = _echo(lab)
    link = lab.links["r1"]
    with lab.inside("hub"):
        with socket.create_connection((link.far_ip, port), timeout=30) as sock:
            free = _throughput_mbit(sock, 4 << 20)
        lab.shape("r1", 20)
        with socket.create_connection((link.far_ip, port), timeout=30) as sock:
            shaped = _throughput_mbit(sock, 2 << 20)
    assert shaped <= 20 * 1.25, f"{shaped:.1f} Mbit/s through a 20 Mbit/s link"
    assert free > 2 * shaped, f"unshaped {free:.1f} Mbit/s vs shaped {shaped:.1f} Mbit/s"


def test_the_relay_adds_its_delay_each_way(lab: NetLab) -> None:
    link = lab.links["r1"]
    port = _echo(lab)
    _, relay_port = lab.relay("hub", "127.0.0.1:0", f"{link.far_ip}:{port}", 20.0)
    with lab.inside("hub"):
        with socket.create_connection((link.far_ip, port), timeout=5) as sock:
            direct = statistics.median(_round_trips(sock, 7))
        with socket.create_connection(("127.0.0.1", relay_port), timeout=5) as sock:
            delayed = statistics.median(_round_trips(sock, 7))
    assert 0.040 <= delayed - direct < 0.040 + 0.050, (direct, delayed)  # 20 ms out and 20 ms back


def test_a_cut_link_is_a_black_hole_until_restored(lab: NetLab) -> None:
    link = lab.links["r1"]
    port = _echo(lab)
    with lab.inside("hub"):
        sock = socket.create_connection((link.far_ip, port), timeout=5)
        lab.cut("r1")
        sock.settimeout(0.3)  # a black hole never answers: any wait shows it
        sock.sendall(b"x")
        with pytest.raises(TimeoutError):  # no reset, no error: the bytes just vanish
            sock.recv(1)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):  # a new connection hangs too, as to a machine that is gone
            socket.create_connection((link.far_ip, port), timeout=0.3)
        assert time.monotonic() - t0 >= 0.25
        lab.restore("r1")
        with socket.create_connection((link.far_ip, port), timeout=5) as fresh:
            assert _round_trips(fresh, 1)
        sock.close()


def test_close_removes_every_namespace_and_process() -> None:
    netns.require()
    lab = NetLab(["w1", "w2"])
    with lab:
        names = list(lab.names.values())
        assert set(names) <= set(netns.ours())
        proc, _ = lab.relay("w1", f"{lab.links['w1'].far_ip}:0", "", 0, mode="echo")
        with lab.inside("w2"):  # a child started from code run inside: swept by namespace, not by handle
            stray = subprocess.Popen(["sleep", "60"])
    assert not set(names) & set(netns.ours())
    assert proc.poll() is not None
    assert stray.wait(timeout=5) is not None
    lab.close()  # idempotent


def test_unavailable_says_why_without_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    reason = netns.unavailable()
    assert reason is not None and "root" in reason
