"""A Stripe fake for tests: ``localstripe`` (PyPI) on a free loopback port.

* ``localstripe_server`` (session): the server process, started once, stopped at session end.
* ``localstripe`` (function): its base URL with the store emptied first, so each test starts
  with no customers, items or invoices.

localstripe ignores ``Idempotency-Key``, takes integer-cent amounts only, creates an invoice
only from pending items and has no ``/finalize`` (``/pay`` and ``/void`` exist); tests of what
it lacks check the request we send instead, and say so. It refuses (HTTP 500) parameters it
does not model, so it is started with its invoice creation taught to ignore ``auto_advance``.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
from typing import TYPE_CHECKING
from uuid import UUID

import httpx
import pytest
import stripe

if TYPE_CHECKING:
    from collections.abc import Iterator

STRIPE_TEST_KEY = "sk_test_agentworks"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


#: ``python -m localstripe``, its invoice creation taking (and ignoring) ``auto_advance``,
#: which it does not model: it advances no invoice anyway.
_LAUNCH = """
from localstripe import resources, server
_create = resources.Invoice._api_create.__func__
def _api_create(cls, auto_advance=None, **data):
    return _create(cls, **data)
resources.Invoice._api_create = classmethod(_api_create)
server.start()
"""


@pytest.fixture(scope="session")
def localstripe_server() -> Iterator[str]:
    port = _free_port()
    workdir = tempfile.TemporaryDirectory(prefix="localstripe-")
    with open(f"{workdir.name}/log", "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", _LAUNCH, "--port", str(port), "--from-scratch"],
            cwd=workdir.name,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{base}/v1/customers", auth=(STRIPE_TEST_KEY, ""), timeout=1.0)
                break
            except httpx.TransportError:
                if process.poll() is not None or time.monotonic() > deadline:
                    with open(f"{workdir.name}/log") as failed:
                        tail = failed.read()[-2000:]
                    raise RuntimeError(
                        f"localstripe did not start on port {port}: {tail}"
                    ) from None
                time.sleep(0.1)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        workdir.cleanup()


@pytest.fixture
def localstripe(localstripe_server: str) -> str:
    """The fake's base URL, emptied for this test."""
    httpx.delete(f"{localstripe_server}/_config/data", timeout=5.0).raise_for_status()
    return localstripe_server


def stripe_client(base: str) -> stripe.StripeClient:
    return stripe.StripeClient(STRIPE_TEST_KEY, base_addresses={"api": base}, max_network_retries=0)


def provision_customer(base: str, workspace_id: UUID) -> str:
    """A Stripe customer of the workspace (found by our metadata look-up) with a $0 subscription.

    localstripe creates an invoice only for a customer with a subscription (real Stripe invoices
    pending items of any customer), so tests give each customer a free one; its $0 line adds
    nothing to any total.
    """
    client = stripe_client(base)
    customer = client.v1.customers.create(
        {"name": "Acme", "metadata": {"workspace_id": str(workspace_id)}}
    )
    subscribe(base, customer.id)
    return str(customer.id)


def subscribe(base: str, customer_id: str) -> None:
    client = stripe_client(base)
    product = client.v1.products.create({"name": "AgentWorks"})
    plan = client.v1.plans.create(
        {"amount": 0, "currency": "usd", "interval": "month", "product": product.id}
    )
    client.v1.subscriptions.create({"customer": customer_id, "items": [{"plan": plan.id}]})
