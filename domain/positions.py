"""Fractional indexing: the order of cards within a lane as short, plain-sortable strings.

A move writes one card's new position and nothing else, so concurrent moves of different cards never
touch the same row and a read model can ``ORDER BY position`` with plain byte order (``COLLATE "C"``
in Postgres). Keys use the 62 ASCII alphanumerics, whose ASCII order is their digit order.

A key is an *integer part* followed by an optional *fraction*:

* The first character (the head) says how many digits the integer part has: ``V`` one, ``W`` two,
  … ``z`` thirty-one going up; ``U`` one, ``T`` two, … ``0`` thirty-one going down. Longer integers
  therefore sort after (or, below ``V``, before) all shorter ones, so appending or prepending just
  steps to the next integer, and a key after n such steps has about log62(n) characters.
* The fraction is any digit string, used only when two neighbours are consecutive integers; it is
  where repeated insertion into one gap makes keys grow, which no scheme can avoid.

No key ends in ``0``: a trailing zero would make ``x`` and ``x0`` distinct keys with nothing between
them, and the guarantee that a key fits between any two keys would be lost.

Nothing shortens a key by itself, so the board re-spreads (:func:`respread`): a placement whose
key would pass :data:`RESPREAD_THRESHOLD` first gives the cards around its gap fresh, evenly
spread keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from domain.errors import ValidationFailed

if TYPE_CHECKING:
    from collections.abc import Collection, Sequence

ALPHABET: Final[str] = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
BASE: Final[int] = len(ALPHABET)
FIRST_POSITION: Final[str] = "V1"
"""The key of the first card in an empty lane: the smallest one-digit integer going up."""

_INDEX: Final[dict[str, int]] = {digit: value for value, digit in enumerate(ALPHABET)}
_ZERO: Final[str] = ALPHABET[0]
_TOP: Final[int] = BASE - 1
_UP_HEAD: Final[int] = _INDEX["V"]
# Seeded keys skip integers ending in zero by adding one, so a spacing of four still leaves at
# least one integer key free between neighbours.
_MIN_SPACING: Final[int] = 4

RESPREAD_THRESHOLD: Final[int] = 32
"""The longest key a placement may give a card; one that would be longer re-spreads its lane.

Repeated insertion into one gap adds about one character per five moves and nothing shortens a
key by itself, so without a bound a busy lane's keys (and its cursors, index entries and events)
grow for ever. 32 characters is far beyond what ordinary use reaches (a lane of thousands of
cards seeded or appended to needs at most five; thousands of random moves about a dozen), so a
re-spread stays rare, yet well inside what the board's index and cursors hold comfortably."""

RESPREAD_TARGET: Final[int] = RESPREAD_THRESHOLD // 2
"""How long the fresh keys of a re-spread may be: half the threshold, so that the next one in the
same place is dozens of moves into one gap away (a re-spread's cost is paid back over them)."""

MAX_RESPREAD_CARDS: Final[int] = 512
"""The most cards one re-spread re-keys (each is an event on the card and one on the board, all
in the move's own transaction, so this bounds what one move writes). A re-spread re-keys a
window around the gap, doubled until its keys fit :data:`RESPREAD_TARGET`; in a lane no longer
than this that always succeeds (at worst the whole lane is spread as if seeded), so no key ever
passes :data:`RESPREAD_THRESHOLD`. In a longer lane whose cards crowd one spot beyond this many,
the keys stay near the threshold, not under it (see :func:`respread`)."""


def _integer_digits(head: str) -> int:
    value = _INDEX[head]
    return value - _UP_HEAD + 1 if value >= _UP_HEAD else _UP_HEAD - value


def is_valid_position(key: object) -> bool:
    """Whether ``key`` could have been produced here; anything else is refused, not repaired."""
    if not isinstance(key, str) or not key or key[-1] == _ZERO:
        return False
    if any(char not in _INDEX for char in key):
        return False
    return len(key) > _integer_digits(key[0])


def _split(key: str) -> tuple[str, str]:
    end = 1 + _integer_digits(key[0])
    return key[:end], key[end:]


def _compose(head: int, digits: list[int]) -> str:
    return ALPHABET[head] + "".join(ALPHABET[digit] for digit in digits)


def _next_integer(integer: str) -> str | None:
    """The smallest integer part above ``integer`` that is a key by itself (no trailing zero)."""
    head, digits = _INDEX[integer[0]], [_INDEX[char] for char in integer[1:]]
    if digits[-1] < _TOP:
        digits[-1] += 1
        return _compose(head, digits)
    position = len(digits) - 2
    while position >= 0 and digits[position] == _TOP:
        digits[position] = 0
        position -= 1
    if position >= 0:
        digits[position] += 1
        digits[-1] = 1
        return _compose(head, digits)
    if head == _TOP:
        return None
    return _compose(head + 1, [0] * (_integer_digits(ALPHABET[head + 1]) - 1) + [1])


