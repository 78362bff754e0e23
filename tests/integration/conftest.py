"""Shared fixtures for the engine integration tests: one tiny build per session, reused everywhere."""

from __future__ import annotations

from pathlib import Path

import pytest

from voxcpm_api.engine.tiny import TinyCheckpoints, build_tiny_checkpoints


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache dir whose `tiny/` sub-folder holds the tiny build (as EngineConfig(cache_dir=...) expects)."""
    root = tmp_path_factory.mktemp("engine-cache")
    build_tiny_checkpoints(root / "tiny")
    return root


@pytest.fixture(scope="session")
def tiny_checkpoints(tiny_root: Path) -> TinyCheckpoints:
    return build_tiny_checkpoints(tiny_root / "tiny")  # already built: returns at once
