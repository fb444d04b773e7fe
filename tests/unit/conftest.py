"""Fixtures the unit tests share."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def exported_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model root with both models (untrained, small: the tumor model at 64 px), as training
    leaves it; exported once per session (the tumor model takes ~20 s). Tests only read it;
    a test that changes a root copies what it needs."""
    from prolifscore.core.models.export import export_untrained

    root = tmp_path_factory.mktemp("exported")
    export_untrained(root, "tumor", input_size=64)
    export_untrained(root, "mitosis")
    return root
