"""A Tune search's state survives a writer killed mid-write, and a state cut off anyway is set aside, not restored."""

from __future__ import annotations

import json
import pickle
import signal
import subprocess
import sys
import textwrap

import pyarrow.fs
from ray import tune

from hpmkd.components.tune_storage import (SET_ASIDE_INFIX, readable, resumable, search_storage, unreadable_state,
                                           whole_pickle)


def test_a_file_appears_under_its_name_only_once_it_is_whole(tmp_path):
    fs, root = search_storage(str(tmp_path))
    target = f"{root}/state.json"
    with fs.open_output_stream(target) as f:
        f.write(b'{"version": 1}')
    stream = fs.open_output_stream(target)
    stream.write(b'{"version": ')  # the new version, half written
    assert json.loads((tmp_path / "state.json").read_bytes()) == {"version": 1}
    stream.write(b"2}")
    stream.close()
    assert json.loads((tmp_path / "state.json").read_bytes()) == {"version": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporary file left


def test_a_copy_killed_mid_write_leaves_the_previous_version_whole(tmp_path):
    (tmp_path / "state.json").write_text('{"version": 1}')
    writer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from hpmkd.components.tune_storage import search_storage
        fs, root = search_storage({str(tmp_path)!r})
        stream = fs.open_output_stream(root + "/state.json")
        stream.write(b'{{"version": ')
        stream.flush()
        print("written", flush=True)
        time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "written"
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert json.loads((tmp_path / "state.json").read_bytes()) == {"version": 1}
    partial = [p for p in tmp_path.iterdir() if p.name != "state.json"]
    assert len(partial) == 1 and partial[0].read_bytes() == b'{"version": '  # cut off, beside it, never read


def test_pyarrow_copies_a_folder_through_it(tmp_path):
    source = tmp_path / "staging"
    (source / "trial_0").mkdir(parents=True)
    (source / "experiment_state-1.json").write_text('{"trials": 1}')
    (source / "trial_0" / "result.json").write_bytes(b"x" * 100_000)
    fs, root = search_storage(str(tmp_path / "storage"))
    fs.create_dir(root)
    pyarrow.fs.copy_files(str(source), root, source_filesystem=pyarrow.fs.LocalFileSystem(), destination_filesystem=fs)
    assert (tmp_path / "storage" / "experiment_state-1.json").read_text() == '{"trials": 1}'
    assert (tmp_path / "storage" / "trial_0" / "result.json").read_bytes() == b"x" * 100_000


def test_a_uri_is_left_to_the_file_system_it_names(tmp_path):
    fs, path = search_storage(f"file://{tmp_path}")
    assert isinstance(fs, pyarrow.fs.LocalFileSystem) and path == str(tmp_path)


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
