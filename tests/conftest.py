"""Shared pytest fixtures; rig fixtures live in tests/rig/."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from supervisor import Supervisor
from tests.rig.aioquic_server import RigServer, echo_server
from tests.rig.certs import CertPair, generate_cert


@pytest.fixture(scope="session")
def cert(tmp_path_factory: pytest.TempPathFactory) -> CertPair:
    """Self-signed "localhost" certificate pair for every server of the session."""
    return generate_cert(tmp_path_factory.mktemp("cert"))


@pytest_asyncio.fixture
async def echo(cert: CertPair) -> AsyncIterator[RigServer]:
    """A stock aioquic echo server (ALPN "echo") on 127.0.0.1, random port."""
    async with echo_server(certfile=cert.certfile, keyfile=cert.keyfile) as server:
        yield server


@pytest_asyncio.fixture
async def sup() -> AsyncIterator[Supervisor]:
    """A Supervisor with migration enabled (the local runtime)."""
    async with Supervisor(enable_experimental_connection_migration=True) as supervisor:
        yield supervisor
