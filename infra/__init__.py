"""Composition root of AgentWorks: settings, wiring, the ``agentworks`` CLI, SQL migrations.

This is the only package that reads environment variables or builds clients, pools and
applications; everything else receives what it needs through typed parameters.
"""
