"""Fixtures shared by the flow-level integration tests."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="module")
def models_dir(prepared_models_dir, tutor_dir):
    # The smoke config's models (tiny-tutor, shared with the tutor tests) are prepared here once.
    path = prepared_models_dir
    old = os.environ.get("STILLHOUSE_MODELS_DIR")
    os.environ["STILLHOUSE_MODELS_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("STILLHOUSE_MODELS_DIR", None)
    else:
        os.environ["STILLHOUSE_MODELS_DIR"] = old
