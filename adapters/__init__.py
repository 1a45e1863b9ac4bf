"""Outward integrations: tokens, Postgres pools, Kafka, Redis, Stripe, LLM providers.

Each adapter translates its library's exceptions into :mod:`domain.errors` at the boundary, so no
third-party exception type leaks into commands, projections or the API.
"""
