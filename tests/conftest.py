"""Shared test set-up: asib's cache (the measured inference plans) goes to a temporary folder,
never the user's ~/.cache/asib."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _asib_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["ASIB_CACHE_DIR"] = str(tmp_path_factory.mktemp("asib_cache"))
