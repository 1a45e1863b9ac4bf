"""The GraphQL API of AgentWorks (API.md): queries over the read models, mutations through the
write side's handlers, subscriptions over graphql-transport-ws.

Entry points: :class:`read_api.services.ApiServices` (what the composition root hands in) and
:func:`read_api.app.create_app` (the FastAPI application).
"""
