"""A TCP relay that holds every chunk a fixed time each way: latency for tests/netns.py without netem.

    python -m tests.netns_relay --listen 127.0.0.1:0 --to 10.213.1.2:50052 --delay-ms 0.25
    python -m tests.netns_relay --mode echo --listen 10.213.1.2:0            # an echo server, for the checks

Run it inside a namespace (`ip netns exec ...`, or `NetLab.relay`). It prints `ready PORT` once listening.
A chunk read on one side is written to the other `delay` after it was read; order is kept, a bounded queue
per direction passes back-pressure on (a shaped link downstream slows the sender, as a real one would).
Python's sleep adds tens of microseconds, so measure the round trip through it rather than trusting
`--delay-ms` below ~0.1 ms. Bounded: it exits after `--max-seconds` and serves at most `--max-connections`.
"""

from __future__ import annotations

import argparse
import contextlib
import queue
import socket
import sys
import threading
import time

CHUNK = 64 * 1024
QUEUE_CHUNKS = 64  # 4 MiB in flight per direction at most


def _nodelay(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _close(*socks: socket.socket) -> None:
    for s in socks:
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            s.close()


def pump(src: socket.socket, dst: socket.socket, delay_s: float) -> None:
    """src -> dst, each chunk held `delay_s`; EOF passed on as a half-close, an error closes both."""
    if delay_s <= 0:
        try:
            while data := src.recv(CHUNK):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            _close(src, dst)
        return
    held: queue.Queue[tuple[float, bytes] | None] = queue.Queue(QUEUE_CHUNKS)

    def writer() -> None:
        try:
            while (item := held.get()) is not None:
                due, data = item
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            _close(src, dst)

    out = threading.Thread(target=writer, daemon=True)
    out.start()
    try:
        while data := src.recv(CHUNK):
            held.put((time.monotonic() + delay_s, data))
    except OSError:
        pass
    held.put(None)
    out.join()


def serve(listen: str, to: str | None, delay_s: float, *, max_seconds: float, max_connections: int) -> int:
    host, _, port = listen.rpartition(":")
    server = socket.create_server((host, int(port)), backlog=64)
    server.settimeout(0.5)
    print(f"ready {server.getsockname()[1]}", flush=True)
    deadline = time.monotonic() + max_seconds
    served = 0
    while time.monotonic() < deadline and served < max_connections:
        try:
            client, _ = server.accept()
        except TimeoutError:
            continue
        served += 1
        _nodelay(client)
        if to is None:  # echo: the client's bytes come back to it, delayed
            threading.Thread(target=pump, args=(client, client, delay_s), daemon=True).start()
            continue
        to_host, _, to_port = to.rpartition(":")
        try:
            upstream = socket.create_connection((to_host, int(to_port)), timeout=10)
        except OSError:
            _close(client)
            continue
        upstream.settimeout(None)
        _nodelay(upstream)
        threading.Thread(target=pump, args=(client, upstream, delay_s), daemon=True).start()
        threading.Thread(target=pump, args=(upstream, client, delay_s), daemon=True).start()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=["relay", "echo"], default="relay")
    p.add_argument("--listen", required=True, help="host:port to listen on (port 0: any)")
    p.add_argument("--to", help="host:port to relay to (relay mode)")
    p.add_argument("--delay-ms", type=float, default=0.0, help="held this long each way")
    p.add_argument("--max-seconds", type=float, default=3600.0)
    p.add_argument("--max-connections", type=int, default=1000)
    args = p.parse_args(argv)
    if args.mode == "relay" and not args.to:
        p.error("--to is needed in relay mode")
    return serve(args.listen, args.to if args.mode == "relay" else None, args.delay_ms / 1000,
                 max_seconds=args.max_seconds, max_connections=args.max_connections)


if __name__ == "__main__":
    sys.exit(main())
