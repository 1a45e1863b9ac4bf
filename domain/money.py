"""Exact money: integer micro-USD at rest, ``Decimal`` only inside a calculation.

Every amount that is stored, summed or sent is an ``int`` of micro-USD, so totals add up exactly
and reconciliation can demand equality to the micro. A float never enters: parsing refuses
anything that is not a string, and any rounding is explicit, directional and named after the
rule it implements (we round charges *up*, so we never under-bill).
"""

from __future__ import annotations

import decimal
import re
from decimal import (
    MAX_EMAX,
    MIN_EMIN,
    ROUND_CEILING,
    Context,
    Decimal,
    DecimalException,
    localcontext,
)
from typing import Final

from domain.errors import ValidationFailed

MICROS_PER_USD: Final[int] = 1_000_000
MONEY_DECIMALS: Final[int] = 6
DEFAULT_MARKUP: Final[Decimal] = Decimal("5")
MAX_MARKUP: Final[Decimal] = Decimal(1000)
"""The largest markup a plan may set: past a thousandfold it is a mistake, and a large enough
one bills amounts past :data:`MAX_MICROS`, which no read model can store."""
DEFAULT_BILLING_INCREMENT_MICROS: Final[int] = 250_000
MAX_MICROS: Final[int] = 2**63 - 1
"""Largest amount a parsed value may hold: read models keep micros in Postgres ``bigint``."""

_MAX_TEXT_LENGTH: Final[int] = 40
_USD_PATTERN: Final[re.Pattern[str]] = re.compile(r"-?[0-9]+(?:\.[0-9]+)?", re.ASCII)
_MARKUP_PATTERN: Final[re.Pattern[str]] = re.compile(r"[0-9]+(?:\.[0-9]+)?", re.ASCII)
_ALL_SIGNALS: Final[list[type[DecimalException]]] = [
    decimal.Clamped,
    decimal.DivisionByZero,
    decimal.Inexact,
    decimal.InvalidOperation,
    decimal.Overflow,
    decimal.Rounded,
    decimal.Subnormal,
    decimal.Underflow,
]


def _exact_context(digits: int) -> Context:
    """A context that can hold ``digits`` digits and raises rather than round anything.

    Money code never trusts the thread's global context, which any library may have changed.
    """
    return Context(
        prec=max(digits, 28),
        rounding=ROUND_CEILING,
        Emax=MAX_EMAX,
        Emin=MIN_EMIN,
        traps=_ALL_SIGNALS,
    )


def _digits(value: Decimal) -> int:
    return len(value.as_tuple().digits)


def _require_int(value: object, what: str) -> int:
    # bool is an int subclass; True dollars is a bug, not an amount.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationFailed(f"{what} must be an int, got {type(value).__name__} {value!r}")
    return value


def _require_text(text: object, what: str) -> str:
    if not isinstance(text, str):
        raise ValidationFailed(
            f"{what} must be a decimal string such as '1.250000', got {type(text).__name__} "
            f"{text!r}"
        )
    if len(text) > _MAX_TEXT_LENGTH:
        raise ValidationFailed(
            f"{what} is longer than {_MAX_TEXT_LENGTH} characters: {text[:_MAX_TEXT_LENGTH]!r}..."
        )
    return text


def _whole_micros(value: Decimal) -> int | None:
    """``value`` USD as micros, or ``None`` when it is not a whole number of micros."""
    context = _exact_context(_digits(value) + MONEY_DECIMALS)
    scaled = value.scaleb(MONEY_DECIMALS, context=context)
    if scaled != scaled.to_integral_value(context=context):
        return None
    return int(scaled)


def parse_usd(text: str, *, allow_negative: bool = False, what: str = "amount") -> int:
    """Turn an API ``Money`` string into micro-USD, refusing anything that would need rounding.

    Only plain decimal notation is accepted (no exponent, sign ``+``, spaces, NaN or Infinity), so
    a client that serialised a float is told so instead of being silently rounded. Extra decimal
    places are fine only when they are zeros: ``"1.2500000"`` is exactly ``1.25`` USD. Negative
    amounts exist only where the caller says credits are meaningful (``allow_negative``). A
    refusal names ``what`` the text was given as (an option, a field), for whoever typed it.
    """
    text = _require_text(text, what)
    if not _USD_PATTERN.fullmatch(text):
        raise ValidationFailed(
            f"{what} must be a plain decimal number of US dollars like '1.25', got {text!r}"
        )
    micros = _whole_micros(Decimal(text))
    if micros is None:
        raise ValidationFailed(
            f"{what} has more than {MONEY_DECIMALS} decimal places (finer than one micro-dollar): "
            f"{text!r}"
        )
    if micros < 0 and not allow_negative:
        raise ValidationFailed(f"{what} must not be negative, got {text!r}")
    if abs(micros) > MAX_MICROS:
        raise ValidationFailed(f"{what} is too large to be stored: {text!r}")
    return micros


