"""Provider prices and the exact cost of one LLM call.

A price table is a list of rows, each a (provider, model) price from an instant on. The row in
force for a call is the one with the latest ``effective_from`` at or before the call's start, so
a price change never alters a past charge. Cost is computed exactly in ``Decimal`` and rounded up
to a whole micro-dollar once per call (never per token, never per chunk), so summing a run's calls
gives the same total however the calls are grouped.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import (
    MAX_EMAX,
    MIN_EMIN,
    ROUND_CEILING,
    Context,
    Decimal,
    Inexact,
    InvalidOperation,
    Rounded,
    localcontext,
)
from fractions import Fraction
from typing import Any

from domain.errors import ValidationFailed
from domain.money import billed_amount

MAX_PRICE_PER_MTOK = Decimal(10**9)
"""Prices are below a billion USD per million tokens ($1,000 a token)..."""
PRICE_DECIMALS = 18
"""...and whole multiples of 10^-18 USD per million tokens: so a call's cost has a bounded
number of digits however far apart its two prices are, and is computed exactly."""


@dataclass(frozen=True, kw_only=True)
class PriceRow:
    """USD per million input and output tokens of one model, from ``effective_from`` on."""

    provider: str
    model: str
    effective_from: datetime
    input_per_mtok: Decimal
    output_per_mtok: Decimal

    def __post_init__(self) -> None:
        if self.effective_from.tzinfo is None:
            raise ValidationFailed(
                f"price of {self.provider}/{self.model}: effective_from must carry a time zone"
            )
        for what, value in (("input", self.input_per_mtok), ("output", self.output_per_mtok)):
            if not value.is_finite() or value < 0:
                raise ValidationFailed(
                    f"price of {self.provider}/{self.model}: {what}_per_mtok must be a "
                    f"non-negative number, got {value}"
                )
            # Compared before anything is computed from it: 1E+999999999 is one digit.
            if value >= MAX_PRICE_PER_MTOK:
                raise ValidationFailed(
                    f"price of {self.provider}/{self.model}: {what}_per_mtok must be below "
                    f"{MAX_PRICE_PER_MTOK} USD per million tokens, got {value}"
                )
            if value and (
                value.adjusted() < -PRICE_DECIMALS
                or (Fraction(value) * 10**PRICE_DECIMALS).denominator != 1
            ):
                raise ValidationFailed(
                    f"price of {self.provider}/{self.model}: {what}_per_mtok may have at most "
                    f"{PRICE_DECIMALS} decimal places, got {value}"
                )


@dataclass(frozen=True, kw_only=True)
class CallCost:
    """What one call cost us and what the workspace is billed, in micro-USD."""

    provider_cost_micros: int
    billed_micros: int
    price: PriceRow


def call_cost_micros(price: PriceRow, *, input_tokens: int, output_tokens: int) -> int:
    """``input * in/1e6 + output * out/1e6`` USD, exact, rounded up to a whole micro-dollar."""
    for what, count in (("input", input_tokens), ("output", output_tokens)):
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValidationFailed(f"{what} token count must be a non-negative int, got {count!r}")
    # USD per million tokens times tokens is exactly micro-USD: no division is needed.
    with localcontext(_exact(input_tokens, output_tokens, price)):
        micros = (
            Decimal(input_tokens) * price.input_per_mtok
            + Decimal(output_tokens) * price.output_per_mtok
        )
        return int(micros.to_integral_value(rounding=ROUND_CEILING))


def _exact(input_tokens: int, output_tokens: int, price: PriceRow) -> Context:
    """A context wide enough that the products and their sum are never rounded (and trapped if
    they were): a product has at most the tokens' digits, the price's whole digits and its
    decimals, and the sum one digit more (the digits of the two prices alone do not bound it:
    ``9E+8`` and ``1E-18`` have one each)."""
    whole_digits = len(str(MAX_PRICE_PER_MTOK)) - 1
    digits = max(len(str(input_tokens)), len(str(output_tokens))) + whole_digits + PRICE_DECIMALS
    ctx = Context(prec=max(digits + 2, 28), rounding=ROUND_CEILING, Emax=MAX_EMAX, Emin=MIN_EMIN)
    ctx.traps[Inexact] = True
    ctx.traps[Rounded] = True
    return ctx


class PriceTable:
    """Every known price row, looked up by provider, model and the instant a call started."""

    def __init__(self, rows: Iterable[PriceRow]) -> None:
        self._rows: dict[tuple[str, str], list[PriceRow]] = {}
        for row in rows:
            self._rows.setdefault((row.provider, row.model), []).append(row)
        for key, found in self._rows.items():
            found.sort(key=lambda r: r.effective_from)
            instants = [r.effective_from for r in found]
            if len(set(instants)) != len(instants):
                raise ValidationFailed(
                    f"price table has two rows for {key[0]}/{key[1]} from the same instant"
                )
        self.version = _version_of(self._rows)

    def models(self) -> list[tuple[str, str]]:
        return sorted(self._rows)

    def in_force(self, provider: str, model: str, at: datetime) -> PriceRow | None:
        """The row with the latest ``effective_from`` at or before ``at``; ``None`` if none."""
        found = None
        for row in self._rows.get((provider, model), ()):
            if row.effective_from <= at:
                found = row
            else:
                break
        return found

    def require(self, provider: str, model: str, at: datetime) -> PriceRow:
        row = self.in_force(provider, model, at)
        if row is None:
            raise ValidationFailed(
                f"model {provider}/{model} has no price in force at {at.isoformat()}; "
                "it cannot be called (add it to AGENTWORKS_PRICE_TABLE)"
            )
        return row

    def cost(
        self,
        provider: str,
        model: str,
        *,
        at: datetime,
        input_tokens: int,
        output_tokens: int,
        markup: Decimal,
    ) -> CallCost:
        price = self.require(provider, model, at)
        cost = call_cost_micros(price, input_tokens=input_tokens, output_tokens=output_tokens)
        return CallCost(
            provider_cost_micros=cost, billed_micros=billed_amount(cost, markup), price=price
        )

    @classmethod
    def from_document(cls, document: Mapping[str, Any]) -> PriceTable:
        """Rows from a parsed JSON/YAML document ``{"prices": [{provider, model, ...}, ...]}``."""
        rows = document.get("prices") if isinstance(document, Mapping) else None
        if not isinstance(rows, Sequence) or isinstance(rows, str | bytes):
            raise ValidationFailed("price table must be a mapping with a list under 'prices'")
        return cls(_row(i, raw) for i, raw in enumerate(rows))


def _row(index: int, raw: object) -> PriceRow:
    where = f"price table row {index + 1}"
    if not isinstance(raw, Mapping):
        raise ValidationFailed(f"{where} must be a mapping")
    missing = {"provider", "model", "effective_from", "input_per_mtok", "output_per_mtok"} - set(
        raw
    )
    if missing:
        raise ValidationFailed(f"{where} lacks {', '.join(sorted(missing))}")
    effective = raw["effective_from"]
    if isinstance(effective, str):
        try:
            effective = datetime.fromisoformat(effective.replace("Z", "+00:00"))
        except ValueError as error:
            raise ValidationFailed(
                f"{where}: effective_from {effective!r} is no ISO time"
            ) from error
    if not isinstance(effective, datetime):
        raise ValidationFailed(f"{where}: effective_from must be an ISO-8601 time")
    return PriceRow(
        provider=str(raw["provider"]),
        model=str(raw["model"]),
        effective_from=effective,
        input_per_mtok=_price(raw["input_per_mtok"], f"{where} input_per_mtok"),
        output_per_mtok=_price(raw["output_per_mtok"], f"{where} output_per_mtok"),
    )


def _price(value: object, where: str) -> Decimal:
    # A float in the file has already lost exactness; only strings and ints are prices.
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValidationFailed(f'{where} must be a decimal string such as "0.15", got {value!r}')
    try:
        price = Decimal(str(value).strip())
    except InvalidOperation as error:
        raise ValidationFailed(f"{where} is not a decimal number: {value!r}") from error
    if not price.is_finite() or price < 0:
        raise ValidationFailed(f"{where} must be a non-negative decimal, got {value!r}")
    return price


def _version_of(rows: Mapping[tuple[str, str], list[PriceRow]]) -> str:
    """A short digest of the table's content: charges name the table they were priced from."""
    canonical = json.dumps(
        [
            [r.provider, r.model, r.effective_from.isoformat(), str(r.input_per_mtok),
             str(r.output_per_mtok)]
            for key in sorted(rows) for r in rows[key]
        ]
    )  # fmt: skip
    return "pt-" + hashlib.sha256(canonical.encode()).hexdigest()[:12]