def _previous_integer(integer: str) -> str | None:
    """The largest integer part below ``integer`` that is a key by itself (no trailing zero)."""
    head, digits = _INDEX[integer[0]], [_INDEX[char] for char in integer[1:]]
    if digits[-1] >= 2:
        digits[-1] -= 1
        return _compose(head, digits)
    position = len(digits) - 2
    while position >= 0 and digits[position] == 0:
        digits[position] = _TOP
        position -= 1
    if position >= 0:
        digits[position] -= 1
        digits[-1] = _TOP
        return _compose(head, digits)
    if head == 0:
        return None
    return _compose(head - 1, [_TOP] * _integer_digits(ALPHABET[head - 1]))


def _fraction_between(low: str, high: str | None) -> str:
    """A fraction strictly between ``low`` (``""`` is zero) and ``high`` (``None`` is one).

    Both are read as base-62 fractions without trailing zeros, for which string order and numeric
    order agree; the result has no trailing zero either.
    """
    result: list[str] = []
    position = 0
    while True:
        low_digit = _INDEX[low[position]] if position < len(low) else 0
        high_digit = _INDEX[high[position]] if high is not None else BASE
        if low_digit == high_digit:
            result.append(ALPHABET[low_digit])
        elif high_digit - low_digit > 1:
            result.append(ALPHABET[(low_digit + high_digit) // 2])
            return "".join(result)
        elif high is not None and len(high) > position + 1:
            result.append(high[position])
            return "".join(result)
        else:
            result.append(ALPHABET[low_digit])
            high = None
        position += 1


def _require_valid(key: str, role: str) -> None:
    if not is_valid_position(key):
        raise ValidationFailed(f"{role} position {key!r} is not a valid position key")


def position_between(before: str | None, after: str | None) -> str:
    """A key that sorts strictly between two neighbours, as short as the gap allows.

    ``before=None`` means the start of the lane and ``after=None`` its end. Stepping to the next
    (or previous) integer is preferred over adding fraction digits because it keeps keys short for
    the common moves: to the top, to the bottom, and between cards that were never squeezed.
    """
    if before is not None:
        _require_valid(before, "before")
    if after is not None:
        _require_valid(after, "after")
    if before is not None and after is not None and before >= after:
        raise ValidationFailed(
            f"before position {before!r} must sort strictly below after position {after!r}"
        )

    if before is None:
        return FIRST_POSITION if after is None else _key_before(after)
    low_integer, low_fraction = _split(before)
    if after is None:
        step = _next_integer(low_integer)
        return step if step is not None else low_integer + _fraction_between(low_fraction, None)
    high_integer, high_fraction = _split(after)
    if low_integer == high_integer:
        return low_integer + _fraction_between(low_fraction, high_fraction)
    step = _next_integer(low_integer)
    if step is not None and step < after:
        return step
    return low_integer + _fraction_between(low_fraction, None)


def _key_before(after: str) -> str:
    integer, fraction = _split(after)
    if fraction and integer[-1] != _ZERO:
        return integer
    step = _previous_integer(integer)
    if step is not None:
        return step
    # Only the two smallest integers of the lowest class get here; below them lies fraction space.
    if fraction:
        return integer + _fraction_between("", fraction)
    return integer[:-1] + _ZERO + _fraction_between("", None)


def positions_for(n: int) -> list[str]:
    """``n`` increasing keys of equal length with even gaps, for seeding or re-spreading a lane.

    Neighbours are at least ``_MIN_SPACING`` integers apart, so the first insert into any gap,
    and before the first or after the last key, needs no longer key than the seeded ones.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValidationFailed(f"number of positions must be a non-negative int, got {n!r}")
    if n == 0:
        return []
    for digits in range(1, _integer_digits(ALPHABET[_TOP]) + 1):
        spacing = BASE**digits // (n + 1)
        if spacing >= _MIN_SPACING:
            break
    else:
        raise ValidationFailed(f"cannot spread {n} positions within one key length")
    head = _UP_HEAD + digits - 1
    keys: list[str] = []
    for index in range(1, n + 1):
        value = index * spacing
        if value % BASE == 0:
            value += 1
        encoded = [0] * digits
        for place in range(digits - 1, -1, -1):
            value, encoded[place] = divmod(value, BASE)
        keys.append(_compose(head, encoded))
    return keys


def _fractions_between(low: str, high: str | None, n: int) -> list[str]:
    """``n`` increasing fractions evenly spread strictly between ``low`` and ``high`` (read as
    in :func:`_fraction_between`), all with the fewest digits that leave ``_MIN_SPACING``
    between neighbours and both ends."""
    low_value, low_digits = 0, 0
    for char in low:
        low_value, low_digits = low_value * BASE + _INDEX[char], low_digits + 1
    digits = 1
    while True:
        scale = BASE**digits
        # Both ends on this scale: low rounded down, high rounded up.
        floor = (
            low_value // BASE ** (low_digits - digits)
            if low_digits >= digits
            else low_value * BASE ** (digits - low_digits)
        )
        if high is None:
            ceiling = scale
        else:
            high_value = 0
            for place in range(digits):
                high_value = high_value * BASE + (_INDEX[high[place]] if place < len(high) else 0)
            ceiling = high_value + (1 if len(high) > digits else 0)
        spacing = (ceiling - floor) // (n + 1)
        if spacing >= _MIN_SPACING:
            break
        digits += 1
    fractions: list[str] = []
    for index in range(1, n + 1):
        value = floor + index * spacing
        if value % BASE == 0:
            value += 1  # no trailing zero; still at least three below the next one
        encoded = [0] * digits
        for place in range(digits - 1, -1, -1):
            value, encoded[place] = divmod(value, BASE)
        fractions.append("".join(ALPHABET[digit] for digit in encoded))
    return fractions


def positions_spread_between(before: str | None, after: str | None, n: int) -> list[str]:
    """``n`` increasing keys evenly spread strictly between two keys (``None``: a lane's end).

    The keys share one integer part and spread over the fractions it offers between the two:
    between two keys of one integer part, the fractions between theirs; otherwise the shortest
    of spreading above ``before`` within its integer, below ``after`` within its integer, or over
    the whole integer after ``before``'s when that one lies below ``after``. (Every key with a
    smaller integer part sorts below a key with a larger one.)
    """
    if n <= 0:
        return []
    # An open end is closed two steps out, so that the whole integer next to the known key (a
    # fraction space of its own, however long that key is) is among the spaces to spread over.
    if after is None:
        if before is None:
            return positions_for(n)
        after = position_between(position_between(before, None), None)
    elif before is None:
        before = position_between(None, position_between(None, after))
    low_integer, low_fraction = _split(before)
    high_integer, high_fraction = _split(after)
    if low_integer == high_integer:
        return [low_integer + f for f in _fractions_between(low_fraction, high_fraction, n)]
    spaces: list[tuple[str, str, str | None]] = [(low_integer, low_fraction, None)]
    if high_fraction:
        spaces.append((high_integer, "", high_fraction))
    step = _next_integer(low_integer)
    if step is not None and step < high_integer:
        spaces.append((step, "", None))
    spreads = [
        [integer + f for f in _fractions_between(low, high, n)] for integer, low, high in spaces
    ]
    return min(spreads, key=lambda keys: len(keys[0]))


@dataclass(frozen=True)
class Respread:
    """Fresh keys for the cards ``start`` to ``end`` (exclusive) of a lane and the card going
    into the gap among them: ``keys`` has ``end - start + 1`` keys, the newcomer's at
    ``gap - start``."""

    start: int
    end: int
    gap: int
    keys: list[str]

    @property
    def newcomer(self) -> str:
        return self.keys[self.gap - self.start]

    @property
    def others(self) -> list[str]:
        """The new keys of the cards ``start`` to ``end``, in their order."""
        return self.keys[: self.gap - self.start] + self.keys[self.gap - self.start + 1 :]


def respread(keys: Sequence[str], gap: int, fixed: Collection[int] = ()) -> Respread | None:
    """Fresh keys for a card going into ``gap`` of a lane whose cards have ``keys`` (in order)
    and some of its neighbours, when the key between its neighbours would be too long.

    The window of re-keyed cards starts with the two neighbours and doubles on each side until
    the keys spread across it (between the cards just outside it) fit :data:`RESPREAD_TARGET`,
    it holds the whole lane (which is then spread over the shortest keys, as if seeded), or it
    reaches :data:`MAX_RESPREAD_CARDS`. At that cap the keys found are taken only if none is
    longer than the longest key they replace (newcomer's included); otherwise None: the
    placement keeps its long key and the next one tries again.
    The order of the cards is kept: only keys change, each card's stays between its neighbours.

    ``fixed`` are the indexes of cards whose keys must stay as they are (the board cannot tell
    such a card its new key: its events cannot be read). The window never takes one in: it
    stops at the nearest on each side of the gap as at the lane's ends, and having grown to them
    takes its keys under the rule of the cap.
    """
    count = len(keys)
    if not 0 <= gap <= count:
        raise ValidationFailed(f"gap {gap} is outside 0..{count}")
    if any(not 0 <= index < count for index in fixed):
        raise ValidationFailed(f"a fixed card's index is outside 0..{count - 1}")
    low = max((index + 1 for index in fixed if index < gap), default=0)
    high = min((index for index in fixed if index >= gap), default=count)
    widest = MAX_RESPREAD_CARDS // 2
    side = 1
    while True:
        width = min(side, widest)
        start, end = max(low, gap - width), min(high, gap + width)
        fresh = positions_spread_between(
            keys[start - 1] if start > 0 else None, keys[end] if end < count else None,
            end - start + 1,
        )  # fmt: skip
        longest = max(len(key) for key in fresh)
        if longest <= RESPREAD_TARGET or (start == 0 and end == count):
            return Respread(start, end, gap, fresh)
        if width == widest or (start, end) == (low, high):
            squeezed = position_between(
                keys[gap - 1] if gap > 0 else None, keys[gap] if gap < count else None
            )
            replaced = max(len(key) for key in [squeezed, *keys[start:end]])
            return Respread(start, end, gap, fresh) if longest <= replaced else None
        side *= 2
