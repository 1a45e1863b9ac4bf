"""Token counts (adapters/tokenizer.py): a bounded count is the count, bounded."""

from __future__ import annotations

import pytest

from adapters.tokenizer import MAX_TOKEN_BYTES, _encoding, count_tokens, count_tokens_upto


def test_no_token_of_the_encoding_stands_for_more_bytes_than_the_bound() -> None:
    """What ``count_tokens_upto`` relies on to skip a long text: a text of ``n`` characters is
    at least ``n / MAX_TOKEN_BYTES`` tokens."""
    encoding = _encoding()
    longest = 0
    for token in range(encoding.n_vocab):
        try:
            longest = max(longest, len(encoding.decode_single_token_bytes(token)))
        except KeyError:  # an id between the ordinary tokens and the special ones
            continue
    assert 0 < longest <= MAX_TOKEN_BYTES


@pytest.mark.parametrize(
    "text",
    ["", "hello", " " * 5000, "x" * 5000, "=" * 3000, "日本語のテキスト" * 300, "a b " * 2000],
)
@pytest.mark.parametrize("limit", [1, 7, 40, 500, 10_000])
def test_a_bounded_count_is_the_count_up_to_its_bound(text: str, limit: int) -> None:
    assert count_tokens_upto(text, limit) == min(count_tokens(text), limit)