BUILT_IN_PRICES: dict[str, Any] = {
    "prices": [
        {"provider": "simulated", "model": "sim-1", "effective_from": "2024-01-01T00:00:00Z",
         "input_per_mtok": "0.50", "output_per_mtok": "1.50"},
        {"provider": "openai", "model": "gpt-4o-mini", "effective_from": "2024-07-18T00:00:00Z",
         "input_per_mtok": "0.15", "output_per_mtok": "0.60"},
        {"provider": "openai", "model": "gpt-4o", "effective_from": "2024-08-06T00:00:00Z",
         "input_per_mtok": "2.50", "output_per_mtok": "10.00"},
        {"provider": "anthropic", "model": "claude-3-5-haiku-latest",
         "effective_from": "2024-11-04T00:00:00Z", "input_per_mtok": "0.80",
         "output_per_mtok": "4.00"},
        {"provider": "anthropic", "model": "claude-3-5-sonnet-latest",
         "effective_from": "2024-10-22T00:00:00Z", "input_per_mtok": "3.00",
         "output_per_mtok": "15.00"},
    ]
}  # fmt: skip
"""Published list prices; a deployment replaces the whole table with AGENTWORKS_PRICE_TABLE."""


def built_in_price_table() -> PriceTable:
    return PriceTable.from_document(BUILT_IN_PRICES)
