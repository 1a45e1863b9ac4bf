"""``agentworks invoice`` and ``agentworks reconcile`` take the billing months the GraphQL
fields take (``domain.months.parse_month``), and refuse the others with its message, exit 2.

Before, the CLI refused year 0000 as malformed (GraphQL's ``statement`` answered it) and 9999-12
as "in the future" (GraphQL took it): each edge had its own rule.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from test_cli import agentworks, assert_one_line_error

from domain.errors import ValidationFailed
from domain.months import parse_month

if TYPE_CHECKING:
    from pathlib import Path


@pytest.mark.parametrize("command", ["invoice", "reconcile"])
@pytest.mark.parametrize("month", ["0000-01", "9999-12", "2026-13"])
def test_a_month_outside_the_billing_range_exits_2_naming_it(
    command: str, month: str, tmp_path: Path
) -> None:
    with pytest.raises(ValidationFailed) as refused:
        parse_month(month)
    line = assert_one_line_error(agentworks(command, "--month", month, cwd=tmp_path))
    assert line == f"agentworks: error: {refused.value}"
