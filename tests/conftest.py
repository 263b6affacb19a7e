"""Shared fixtures: paths to policy samples and a clean environment for every test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
BOOKINFO = DATA / "bookinfo"


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Tests never see the developer's MESHLIB_* or Downward API variables."""
    import os

    for name in list(os.environ):
        if name.startswith("MESHLIB_") or name in ("POD_NAMESPACE", "POD_NAME", "SERVICE_ACCOUNT"):
            monkeypatch.delenv(name)
    yield


@pytest.fixture(autouse=True)
def fresh_warning_limits() -> None:
    """Each test starts with the caller-warning limits of meshlib.telemetry.log_limit open: a
    warning an earlier test logged does not hold back the one a test looks for."""
    import logging

    from meshlib.telemetry.log_limit import BAGGAGE_LOGGER, OnePerInterval

    for limit in logging.getLogger(BAGGAGE_LOGGER).filters:
        if isinstance(limit, OnePerInterval):
            limit.reset()


def pytest_configure(config: pytest.Config) -> None:
    """The tests run the build they say: the compiled one under MESHLIB_COMPILED=1 (`make
    unit-compiled`), else the sources (a stray .so beside them, or a wheel installed over the
    editable install, would shadow every edit)."""
    import importlib.machinery
    import os

    import meshlib.asgi

    where = meshlib.asgi.__file__ or ""
    compiled = where.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
    if os.environ.get("MESHLIB_COMPILED") == "1":
        if not compiled:
            raise pytest.UsageError(f"MESHLIB_COMPILED=1 but meshlib.asgi is {where}")
    elif compiled:
        raise pytest.UsageError(
            f"meshlib.asgi is compiled ({where}) but MESHLIB_COMPILED is not set: remove the"
            " .so files from the tree (make clean) or reinstall it editable (pip install -e .)"
        )
