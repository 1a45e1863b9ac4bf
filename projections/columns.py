"""Columns of the read-model tables that both their projector and the API's queries name.

One list per table, so a column added to the projector's writes is one the queries can read,
and the two cannot drift apart. Each entry is the column and its SQL type (the batch path
sends whole columns as typed arrays).
"""

from __future__ import annotations

Columns = tuple[tuple[str, str], ...]

CARD_COLUMNS: Columns = (
    ("workspace_id", "uuid"),
    ("card_id", "uuid"),
    ("project_id", "uuid"),
    ("title", "text"),
    ("description", "text"),
    ("lane", "text"),
    ("position", "text"),
    ("assignee", "text"),
    ("labels", "jsonb"),  # sent as JSON: unnest cannot carry one array per row
    ("blocked_reason", "text"),
    ("archived", "boolean"),
    ("version", "bigint"),
    ("created_at", "timestamptz"),
    ("updated_at", "timestamptz"),
    ("last_run_id", "uuid"),
    ("last_run_position", "bigint"),
    ("cost_micros", "bigint"),
)
"""``rm_cards`` as the batch path reads and writes it."""

CARD_FOLD_ONLY = frozenset({"last_run_position"})
"""Columns only the projector's fold uses (which run is the card's last); the API never shows
them."""

RUN_COLUMNS: Columns = (
    ("workspace_id", "uuid"),
    ("run_id", "uuid"),
    ("project_id", "uuid"),
    ("card_id", "uuid"),
    ("agent", "text"),
    ("status", "text"),
    ("provider", "text"),
    ("model", "text"),
    ("max_cost_micros", "bigint"),
    ("input_tokens", "bigint"),
    ("output_tokens", "bigint"),
    ("provider_cost_micros", "bigint"),
    ("billed_micros", "bigint"),
    ("llm_calls", "integer"),
    ("requested_at", "timestamptz"),
    ("started_at", "timestamptz"),
    ("finished_at", "timestamptz"),
    ("error", "text"),
    ("log_line_count", "integer"),
    ("version", "bigint"),
)
"""``rm_runs``: one row per agent run, its status and what it used and cost."""


def select_list(columns: Columns, *, leave_out: frozenset[str] = frozenset()) -> str:
    """The columns as a ``SELECT`` list, in table order."""
    return ", ".join(name for name, _ in columns if name not in leave_out)


CARD_SELECT = select_list(CARD_COLUMNS, leave_out=CARD_FOLD_ONLY)
"""What the API reads of a card."""
RUN_SELECT = select_list(RUN_COLUMNS)
"""What the API reads of a run."""
