"""LLM providers behind one streaming interface: ``simulated`` (offline), ``openai``, ``anthropic``.

Each adapter speaks its provider's real HTTP wire format over httpx and turns every library or
HTTP failure into :class:`~adapters.providers.base.TransientProviderError` (worth retrying) or
:class:`~adapters.providers.base.PermanentProviderError` (not).
"""
