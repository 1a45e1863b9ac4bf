"""Where the schema marks a WebSocket operation as started (read_api.transport_ws)."""

from __future__ import annotations

from read_api.schema import build_schema
from read_api.transport_ws import OperationStarts


def test_the_start_mark_comes_after_every_other_extension() -> None:
    """``OperationStarts`` marks the operation started in ``on_execute``, which runs the
    extensions in their order: a check listed after it would refuse an operation already marked
    started, and the WebSocket would answer the refusal as if the subscription had run (``next``
    with errors, then ``complete``) instead of with an ``error`` message."""
    extensions = build_schema().extensions
    assert extensions[-1] is OperationStarts
    assert [e for e in extensions if e is OperationStarts] == [OperationStarts]