def format_usd(micros: int) -> str:
    """Render micro-USD as the API ``Money`` scalar: exact, always six decimals, never a float."""
    micros = _require_int(micros, "amount")
    sign = "-" if micros < 0 else ""
    whole, fraction = divmod(abs(micros), MICROS_PER_USD)
    return f"{sign}{whole}.{fraction:0{MONEY_DECIMALS}d}"


def positive_micros(micros: int, what: str) -> int:
    """``micros`` when above zero; VALIDATION naming ``what`` and the amount otherwise."""
    if micros <= 0:
        raise ValidationFailed(f"{what} must be positive, got {format_usd(micros)}")
    return micros


def _require_markup(markup: object) -> Decimal:
    if not isinstance(markup, Decimal):
        raise ValidationFailed(f"markup must be a Decimal, got {type(markup).__name__} {markup!r}")
    if not markup.is_finite() or markup <= 0:
        raise ValidationFailed(f"markup must be a finite number greater than 0, got {markup}")
    if _whole_micros(markup) is None:
        raise ValidationFailed(
            f"markup may have at most {MONEY_DECIMALS} decimal places, got {markup}"
        )
    return markup


def parse_markup(text: str) -> Decimal:
    """Read a workspace markup multiplier such as ``"5"`` or ``"1.5"``.

    A markup of zero or below would bill less than the provider charges us, so it is refused; six
    decimals are plenty for a multiplier and keep every billed amount computable exactly.
    """
    text = _require_text(text, "markup")
    if not _MARKUP_PATTERN.fullmatch(text):
        raise ValidationFailed(
            f"markup must be a plain positive decimal number like '5' or '1.5', got {text!r}"
        )
    return at_most_max_markup(_require_markup(Decimal(text)))


def at_most_max_markup(markup: Decimal) -> Decimal:
    """``markup`` when a plan may set it (see :data:`MAX_MARKUP`); VALIDATION otherwise. Only
    a markup being set is held to it: a larger one stored before stays billable."""
    if markup > MAX_MARKUP:
        raise ValidationFailed(f"markup must be at most {MAX_MARKUP}, got {markup}")
    return markup


def format_markup(markup: Decimal) -> str:
    """The shortest plain decimal for a markup (``"5"``, ``"1.5"``), as the API shows it."""
    markup = _require_markup(markup)
    return format(markup.normalize(context=_exact_context(_digits(markup))), "f")


def billed_amount(provider_cost_micros: int, markup: Decimal) -> int:
    """What the workspace pays for a provider charge: cost * markup, rounded up to a micro.

    Rounding up means a charge is never billed below cost * markup. The product is computed in a
    private context sized to the operands with every rounding signal trapped, so it is exact no
    matter how large the numbers or how the global decimal context was configured.

    Negative costs are refused: a credit or refund is the negation of the original billed amount,
    which keeps refunds equal to charges (``ceil(-x)`` is not ``-ceil(x)``).
    """
    cost = _require_int(provider_cost_micros, "provider cost")
    if cost < 0:
        raise ValidationFailed(f"provider cost must not be negative, got {cost} micro-USD")
    markup = _require_markup(markup)
    with localcontext(_exact_context(len(str(cost)) + _digits(markup) + 2)):
        product = Decimal(cost) * markup
        return int(product.to_integral_value(rounding=ROUND_CEILING))


def tokens_cost_micros(tokens: int, price_micros_per_million_tokens: int) -> int:
    """Provider cost of ``tokens`` at a per-million-token price, rounded up to a whole micro.

    Prices are quoted per million tokens, so a single call usually costs a fraction of a micro;
    rounding up keeps our recorded cost at or above what the provider will charge.
    """
    tokens = _require_int(tokens, "token count")
    price = _require_int(price_micros_per_million_tokens, "price per million tokens")
    if tokens < 0:
        raise ValidationFailed(f"token count must not be negative, got {tokens}")
    if price < 0:
        raise ValidationFailed(f"price per million tokens must not be negative, got {price}")
    return -(-(tokens * price) // 1_000_000)


def round_up_to_increment(
    micros: int, increment_micros: int = DEFAULT_BILLING_INCREMENT_MICROS
) -> int:
    """The statement rule: each line is rounded up to the next multiple of the billing increment.

    "Up" is the ceiling toward +infinity for every amount, credits included: a credit line of
    -$0.30 with a $0.25 increment becomes -$0.25. One direction everywhere means a statement never
    bills less than its exact lines, and the rule stays a single monotone function. Zero and exact
    multiples are unchanged; the result is always below ``micros + increment_micros``.
    """
    micros = _require_int(micros, "amount")
    increment = _require_int(increment_micros, "billing increment")
    if increment <= 0:
        raise ValidationFailed(f"billing increment must be greater than 0, got {increment} micros")
    return -(-micros // increment) * increment
