"""Shared test configuration: hypothesis profiles, the ``ca`` fixture
(a throwaway trustme CA and its PEM file) of the shell tests, and ``daemon``
(the daemon's handler over memory streams, in front of a real Service on a
real SQLite file).

``HYPOTHESIS_PROFILE=ci`` (what CI sets) is derandomized, keeps no example
database and runs 60 examples per property; ``dev`` (the default) runs 100
random examples; ``deep`` runs 5000 (for a long look at one
property). None has a deadline: timing assertions are explicit where
timing is the point (see test_core_wire.py).
"""

import os
from pathlib import Path

import pytest
import trio
import trustme
from hypothesis import HealthCheck, settings

from shellhelpers import InMemory, make_env
from scaiwave_federation.shell.config import load_config
from scaiwave_federation.shell.runtime.service import Service
from scaiwave_federation.shell.store.store import Store

settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.register_profile("deep", max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture
def ca(tmp_path: Path) -> tuple[trustme.CA, Path]:
    authority = trustme.CA()
    path = tmp_path / "ca.pem"
    authority.cert_pem.write_to_path(str(path))
    return authority, path


@pytest.fixture
async def daemon(tmp_path: Path, ca: tuple[trustme.CA, Path], nursery: trio.Nursery):
    authority, ca_path = ca
    config = load_config(make_env(tmp_path / "your-host", ca_path, authority, "your-host.test"))
    service = await Service.open(config)
    yield InMemory(service, nursery)
    await service.aclose()


@pytest.fixture
def store(tmp_path: Path):
    """A real SQLite store in a fresh data directory."""
    s = Store.open(tmp_path / "data")
    yield s
    s.close()
