"""A Tune search whose state a killed driver cut off is set aside, not half-restored; a whole one restores."""

from __future__ import annotations

import pickle

import pyarrow.fs
from ray import tune

from hpmkd.components.tune_storage import (SET_ASIDE_INFIX, readable, resumable, search_storage, unreadable_state,
                                           whole_pickle)


def test_a_folder_or_uri_gets_its_own_file_system(tmp_path, monkeypatch):
    fs, path = search_storage(f"file://{tmp_path}")
    assert isinstance(fs, pyarrow.fs.LocalFileSystem) and path == str(tmp_path)
    monkeypatch.chdir(tmp_path)
    fs, path = search_storage("ray")
    assert isinstance(fs, pyarrow.fs.LocalFileSystem) and path == str(tmp_path / "ray")


def test_a_state_file_is_whole_only_up_to_its_pickle_stop_or_json_end():
    data = pickle.dumps({"_counter": 2, "points": [{"T": 4.0}]})
    assert whole_pickle(data) and readable(data)
    assert not any(whole_pickle(data[:n]) for n in range(len(data)))  # every cut, the empty file included
    assert readable(b'{"trials": []}') and not readable(b'{"trials": [')


def _tiny_search(storage: tuple[pyarrow.fs.FileSystem, str], name: str) -> tune.Tuner:
    fs, root = storage
    return tune.Tuner(lambda config: tune.report({"score": config["x"]}),
                      param_space={"x": tune.uniform(0, 1)},
                      tune_config=tune.TuneConfig(metric="score", mode="max", num_samples=2),
                      run_config=tune.RunConfig(name=name, storage_path=root, storage_filesystem=fs, verbose=0))


def test_a_search_with_a_cut_off_state_is_set_aside_and_a_whole_one_restores(ray_session, tmp_path):
    storage = search_storage(str(tmp_path))
    fs, root = storage
    assert _tiny_search(storage, "search").fit().num_errors == 0
    path = f"{root}/search"
    assert unreadable_state(fs, path) is None and resumable(fs, path)
    assert len(tune.Tuner.restore(path, trainable=lambda config: None, storage_filesystem=fs).get_results()) == 2

    searcher_state = next(p for p in (tmp_path / "search").glob("*-state-*.json"))  # Tune's searcher state, a pickle
    searcher_state.write_bytes(searcher_state.read_bytes()[:10])  # what a copy killed mid-write left before
    assert unreadable_state(fs, path) == searcher_state.name
    assert not resumable(fs, path)
    assert not (tmp_path / "search").exists()
    aside = [p for p in tmp_path.iterdir() if p.name.startswith(f"search{SET_ASIDE_INFIX}")]
    assert len(aside) == 1 and (aside[0] / searcher_state.name).stat().st_size == 10  # kept, to look at
    assert not resumable(fs, path)  # nothing left to restore: the stage starts the search again
