"""Text the event store and every read model can hold, checked wherever text comes in.

PostgreSQL ``text`` cannot hold NUL (U+0000), and a lone surrogate (U+D800..U+DFFF, which JSON's
``\\ud800`` escapes can carry into a Python ``str``) is not Unicode text at all: it cannot be
encoded as UTF-8. An event holding either is stored (events are JSON bytes) but no projector can
ever write it into a read model, so one such input would stop the read side for everyone. Every
edge refuses such text before a command exists, and aggregates refuse to record it (defence in
depth). Every other character, control characters and bidi marks included, is ordinary text.
Output of tools and models (run logs, a run's error) is not input to refuse but a record to keep:
it is stored with U+FFFD in place of such characters (:func:`replace_unstorable`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from domain.errors import ValidationFailed

_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def text_problem(value: str) -> str | None:
    """Why ``value`` cannot be stored as text, or ``None`` when it can."""
    found = _UNSTORABLE.search(value)
    if found is None:
        return None
    at = found.start()
    if found.group() == "\x00":
        return f"must not contain NUL (U+0000); found at character {at}"
    return (
        f"must be valid Unicode text; found a lone surrogate U+{ord(found.group()):04X} "
        f"at character {at}"
    )


def storable_text(value: str, *, what: str) -> str:
    """``value`` unchanged, or VALIDATION naming ``what`` when it cannot be stored."""
    problem = text_problem(value)
    if problem is not None:
        raise ValidationFailed(f"{what} {problem}")
    return value


def trimmed(value: str, *, what: str, at_most: int) -> str:
    """``value`` without surrounding white space, refused unless 1 to ``at_most`` characters
    remain: the rule for short identifying text (an agent, a user id, a label)."""
    text = value.strip()
    if not text or len(text) > at_most:
        raise ValidationFailed(f"{what} {value!r} must be 1..{at_most} characters")
    return text


def replace_unstorable(value: str) -> str:
    """``value`` with every NUL and lone surrogate replaced by U+FFFD, for text nobody typed
    (tool and model output in run logs) that is worth keeping even when it holds them."""
    return _UNSTORABLE.sub("\ufffd", value) if _UNSTORABLE.search(value) else value


def find_unstorable(value: object, where: str = "") -> tuple[str, str] | None:
    """The first text inside ``value`` (strings, mapping keys and values, sequences) that cannot
    be stored, as ``(path, problem)``; paths read like ``input.lanes.1.name``. For a mapping's
    key, the path is the mapping's own (empty for ``value`` itself) and the problem names the
    key: ``key 'a\\x00' must not contain NUL ...``."""
    if isinstance(value, str):
        problem = text_problem(value)
        return None if problem is None else (where, problem)
    entries: Iterable[tuple[object, object]]
    if isinstance(value, dict | Mapping):
        entries = value.items()
    elif isinstance(value, list | tuple | set | frozenset):
        entries = enumerate(value)
    else:
        return None
    for key, item in entries:
        if isinstance(key, str) and _UNSTORABLE.search(key) is not None:
            return (where, f"key {key!r} {text_problem(key)}")
        if _nothing_to_find(item):
            continue
        found = find_unstorable(item, f"{where}.{key}" if where else str(key))
        if found is not None:
            return found
    return None


_SCALARS = (int, float, bool, type(None))


def _nothing_to_find(item: object) -> bool:
    """A cheap answer for the values a payload is mostly made of (plain text, numbers)."""
    if type(item) is str:
        return _UNSTORABLE.search(item) is None
    return type(item) in _SCALARS


def refuse_unstorable(value: object, *, what: str) -> None:
    """VALIDATION naming the path inside ``what`` of the first text that cannot be stored."""
    found = find_unstorable(value)
    if found is not None:
        path, problem = found
        raise ValidationFailed(f"{what}{'.' + path if path else ''} {problem}")
