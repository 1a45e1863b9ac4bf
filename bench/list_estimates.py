"""The cost limit's checks of lists longer than estimated, in one request of a large workspace.

``python -m bench.list_estimates [--projects 200] [--lanes 6] [--rounds 7] [--output F]``

A workspace's projects and each board's lanes are lists without pages: once one is longer than
the estimate took it to be (20), the document is estimated again with the real lengths
(:func:`read_api.limits.refuse_longer_than_estimated`), at every read of such a list, that is
once per project for the lanes. This times the checks one request makes reading ``--projects``
projects with their boards' lanes (the SPA's overview of every board), as the request does now
(each set of lengths estimated once) next to the baseline of estimating at every read, in the
same run, alternating, CPU time per request. No database: the checks are pure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from graphql import OperationDefinitionNode, parse

from bench._provenance import Provenance
from read_api import limits

OVERVIEW = """query($ws: ID!) { workspace(id: $ws) { projects { id name board { lanes { name
 wipLimit count cards(first: 20) { edges { node { id title lane position labels
 lastRun { id status } } } } } } } } }"""


def one_request(
    operation: OperationDefinitionNode, projects: int, lanes: int, *, remembered: bool
) -> float:
    """CPU seconds of the checks of one request reading ``projects`` boards of ``lanes``."""
    known: dict[str, int] = {}
    estimates: dict[tuple[tuple[str, int], ...], limits.Estimate] | None = (
        {} if remembered else None
    )

    def read(field: str, length: int) -> None:
        limits.refuse_longer_than_estimated(
            operation,
            {},
            {"ws": "w"},
            field=field,
            length=length,
            known=known,
            max_cost=10**12,
            estimates=estimates,
        )

    started = time.process_time()
    read("projects", projects)
    for _ in range(projects):
        read("lanes", lanes)
    return time.process_time() - started


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.list_estimates")
    p.add_argument("--projects", type=int, default=200)
    p.add_argument("--lanes", type=int, default=6)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--output", type=Path, default=None)
    args = p.parse_args(argv)
    provenance = Provenance.start()
    operation = parse(OVERVIEW).definitions[0]
    assert isinstance(operation, OperationDefinitionNode)
    times: dict[str, list[float]] = {"every read (baseline)": [], "once per lengths": []}
    for _ in range(args.rounds):
        for name in times:
            remembered = name == "once per lengths"
            times[name].append(
                one_request(operation, args.projects, args.lanes, remembered=remembered)
            )
    medians = {name: statistics.median(values) for name, values in times.items()}
    result: dict[str, Any] = {
        "provenance": provenance.finish(),
        "projects": args.projects,
        "lanes": args.lanes,
        "rounds": args.rounds,
        "cpu_ms_per_request": {n: [round(v * 1000, 3) for v in vs] for n, vs in times.items()},
        "median_cpu_ms": {n: round(v * 1000, 3) for n, v in medians.items()},
        "ratio": round(medians["once per lengths"] / medians["every read (baseline)"], 3),
    }
    for name, value in medians.items():
        print(f"{name}: median {value * 1000:.2f} ms CPU per request")
    print(f"ratio (now / baseline): {result['ratio']}")
    if args.output is not None:
        args.output.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
