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


def pytest_configure(config: pytest.Config) -> None:
    """Under MESHLIB_COMPILED=1 (`make unit-compiled`) the tests must run the compiled build."""
    import importlib.machinery
    import os

    if os.environ.get("MESHLIB_COMPILED") == "1":
        import meshlib.asgi

        where = meshlib.asgi.__file__ or ""
        if not where.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)):
            raise pytest.UsageError(f"MESHLIB_COMPILED=1 but meshlib.asgi is {where}")
