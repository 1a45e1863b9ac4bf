"""How a command is recognised when it is sent again."""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from commands.models import Command


def fingerprint(command: Command) -> str:
    """A digest of what the command asks for, so a reused id with other content is caught."""
    body = command.model_dump(mode="json", exclude={"command_id", *command.sent_at_fields})
    canonical = json.dumps([type(command).__name__, body], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
