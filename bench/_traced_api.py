"""``agentworks serve`` for ``bench.scale``'s memory rounds: the same API process, plus a thread
that starts ``tracemalloc`` and reports what the Python heap holds when the bench asks.

    python -m bench._traced_api serve --port N      (AW_BENCH_TRACEMALLOC_DIR=<directory>)

The bench asks by creating files in the directory: ``start`` starts tracing (so the rounds
before it run untraced, at full speed), ``snap-<name>`` answers ``snap-<name>.json``: the traced
heap now, tracemalloc's own memory, and the heap by allocation site (the innermost six frames of
each allocation's traceback). Sites are kept as plain statistics, not snapshots, so what the process
holds for the bench stays small. ``trim`` answers ``trim.json``: RSS before and after glibc's
``malloc_trim``. Nothing here is imported by the product.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

FRAMES = 6
SITES = int(os.environ.get("AW_BENCH_TRACEMALLOC_SITES", "400"))
_IGNORED = (tracemalloc.__file__, "<frozen importlib._bootstrap>", __file__)


def _heap() -> dict[str, dict[str, dict[str, Any]]]:
    snapshot = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(False, name) for name in _IGNORED]
    )
    sites: dict[str, dict[str, Any]] = {}
    for stat in snapshot.statistics("traceback")[:SITES]:
        frames = [f"{f.filename}:{f.lineno}" for f in reversed(stat.traceback)]
        sites[" <- ".join(frames)] = {"bytes": stat.size, "blocks": stat.count}
    files = {
        str(stat.traceback[0].filename): {"bytes": stat.size, "blocks": stat.count}
        for stat in snapshot.statistics("filename")
    }
    return {"sites": sites, "files": files}


def _answer(directory: Path, name: str) -> None:
    gc.collect()
    current, peak = tracemalloc.get_traced_memory()
    started = time.perf_counter()
    doc = {
        "name": name,
        "traced_current_bytes": current,
        "traced_peak_bytes": peak,
        "tracemalloc_own_bytes": tracemalloc.get_tracemalloc_memory(),
        "gc_objects": len(gc.get_objects()),
        **_heap(),
    }
    doc["snapshot_seconds"] = round(time.perf_counter() - started, 2)
    tracemalloc.reset_peak()
    part = directory / f"{name}.json.part"
    part.write_text(json.dumps(doc))
    part.rename(directory / f"{name}.json")


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trim(directory: Path) -> None:
    """Hand the C allocator's free memory back to the system (glibc ``malloc_trim``): what RSS
    drops by was freed memory the allocator kept, not memory anything holds."""
    gc.collect()
    before = _rss_bytes()
    trimmed = ctypes.CDLL("libc.so.6").malloc_trim(0)
    doc = {"rss_before_bytes": before, "rss_after_bytes": _rss_bytes(), "released": trimmed}
    part = directory / "trim.json.part"
    part.write_text(json.dumps(doc))
    part.rename(directory / "trim.json")


def _watch(directory: Path) -> None:
    while True:
        for request in sorted(directory.iterdir()):
            if request.name == "start":
                tracemalloc.start(FRAMES)
                request.unlink()
                (directory / "started").write_text("")
            elif request.name == "trim":
                request.unlink()
                _trim(directory)
            elif request.name.startswith("snap-") and not request.name.endswith(("json", "part")):
                request.unlink()
                _answer(directory, request.name)
        time.sleep(0.2)


def main() -> None:
    directory = Path(os.environ["AW_BENCH_TRACEMALLOC_DIR"])
    threading.Thread(
        target=_watch, args=(directory,), name="bench-tracemalloc", daemon=True
    ).start()
    from infra.cli import main as cli

    cli(sys.argv[1:])


if __name__ == "__main__":
    main()
