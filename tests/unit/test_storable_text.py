"""Text as the read models store it: what PostgreSQL ``text`` refuses becomes U+FFFD, nothing else
changes (projections.text), whichever way the runner writes it."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from projections.batch import encode_binary_copy
from projections.text import REPLACEMENT, storable, storable_utf8

#: Any code point, lone surrogates and NUL included (what JSON escapes can put in an event).
ANY_TEXT = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF))


@given(ANY_TEXT)
def test_storable_text_is_valid_utf8_without_nul_and_as_long(text: str) -> None:
    stored = storable(text)
    assert "\x00" not in stored
    assert stored.encode() == storable_utf8(text)
    assert len(stored) == len(text)  # one replacement per refused character


@given(ANY_TEXT)
def test_only_refused_characters_are_replaced(text: str) -> None:
    for original, stored in zip(text, storable(text), strict=True):
        refused = original == "\x00" or 0xD800 <= ord(original) <= 0xDFFF
        assert stored == (REPLACEMENT if refused else original)


def test_nul_and_a_lone_surrogate_become_replacement_characters() -> None:
    assert storable("a\x00b") == "a\ufffdb"
    assert storable("x\ud800y") == "x\ufffdy"
    assert storable("ünïcödé ✓ \u200f") == "ünïcödé ✓ \u200f"


def test_the_binary_copy_encoder_stores_the_same_text() -> None:
    encoded = encode_binary_copy([("a\x00b",)], ["text"])
    assert "a\ufffdb".encode() in encoded
    assert b"a\x00b" not in encoded


def test_the_binary_copy_encoder_hands_a_lone_surrogate_over_to_psycopgs_path() -> None:
    """It cannot encode it; its caller then lets psycopg dump the rows, through the runner's
    storable dumpers."""
    try:
        encode_binary_copy([("x\ud800",)], ["text"])
    except ValueError:
        return
    raise AssertionError("a lone surrogate was encoded")
