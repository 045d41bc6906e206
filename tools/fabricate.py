"""Stand-ins for the inputs a paper preset reads, made on the spot: real file formats, random content.

- `imagenet_tree`: ImageFolder train/ and val/ of real image files with the quirks of ImageNet itself: JPEGs of
  varied sizes and aspect ratios around 500x375, a grayscale JPEG, a CMYK JPEG (ImageNet train has 22) and a PNG
  saved under a .JPEG name (it has one).
- `cifar10_files` / `write_cifar10_archive`: `cifar-10-python.tar.gz` in the official format (Python 2 pickles
  of dicts with bytes keys, the R, G and B planes of each image in one uint8 row).
- `checkpoint`: a released checkpoint in its authors' layout with random weights at a preset's real shapes: the
  flat DMAE state dict, MAE's encoder-only {'model': ...}, or a timm classifier (fc_norm + head).

Used by `dmae rehearse` and by the tests.
"""

from __future__ import annotations

import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dmae.models.architectures import ModelConfig
from dmae.models.autoencoder import DenoisingMAE, encoder_state_dict_from
from dmae.models.classifier import Classifier

IMAGENET_SIZE = (500, 375)  # (width, height) of most ImageNet photos
CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
CIFAR_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
CHECKPOINT_KINDS = ("autoencoder", "encoder", "classifier")


# -- ImageNet ------------------------------------------------------------------------------------------------

def photo(rng: np.random.Generator, label: int, size: tuple[int, int], noise: float = 20) -> np.ndarray:
    """An RGB image [H, W, 3] whose mean colour depends on the class, with smooth structure and `noise` (its
    std sets how well JPEG compresses it: 20 gives ~65 KB at 500x375, 34 ImageNet's ~108 KB)."""
    w, h = size
    base = np.array([(label * 67) % 256, (label * 139) % 256, (label * 29) % 256], dtype=np.float64)
    yy, xx = np.mgrid[0:h, 0:w]
    wave = 60 * np.sin(xx / (7 + label) + rng.uniform(0, 6)) * np.cos(yy / 11 + rng.uniform(0, 6))
    pixels = base + wave[..., None] + rng.normal(0, noise, size=(h, w, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def photo_size(rng: np.random.Generator) -> tuple[int, int]:
    """Around 500x375, landscape or portrait, as ImageNet's photos are."""
    w, h = (int(v * rng.uniform(0.6, 1.2)) for v in IMAGENET_SIZE)
    return (w, h) if rng.random() < 0.75 else (h, w)


def imagenet_tree(root: str | Path, classes: int = 5, train_per_class: int = 20, val_per_class: int = 4,
                  seed: int = 0) -> dict[str, Path]:
    """Write root/{train,val}/<wnid>/*.JPEG; returns the quirky files by quirk: 'grayscale', 'cmyk' (JPEGs in
    those modes) and 'png' (a PNG under a .JPEG name), all in train/, as in ImageNet."""
    root, rng = Path(root), np.random.default_rng(seed)
    wnids = [f"n{1440764 + 1000 * c:08d}" for c in range(classes)]
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for label, wnid in enumerate(wnids):
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                number = label * count + i + 1
                name = f"{wnid}_{i + 1}.JPEG" if split == "train" else f"ILSVRC2012_val_{number:08d}.JPEG"
                image = Image.fromarray(photo(rng, label, photo_size(rng)))
                image.save(folder / name, format="JPEG", quality=int(rng.integers(75, 96)))
    first = root / "train" / wnids[0]
    quirks = {"grayscale": first / f"{wnids[0]}_1.JPEG", "cmyk": first / f"{wnids[0]}_2.JPEG",
              "png": first / f"{wnids[0]}_3.JPEG"}
    image = Image.fromarray(photo(rng, 0, photo_size(rng)))
    image.convert("L").save(quirks["grayscale"], format="JPEG", quality=90)
    image.convert("CMYK").save(quirks["cmyk"], format="JPEG", quality=90)
    image.save(quirks["png"], format="PNG")
    return quirks


# -- CIFAR-10 ------------------------------------------------------------------------------------------------

class _Py2Pickler(pickle._Pickler):
    """Writes str and bytes as Python 2 byte strings, as in the official batches (pickled by Python 2)."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_string(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = save_py2_string
    dispatch[bytes] = save_py2_string


def official_pickle(obj) -> bytes:
    """`obj` pickled as the official batches are (protocol 2, Python 2 strings, NumPy 1's module path)."""
    buffer = io.BytesIO()
    _Py2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def cifar10_files(per_batch: int = 4, seed: int = 0) -> tuple[dict[str, bytes], dict[str, tuple]]:
    """The archive's files (name -> bytes) and, per batch, the images [N, 32, 32, 3] and labels written into
    them; label i of batch b is (b * per_batch + i) % 10."""
    rng = np.random.default_rng(seed)
    files, written = {}, {}
    for b, name in enumerate(CIFAR_BATCHES):
        hwc = rng.integers(0, 256, size=(per_batch, 32, 32, 3), dtype=np.uint8)
        labels = [(b * per_batch + i) % 10 for i in range(per_batch)]
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": hwc.transpose(0, 3, 1, 2).reshape(
            per_batch, 3072), b"filenames": [f"img{i}.png".encode() for i in range(per_batch)]}
        files[name], written[name] = official_pickle(batch), (hwc, labels)
    files["batches.meta"] = official_pickle({b"label_names": CIFAR_NAMES, b"num_vis": 3072,
                                             b"num_cases_per_batch": per_batch})
    return files, written


def write_cifar10_folder(root: str | Path, files: dict[str, bytes]) -> Path:
    folder = Path(root) / CIFAR_FOLDER
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def write_cifar10_archive(root: str | Path, files: dict[str, bytes]) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    archive = root / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{CIFAR_FOLDER}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return archive


# -- released checkpoints ------------------------------------------------------------------------------------

def checkpoint(path: str | Path, kind: str, cfg: ModelConfig, num_classes: int = 1000, seed: int = 0) -> Path:
    """torch.save a state dict of random weights at cfg's shapes in the layout its authors released:
    'autoencoder' the flat DMAE dict (encoder + decoder, MAE names), 'encoder' MAE's {'model': encoder},
    'classifier' a timm ViT fine-tuned with average pooling (fc_norm, head)."""
    if kind not in CHECKPOINT_KINDS:
        raise ValueError(f"kind must be one of {CHECKPOINT_KINDS}, got {kind!r}")
    with torch.device("meta"):  # shapes only: no weights are built twice
        if kind == "classifier":
            shapes = {k.removeprefix("vit."): v.shape for k, v in Classifier(cfg, num_classes).state_dict().items()}
        else:
            state = DenoisingMAE(cfg).state_dict()
            shapes = {k: v.shape for k, v in (encoder_state_dict_from(state) if kind == "encoder" else state).items()}
    gen = torch.Generator().manual_seed(seed)
    weights = {k: torch.randn(shape, generator=gen) * 0.02 for k, shape in shapes.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": weights} if kind == "encoder" else weights, path)
    return path
