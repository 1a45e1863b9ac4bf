"""The orchestrator: executes requested agent runs (``agentworks orchestrator``).

It follows the event log for agent-run events (never a status column), claims a QUEUED run with
an optimistic ``Started`` event (a second orchestrator's claim conflicts), streams the agent's
LLM calls through the router, and writes log chunks, attempts, charges and the outcome back as
commands. It sits beside ``commands/``: it orchestrates domain decisions and talks to providers
through ``adapters/``; ``infra/`` builds it.
"""
