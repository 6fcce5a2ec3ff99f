"""Fixtures over tiny_runs: the session's data cache and its finished reference run of the tiny demo."""
from pathlib import Path

import pytest

from tiny_runs import copy_run, session_cache_dir, session_finished_run, tree_digest


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return session_cache_dir(tmp_path_factory)


@pytest.fixture(scope="session", autouse=True)
def _spdf_cache(cache_dir):
    # session-wide, so that module-scoped runs (set up before any function-scoped fixture) use it too: they wrote
    # their token caches into the user's ~/.cache/spdf
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPDF_CACHE_DIR", str(cache_dir))
        yield


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory) -> dict:
    """{"run_dir", "recipe" (a YAML file of the same recipe), "digest"} of `spdf run` of the tiny demo."""
    return session_finished_run(tmp_path_factory)


@pytest.fixture
def finished_copy(finished_run, tmp_path) -> tuple[Path, Path]:
    """(run_dir, recipe file) of a private copy of the finished run."""
    return copy_run(finished_run["run_dir"], tmp_path / "run", tmp_path / "tiny.yaml")


@pytest.fixture
def untouched(finished_run):
    """Asserts after the test that the shared finished run is byte for byte what it was."""
    yield finished_run
    assert tree_digest(finished_run["run_dir"]) == finished_run["digest"]
