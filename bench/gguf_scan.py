"""Benchmark: header scan time of launcher.memory.gguf.read_gguf against gguf.GGUFReader on one GGUF file.

    python bench/gguf_scan.py [PATH] [--runs 20] [--reader-runs 1] [--no-reader]

Ours is timed with its in-process cache cleared before every run (so each run really parses) and the OS
page cache warm (one untimed read first, which also pays the one-off regex compile). The last line of
output is one JSON object, for scripts and CI.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "models" / "gemma-3-270m-q4_k_m.gguf"
TARGET_OURS_MS_MAX = 20.0
TARGET_SPEEDUP_MIN = 200.0


def _time_ms(fn: Callable[[], object], runs: int, before: Callable[[], None] = lambda: None) -> list[float]:
    """Wall time of each run in milliseconds; ``before`` runs untimed ahead of each one."""
    times = []
    for _ in range(runs):
        before()
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return times


def _bench_ours(path: Path, runs: int) -> dict[str, float]:
    sys.path.insert(0, str(REPO))
    from launcher.memory.gguf import clear_cache, read_gguf

    clear_cache()
    first = _time_ms(lambda: read_gguf(path), 1)[0]  # warms the page cache, compiles the regex
    times = _time_ms(lambda: read_gguf(path), runs, before=clear_cache)
    return {"ours_first_ms": first, "ours_ms": statistics.median(times), "ours_min_ms": min(times)}


def _bench_reader(path: Path, runs: int) -> float | None:
    try:
        from gguf import GGUFReader
    except ImportError:
        print("gguf-py not installed: skipping GGUFReader (pip install gguf)")
        return None
    return statistics.median(_time_ms(lambda: GGUFReader(path), runs))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--runs", type=int, default=20, help="timed runs of ours (median reported)")
    parser.add_argument("--reader-runs", type=int, default=1, help="timed runs of gguf.GGUFReader")
    parser.add_argument("--no-reader", action="store_true", help="skip gguf.GGUFReader (it takes seconds)")
    args = parser.parse_args(argv)
    if not args.path.is_file():
        print(f"no such file: {args.path} (run scripts/setup.sh for the demo model)", file=sys.stderr)
        return 2

    ours = _bench_ours(args.path, args.runs)
    print(f"{args.path.name}: {args.path.stat().st_size / 2**20:.1f} MiB")
    print(f"  launcher.memory.gguf.read_gguf  median {ours['ours_ms']:8.2f} ms  min {ours['ours_min_ms']:.2f} ms"
          f"  ({args.runs} runs, LRU cleared; first call {ours['ours_first_ms']:.2f} ms)")
    reader_ms = None if args.no_reader else _bench_reader(args.path, args.reader_runs)
    speedup = reader_ms / ours["ours_ms"] if reader_ms else None
    if reader_ms is not None:
        print(f"  gguf.GGUFReader          median {reader_ms:8.2f} ms  ({args.reader_runs} run(s))")
        print(f"  speedup                  {speedup:8.0f}x")

    result = {
        "file": str(args.path),
        "ours_ms": round(ours["ours_ms"], 3),
        "ours_min_ms": round(ours["ours_min_ms"], 3),
        "ours_first_ms": round(ours["ours_first_ms"], 3),
        "gguf_reader_ms": round(reader_ms, 1) if reader_ms is not None else None,
        "speedup": round(speedup, 1) if speedup is not None else None,
        "target_ours_ms_max": TARGET_OURS_MS_MAX,
        "target_speedup_min": TARGET_SPEEDUP_MIN,
        "ours_ok": ours["ours_ms"] <= TARGET_OURS_MS_MAX,
        "speedup_ok": speedup >= TARGET_SPEEDUP_MIN if speedup is not None else None,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
