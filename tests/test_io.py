"""jaxeif.io: atomic files and folders, JSON, orbax checkpoints."""

import json

import numpy as np
import pytest

from jaxeif import io


class Crash(Exception):
    pass


def test_atomic_file_keeps_the_old_content_on_a_crash(tmp_path):
    path = tmp_path / "a.bin"
    with io.atomic_file(path) as fh:
        fh.write(b"old")
    with pytest.raises(Crash), io.atomic_file(path) as fh:
        fh.write(b"half")
        raise Crash
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_atomic_dir_renames_into_place_and_a_first_writer_wins(tmp_path):
    target = tmp_path / "cache" / "k"
    with io.atomic_dir(target) as tmp:
        (tmp / "f.json").write_text("1")
    with io.atomic_dir(target) as tmp:  # another writer got there first: its folder is kept
        (tmp / "f.json").write_text("2")
    assert (target / "f.json").read_text() == "1" and [p.name for p in target.parent.iterdir()] == ["k"]
    with pytest.raises(Crash), io.atomic_dir(tmp_path / "other") as tmp:
        raise Crash
    assert not (tmp_path / "other").exists() and not tmp.exists()


def test_save_json_converts_numpy_and_names_what_cannot_be_saved(tmp_path):
    path = io.save_json(tmp_path / "x.json", {"b": np.float32(0.5), "a": (1, np.arange(2))})
    assert json.loads(path.read_text()) == {"a": [1, [0, 1]], "b": 0.5}
    with pytest.raises(TypeError, match=r"x.json\['c'\] is a object"):
        io.save_json(path, {"c": object()})
    assert json.loads(path.read_text())["b"] == 0.5


def test_checkpoint_manager_keeps_the_last_steps_and_restores(tmp_path):
    like = {"lr": np.zeros(3, np.float32), "step": np.zeros((), np.int32)}
    manager = io.checkpoint_manager(tmp_path / "meta", max_to_keep=2)
    try:
        assert manager.latest_step() is None
        for s in range(4):
            io.save_step(manager, s, {"lr": np.full(3, s, np.float32), "step": np.asarray(s, np.int32)})
        assert manager.latest_step() == 3
        state = io.restore_step(manager, 3, like)
    finally:
        manager.close()
    assert np.array_equal(state["lr"], np.full(3, 3.0, np.float32))
    assert sorted(p.name for p in (tmp_path / "meta").iterdir() if p.name.isdigit()) == ["2", "3"]


def test_checkpoint_folder_round_trip_and_metadata(tmp_path):
    tree = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    io.save_checkpoint(tmp_path / "weights", tree)
    out = io.restore_checkpoint(tmp_path / "weights", {"w": np.zeros((2, 3), np.float32)})
    assert np.array_equal(out["w"], tree["w"])
    assert tuple(io.checkpoint_metadata(tmp_path / "weights").item_metadata["w"].shape) == (2, 3)
