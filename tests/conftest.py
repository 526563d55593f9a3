"""Shared test configuration: hypothesis profiles, the ``ca`` fixture
(a throwaway trustme CA and its PEM file) of the shell tests, and ``daemon``
(the daemon's handler over memory streams, in front of a real Service on a
real SQLite file), ``pg`` (one real PostgreSQL server for the whole run, see
pghelpers.py) and ``store`` (a real store on each backend: the storage tests
run twice, on SQLite and on PostgreSQL).

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

import pghelpers
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


@pytest.fixture(scope="session")
def pg():
    """One real PostgreSQL server for the run (started on first use, < 1 s)."""
    server = pghelpers.start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request) -> str:
    """Each backend in turn: a test that takes it runs once on each."""
    return request.param


@pytest.fixture
def store_target(backend: str, tmp_path: Path, request) -> str | Path:
    """Where a fresh, empty store lives: a data directory, or a new PostgreSQL database's URL."""
    if backend == "sqlite":
        return tmp_path / "data"
    return request.getfixturevalue("pg").fresh()


@pytest.fixture
def store(backend: str, tmp_path: Path, request):
    """A real store in a fresh database, on each backend: a SQLite file in a
    fresh data directory, a fresh PostgreSQL database (already migrated)."""
    if backend == "sqlite":
        s = Store.open(tmp_path / "data")
    else:
        s = Store.open(request.getfixturevalue("pg").migrated())
    yield s
    s.close()
