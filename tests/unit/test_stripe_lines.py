"""Which invoice item an invoice line bills, in the shapes of Stripe's API versions."""

from __future__ import annotations

from typing import Any

import pytest
import stripe

from adapters.stripe import line_item_id


def _line(fields: dict[str, Any]) -> Any:
    return stripe.StripeObject.construct_from({"object": "line_item", **fields}, "sk_test")


@pytest.mark.parametrize(
    ("fields", "item"),
    [
        # 2025-03-31 (basil) and later: the item is named under the line's parent.
        (
            {
                "id": "il_1",
                "parent": {
                    "type": "invoice_item_details",
                    "invoice_item_details": {"invoice_item": "ii_new"},
                    "subscription_item_details": None,
                },
            },
            "ii_new",
        ),
        # Earlier versions, and localstripe.
        ({"id": "il_2", "invoice_item": "ii_old"}, "ii_old"),
        # A subscription's own line bills no item of ours: its own id stands for it.
        (
            {
                "id": "il_3",
                "parent": {
                    "type": "subscription_item_details",
                    "invoice_item_details": None,
                    "subscription_item_details": {"subscription_item": "si_1"},
                },
            },
            "il_3",
        ),
        ({"id": "il_4", "invoice_item": None}, "il_4"),
    ],
)
def test_the_item_a_line_bills_is_read_in_every_api_versions_shape(
    fields: dict[str, Any], item: str
) -> None:
    assert line_item_id(_line(fields)) == item
