"""Shared test set-up: hypothesis profiles and tiled backends with tiny tiles.

Hypothesis draws a fresh seed each run (``derandomize`` stays off): every run tests new random
inputs. ``HYPOTHESIS_PROFILE=thorough`` runs many more examples.
"""

import os
import shutil

import pytest
from hypothesis import HealthCheck, settings

import qkv.backends as backends
from qkv.backends import TiledBackend, TileSizes
from tests.background import CHILDREN

settings.register_profile("default", max_examples=30, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=500, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

#: Tiled variants whose tiles are small and uneven, so that tests with short sequences still cross
#: many tile boundaries, ragged tails, merged runs and run splits.
SMALL_TILED = {
    "tiled_16x8": TileSizes(block_q=16, block_k=8, max_run=24),
    "tiled_8x16": TileSizes(block_q=8, block_k=16, max_run=64),
}


@pytest.fixture(scope="module")
def small_tiled_backends():
    """Register the small-tile variants for one test module (modules opt in with
    ``pytestmark = pytest.mark.usefixtures("small_tiled_backends")``), so that other modules and
    the docs see the registry users see."""
    for name, sizes in SMALL_TILED.items():
        backends.register(TiledBackend(sizes, name=name))
    yield
    for name in SMALL_TILED:
        backends.REGISTRY.pop(name, None)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny BERT saved by ``save_pretrained``; tests that damage it work on a copy."""
    from tests.fixtures.tiny_bert import save_tiny  # imports transformers: only where used

    return save_tiny(tmp_path_factory.mktemp("tiny") / "bert")


@pytest.fixture
def tiny_copy(tiny_dir, tmp_path):
    return shutil.copytree(tiny_dir, tmp_path / "copy")


def _skipped(item) -> bool:
    """Does a skip mark already say the test will skip? (Its conditions here are booleans.)"""
    if item.get_closest_marker("skip") is not None:
        return True
    return any(bool(mark.args[0]) for mark in item.iter_markers("skipif") if mark.args)


def pytest_collection_finish(session):
    """Start the background children (tests/background.py) of the tests that will run."""
    for item in session.items:
        mark = item.get_closest_marker("background_child")
        if mark is not None and not _skipped(item):
            CHILDREN[mark.args[0]].start()


def pytest_sessionfinish(session):
    for child in CHILDREN.values():
        child.stop()
