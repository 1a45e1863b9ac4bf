"""Waiting out a rate-limit window about to end, for tests that count a burst against a limit.

Limits count in fixed one-minute windows (``read_api.ratelimit``): a burst that crosses into the
next window finds its count back at nothing, and the request that should have been refused is
answered.
"""

from __future__ import annotations

import time

from read_api.ratelimit import WINDOW_SECONDS


def clear_of_a_window_end(margin: float = 15.0) -> None:
    """Wait for the next window when this one ends within ``margin`` seconds."""
    left = WINDOW_SECONDS - time.time() % WINDOW_SECONDS
    if left < margin:
        time.sleep(left + 0.05)
