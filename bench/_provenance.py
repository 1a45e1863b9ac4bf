"""What a results file must say about its run for a figure to be citable (``bench.summary``):
the commit and whether the working tree had uncommitted changes, when it started, and how loaded
the machine was, at the start and over the whole run.

Usage: ``run = Provenance.start()`` before measuring, ``results["provenance"] = run.finish()``
at the end.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str:
    done = subprocess.run(
        ["git", *args], capture_output=True, text=True, cwd=ROOT, check=False, timeout=30
    )
    return done.stdout if done.returncode == 0 else ""


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine since boot, from /proc/stat."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


@dataclass
class Provenance:
    started_at: str
    started: float
    jiffies: tuple[int, int]
    commit: str
    dirty: list[str]
    loadavg_at_start: list[float]

    @classmethod
    def start(cls) -> Provenance:
        status = _git("status", "--porcelain")
        return cls(
            started_at=datetime.now(UTC).isoformat(timespec="seconds"),
            started=time.monotonic(),
            jiffies=_cpu_jiffies(),
            commit=_git("rev-parse", "--short", "HEAD").strip() or "unknown",
            # Results files are what benchmarks write, often while another one runs: they are
            # not code the measurement ran on.
            dirty=sorted(
                path
                for path in (line[3:] for line in status.splitlines() if line.strip())
                if not path.startswith("bench/results/")
            ),
            loadavg_at_start=[round(v, 2) for v in os.getloadavg()],
        )

    def finish(self) -> dict[str, Any]:
        """The record for the results file; ``machine_busy_cores`` counts every process on the
        machine over the run (ours and anyone else's)."""
        busy, total = _cpu_jiffies()
        cpus = os.cpu_count() or 1
        spent_busy, spent_total = busy - self.jiffies[0], total - self.jiffies[1]
        return {
            "commit": self.commit,
            "dirty": self.dirty,
            "started_at": self.started_at,
            "seconds": round(time.monotonic() - self.started, 1),
            "cpus": cpus,
            "python": platform.python_version(),
            "loadavg_at_start": self.loadavg_at_start,
            "loadavg_at_end": [round(v, 2) for v in os.getloadavg()],
            "machine_busy_cores": round(cpus * spent_busy / spent_total, 2)
            if spent_total
            else None,
        }
