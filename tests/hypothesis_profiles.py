"""Hypothesis profiles: ``ci`` (selected when ``CI=true``, which ``.ci/run`` sets) and ``dev``.

The properties that hold the read side together (a batch leaves what single events leave, the
incremental read models equal a rebuild, lost deliveries converge after a sweep) cost seconds per
example against a real PostgreSQL, so they set their own count (:func:`expensive_property`): a
few more than the 8-15 they used to run locally, about twice that in CI (15, 30 and 20).

Measured on the shared 2-core machine with seven other test sessions running (2026-12-06, load
average 6-9): the three properties took 98 s with the old counts (8, 15, 10), 119 s with the
``dev`` counts and 168 s with the ``ci`` counts (batch 77 s, incremental 48 s, sweep 43 s); on a
quieter machine all of these are shorter.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

CI = "ci"
DEV = "dev"

# No deadline: Hypothesis's per-example deadline (200 ms by default) is a timing assertion, and on
# a shared 2-core machine a pure property failed it (test_positions, load average 24).
settings.register_profile(CI, print_blob=True, deadline=None)
settings.register_profile(DEV, deadline=None)


def load() -> str:
    """Load the profile this run asks for (``CI=true``: ``ci``); returns its name."""
    name = CI if os.environ.get("CI", "").strip().lower() in {"true", "1"} else DEV
    settings.load_profile(name)
    return name


def examples(*, dev: int, ci: int) -> int:
    """``max_examples`` for an expensive property under the loaded profile."""
    return ci if settings.get_current_profile_name() == CI else dev


def expensive_property(*, dev: int, ci: int) -> settings:
    """Settings for a property against real servers: :func:`examples` examples, and no health
    check that fails it for being slow or for sharing a function-scoped fixture (its database)
    across examples, which each example keeps apart from the others itself."""
    return settings(
        max_examples=examples(dev=dev, ci=ci),
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
