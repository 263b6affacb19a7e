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
