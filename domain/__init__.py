"""The AgentWorks domain: aggregates, events, value objects and pure policies.

Nothing here performs I/O or knows about Postgres, Kafka, HTTP or GraphQL; it may import only the
standard library, ``eventsourcing.domain`` and pydantic.
"""
