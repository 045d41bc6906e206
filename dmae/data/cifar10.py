"""CIFAR-10 from the official python archive (or its extracted folder), read without trusting its pickles."""

from __future__ import annotations

import codecs
import io
import os
import pickle
import tarfile
import zlib
from pathlib import Path

import numpy as np

from dmae.data.common import building_dir, check_split_options, holdout, save_tensor_split, write_meta
from dmae.util.errors import UserError

ARCHIVE = "cifar-10-python.tar.gz"
FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
FILES = (*TRAIN_BATCHES, "test_batch", "batches.meta")
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2471, 0.2435, 0.2616)
NUM_CLASSES = 10
ROW = 3 * 32 * 32  # one image: the R plane, then G, then B, each 32x32 row-major


def _numpy_globals() -> dict[tuple[str, str], object]:
    """The only globals a batch may name: numpy's array, dtype and scalar rebuilders, and the bytes codec
    that protocol-2 pickles written by Python 3 use."""
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): codecs.encode}
    for core in ("numpy.core", "numpy._core"):  # NumPy 1 and NumPy 2 spellings
        allowed[(f"{core}.multiarray", "_reconstruct")] = np.zeros(1).__reduce__()[0]
        allowed[(f"{core}.multiarray", "scalar")] = np.int64(0).__reduce__()[0]
        allowed[(f"{core}.numeric", "_frombuffer")] = np.zeros(1).__reduce_ex__(5)[0]  # pickle protocol 5
    return allowed


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """A pickle can run any code on load; this one resolves only the numpy globals needed to rebuild arrays
    (see _numpy_globals) and refuses every other global, so a tampered batch fails instead of executing."""

    _allowed = _numpy_globals()

    def find_class(self, module: str, name: str):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed") from None


def safe_unpickle(source: str, data: bytes) -> object:
    try:
        return _NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()
    except Exception as err:  # any failure means a malformed or tampered file
        raise UserError(f"{source} is not a valid CIFAR-10 batch: {err}") from None


def _field(batch: object, key: str, source: str):
    if isinstance(batch, dict):
        for k in (key.encode(), key):
            if k in batch:
                return batch[k]
    raise UserError(f"{source} has no '{key}' entry; is it a CIFAR-10 python batch?")


def _parse_batch(source: str, data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N, 3, 32, 32] and labels int64 [N] of one batch file."""
    batch = safe_unpickle(source, data)
    images, labels = _field(batch, "data", source), _field(batch, "labels", source)
    if not (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 2
            and images.shape[1] == ROW):
        shape = getattr(images, "shape", type(images).__name__)
        raise UserError(f"{source}: 'data' must be a uint8 array of shape [N, {ROW}], got {shape}")
    labels = np.asarray(labels)
    if labels.shape != (len(images),) or labels.dtype.kind not in "iu":
        raise UserError(f"{source}: 'labels' must be {len(images)} integers, got shape {labels.shape}")
    if len(labels) and not 0 <= labels.min() <= labels.max() < NUM_CLASSES:
        raise UserError(f"{source}: label out of range 0..{NUM_CLASSES - 1} (found {labels.min()}..{labels.max()})")
    return images.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _class_names(source: str, data: bytes) -> list[str]:
    names = _field(safe_unpickle(source, data), "label_names", source)
    if not (isinstance(names, list) and len(names) == NUM_CLASSES):
        raise UserError(f"{source}: 'label_names' must list {NUM_CLASSES} names")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def _read_archive(archive: Path, hint: str) -> dict[str, tuple[str, bytes]]:
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = {m.name: m for m in tar.getmembers() if m.isfile()}
            missing = [n for n in FILES if f"{FOLDER}/{n}" not in members]
            if missing:
                raise UserError(f"{archive} lacks {', '.join(f'{FOLDER}/{n}' for n in missing)}; {hint}")
            return {n: (f"{FOLDER}/{n} in {archive}", tar.extractfile(members[f"{FOLDER}/{n}"]).read())
                    for n in FILES}
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise UserError(f"cannot read {archive}: {err}; {hint}") from None


def _download(root: Path) -> None:
    from torchvision.datasets import CIFAR10  # only needed here

    try:
        CIFAR10(str(root), train=True, download=True)  # fetches the archive and extracts FOLDER into root
    except (OSError, RuntimeError) as err:
        raise UserError(f"downloading CIFAR-10 into {root} failed: {err}") from None


def _read_files(root: Path, download: bool) -> dict[str, tuple[str, bytes]]:
    """Map each file name in FILES to (a description of where it came from, its bytes)."""
    folder, archive = root / FOLDER, root / ARCHIVE
    hint = (f"put {ARCHIVE} (or its extracted {FOLDER}/) in {root}, "
            "or set data.download: true on a machine with internet")
    if not folder.is_dir() and not archive.is_file():
        if not download:
            raise UserError(f"CIFAR-10 not found: neither {folder} nor {archive} exists; {hint}")
        _download(root)
    if not folder.is_dir():
        return _read_archive(archive, hint)
    missing = [n for n in FILES if not (folder / n).is_file()]
    if missing:
        raise UserError(f"CIFAR-10 folder {folder} lacks {', '.join(missing)}; {hint}")
    return {n: (str(folder / n), (folder / n).read_bytes()) for n in FILES}


def prepare(out_dir: str | os.PathLike, *, root: str | os.PathLike = "data/raw", download: bool = False,
            val_fraction: float = 0.1, seed: int = 0, test_every: int = 1) -> dict:
    """Write train/val/test safetensors (3x32x32 uint8) and meta.json into `out_dir`."""
    check_split_options(val_fraction, test_every)
    files = _read_files(Path(root), download)
    class_names = _class_names(*files["batches.meta"])
    batches = [_parse_batch(*files.pop(n)) for n in TRAIN_BATCHES]
    train_images = np.concatenate([b[0] for b in batches])
    train_labels = np.concatenate([b[1] for b in batches])
    test_images, test_labels = _parse_batch(*files.pop("test_batch"))

    train, val = holdout(np.arange(len(train_labels)), train_labels, val_fraction, seed, "validation")
    test = np.arange(0, len(test_labels), test_every)
    parts = {"train": (train_images[train], train_labels[train]), "val": (train_images[val], train_labels[val]),
             "test": (test_images[test], test_labels[test])}
    with building_dir(out_dir) as out:
        for split, (images, labels) in parts.items():
            save_tensor_split(out, split, images, labels)
        return write_meta(out, dataset="cifar10", storage="safetensors", class_names=class_names, channels=3,
                          image_size=32, mean=MEAN, std=STD,
                          splits={split: len(labels) for split, (_, labels) in parts.items()})
