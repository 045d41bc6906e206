"""Data preparation and loading, on the bundled digits and on fabricated CIFAR-10 and ImageNet copies."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from sklearn.datasets import load_digits

from dmae.data import load_split, prepare_dataset, read_meta
from dmae.data.cifar10 import safe_unpickle
from dmae.util.errors import UserError
from tools.fabricate import cifar10_files, imagenet_tree, official_pickle, write_cifar10_archive, write_cifar10_folder


FLIP = {"crop_scale": None, "crop_ratio": None, "hflip": 0.5, "rand_augment": None, "erase_prob": 0.0,
        "erase_mode": "const", "erase_count": 1}
PAPER = {**FLIP, "crop_scale": (0.08, 1.0), "crop_ratio": (0.75, 4 / 3), "rand_augment": "rand-m9-mstd0.5-inc1"}


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ---------------------------------------------------------------- digits

@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits") / "prepared"
    prepare_dataset("digits", out, image_size=16, val_fraction=0.1, seed=0)
    return out


def test_digits_meta_and_split_sizes(digits_dir):
    meta = read_meta(digits_dir)
    assert meta["dataset"] == "digits" and meta["num_classes"] == 10 and meta["channels"] == 1
    assert meta["image_size"] == 16
    assert meta["splits"] == {"train": 1293, "val": 144, "test": 360}
    assert len(meta["mean"]) == len(meta["std"]) == 1
    train = load_file(str(digits_dir / "train.safetensors"))
    expected_mean = train["images"].double().div(255).mean().item()
    assert meta["mean"][0] == round(expected_mean, 4)
    assert sorted(p.name for p in digits_dir.iterdir()) == [
        "meta.json", "test.safetensors", "train.safetensors", "val.safetensors"]


def test_digits_items_and_stratification(digits_dir):
    for split, n in [("train", 1293), ("val", 144), ("test", 360)]:
        tensors = load_file(str(digits_dir / f"{split}.safetensors"))
        assert tensors["images"].dtype == torch.uint8 and tensors["images"].shape == (n, 1, 16, 16)
        assert tensors["labels"].dtype == torch.int64
        assert set(tensors["labels"].tolist()) == set(range(10))  # stratified: every class in every split
        ds = load_split(digits_dir, split)
        x, y = ds[0]
        assert len(ds) == n and x.dtype == torch.float32 and x.shape == (1, 16, 16)
        assert 0 <= x.min() and x.max() <= 1 and isinstance(y, int)
    for augment in (FLIP, PAPER):
        x, _ = load_split(digits_dir, "train", augment=augment)[3]
        assert x.shape == (1, 16, 16) and 0 <= x.min() and x.max() <= 1


def test_digits_native_size_pixels_and_options(tmp_path):
    meta = prepare_dataset("digits", tmp_path / "d", image_size=8, val_fraction=0.0, test_every=3)
    assert meta["splits"] == {"train": 1437, "val": 0, "test": 120}
    train = load_file(str(tmp_path / "d" / "train.safetensors"))
    bunch = load_digits()
    expected = np.round(bunch.images / 16 * 255).astype(np.uint8)
    images, labels = train["images"].numpy()[:, 0], train["labels"].numpy()
    # every stored image is one of the originals with its own label (splits keep the original order)
    originals = {(img.tobytes(), int(t)) for img, t in zip(expected, bunch.target)}
    assert all((img.tobytes(), int(t)) in originals for img, t in zip(images, labels))
    assert len(load_split(tmp_path / "d", "val")) == 0


def test_digits_deterministic_and_replaces_stale_output(tmp_path, digits_dir):
    out = tmp_path / "again"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    (tmp_path / ".again.partial").mkdir()  # leftover of a crashed run
    prepare_dataset("digits", out, image_size=16, val_fraction=0.1, seed=0)
    assert folder_bytes(out) == folder_bytes(digits_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]
    prepare_dataset("digits", out, image_size=16, val_fraction=0.1, seed=1)
    assert folder_bytes(out)["val.safetensors"] != folder_bytes(digits_dir)["val.safetensors"]


def test_bad_options_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="mnist"):
        prepare_dataset("mnist", tmp_path / "x")
    with pytest.raises(UserError, match="download"):
        prepare_dataset("digits", tmp_path / "x", download=True)
    with pytest.raises(UserError, match="val_fraction"):
        prepare_dataset("digits", tmp_path / "x", val_fraction=1.0)
    with pytest.raises(UserError, match="test_every"):
        prepare_dataset("digits", tmp_path / "x", test_every=0)
    assert not (tmp_path / "x").exists()


def test_missing_prepared_split(tmp_path, digits_dir):
    with pytest.raises(UserError, match=re.escape(str(tmp_path / "meta.json"))):
        load_split(tmp_path, "train")
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "meta.json").write_bytes((digits_dir / "meta.json").read_bytes())
    with pytest.raises(UserError, match=re.escape(str(copy / "test.safetensors"))):
        load_split(copy, "test")
    with pytest.raises(UserError, match="split"):
        load_split(digits_dir, "holdout")


# ---------------------------------------------------------------- CIFAR-10

PER_BATCH = 4


def fake_cifar_batches():
    return cifar10_files(PER_BATCH)


def test_cifar_folder_pixels_labels_and_layout(tmp_path):
    files, written = fake_cifar_batches()
    write_cifar10_folder(tmp_path / "raw", files)
    meta = prepare_dataset("cifar10", tmp_path / "out", root=tmp_path / "raw", val_fraction=0.0)
    assert meta["splits"] == {"train": 20, "val": 0, "test": 4}
    assert meta["class_names"][0] == "airplane" and meta["channels"] == 3 and meta["image_size"] == 32
    assert meta["mean"] == [0.4914, 0.4822, 0.4465]
    train = load_split(tmp_path / "out", "train")
    for k in range(20):
        hwc, labels = written[f"data_batch_{k // PER_BATCH + 1}"]
        x, y = train[k]
        assert x.shape == (3, 32, 32) and y == labels[k % PER_BATCH]
        # channel c of item == channel c of the HWC image written (R plane first in the 3072 row)
        assert torch.equal(x.mul(255).round().byte(), torch.from_numpy(hwc[k % PER_BATCH]).permute(2, 0, 1))
    x, y = load_split(tmp_path / "out", "test")[1]
    hwc, labels = written["test_batch"]
    assert y == labels[1] and round(x[1, 0, 0].item() * 255) == hwc[1, 0, 0, 1]  # G of pixel (0, 0)


def test_cifar_archive_matches_folder_and_splits(tmp_path):
    files, _ = fake_cifar_batches()
    write_cifar10_folder(tmp_path / "raw_dir", files)
    write_cifar10_archive(tmp_path / "raw_tar", files)
    options = dict(val_fraction=0.5, seed=3, test_every=2)
    prepare_dataset("cifar10", tmp_path / "a", root=tmp_path / "raw_dir", **options)
    meta = prepare_dataset("cifar10", tmp_path / "b", root=tmp_path / "raw_tar", **options)
    assert meta["splits"] == {"train": 10, "val": 10, "test": 2}
    assert folder_bytes(tmp_path / "a") == folder_bytes(tmp_path / "b")
    assert sorted(load_file(str(tmp_path / "b" / "val.safetensors"))["labels"].tolist()) == list(range(10))


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar_batches_pickled_by_python3_load(protocol):
    rows = np.arange(2 * 3072, dtype=np.uint64).astype(np.uint8).reshape(2, 3072)
    batch = safe_unpickle("batch", pickle.dumps({b"data": rows, b"labels": [3, 4]}, protocol=protocol))
    assert np.array_equal(batch[b"data"], rows) and batch[b"labels"] == [3, 4]


def test_cifar_refuses_forbidden_global(tmp_path):
    marker = tmp_path / "executed"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    files, _ = fake_cifar_batches()
    files["data_batch_2"] = pickle.dumps({b"data": Exploit(), b"labels": [0]}, protocol=2)
    write_cifar10_folder(tmp_path / "raw", files)
    with pytest.raises(UserError, match="not allowed") as err:
        prepare_dataset("cifar10", tmp_path / "out", root=tmp_path / "raw")
    assert "data_batch_2" in str(err.value) and "system" in str(err.value)
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_cifar_missing_root_and_missing_batch(tmp_path):
    with pytest.raises(UserError, match="download") as err:
        prepare_dataset("cifar10", tmp_path / "out", root=tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(err.value)

    files, _ = fake_cifar_batches()
    del files["data_batch_3"]
    folder = write_cifar10_folder(tmp_path / "raw", files)
    with pytest.raises(UserError, match="data_batch_3") as err:
        prepare_dataset("cifar10", tmp_path / "out", root=tmp_path / "raw")
    assert str(folder) in str(err.value)
    archive = write_cifar10_archive(tmp_path / "raw_tar", files)
    with pytest.raises(UserError, match="data_batch_3") as err:
        prepare_dataset("cifar10", tmp_path / "out", root=tmp_path / "raw_tar")
    assert str(archive) in str(err.value)


@pytest.mark.parametrize("field, value, message", [
    (b"data", np.zeros((4, 3071), np.uint8), "shape"),
    (b"data", np.zeros((4, 3072), np.float32), "uint8"),
    (b"labels", [0, 1, 2, 10], "out of range"),
    (b"labels", [0, 1], "labels"),
])
def test_cifar_malformed_batch(tmp_path, field, value, message):
    files, _ = fake_cifar_batches()
    batch = pickle.loads(files["test_batch"], encoding="latin1")
    batch[field.decode()] = value
    files["test_batch"] = official_pickle(batch)
    write_cifar10_folder(tmp_path / "raw", files)
    with pytest.raises(UserError, match=message) as err:
        prepare_dataset("cifar10", tmp_path / "out", root=tmp_path / "raw")
    assert "test_batch" in str(err.value)


# ---------------------------------------------------------------- ImageNet

WNIDS = ["n02", "n01", "n03"]  # created unsorted on purpose


def fake_imagenet(root: Path, n_train: int = 4, n_val: int = 5) -> Path:
    rng = np.random.default_rng(0)
    for split, count in [("train", n_train), ("val", n_val)]:
        for c, wnid in enumerate(WNIDS):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for i in range(count):
                size = (20 + 3 * i, 14 + 2 * c)  # (width, height): differing sizes and aspect ratios
                pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
                ext = "PNG" if i % 2 else "JPEG"
                Image.fromarray(pixels).save(folder / f"{wnid}_{i}.{ext}", format=ext)
    (root / "train" / "n01" / "notes.txt").write_text("not an image")
    return root


def read_index(path: Path) -> list[tuple[str, int]]:
    lines = path.read_text().splitlines()
    assert lines[0] == "path\tlabel"
    return [(rel, int(label)) for rel, label in (line.split("\t") for line in lines[1:])]


def test_imagenet_index_classes_and_subsets(tmp_path):
    root = fake_imagenet(tmp_path / "imagenet")
    meta = prepare_dataset("imagenet", tmp_path / "out", root=root, image_size=16, val_fraction=0.25, seed=0,
                           test_every=2)
    assert meta["class_names"] == ["n01", "n02", "n03"] and meta["num_classes"] == 3
    assert meta["splits"] == {"train": 9, "val": 3, "test": 8}
    assert meta["root"] == str(root) and meta["mean"] == [0.485, 0.456, 0.406]
    train, val, test = (read_index(tmp_path / "out" / f"{s}.tsv") for s in ("train", "val", "test"))
    for rel, label in train + val + test:
        assert meta["class_names"][label] == rel.split("/")[1] and (root / rel).is_file()
    assert all(rel.startswith("train/") for rel, _ in train + val) and not set(train) & set(val)
    assert sorted(label for _, label in val) == [0, 1, 2]
    all_val = sorted(f"val/{w}/{w}_{i}.{'PNG' if i % 2 else 'JPEG'}" for w in sorted(WNIDS) for i in range(5))
    assert [rel for rel, _ in test] == all_val[::2]

    for augment in (None, FLIP, PAPER):
        ds = load_split(tmp_path / "out", "train", augment=augment)
        x, y = ds[0]
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
        assert y == train[0][1]
    x, y = load_split(tmp_path / "out", "test")[7]
    assert x.shape == (3, 16, 16) and y == test[7][1]


@pytest.mark.parametrize("damage", ["truncated", "not an image"])
def test_imagenet_prepare_refuses_an_image_that_does_not_decode(tmp_path, damage):
    """Found before any training: one line naming the file, and nothing written."""
    root = fake_imagenet(tmp_path / "imagenet")
    broken = root / "train" / "n03" / "n03_2.JPEG"
    broken.write_bytes(broken.read_bytes()[:-40] if damage == "truncated" else b"definitely not a jpeg")
    with pytest.raises(UserError) as err:
        prepare_dataset("imagenet", tmp_path / "out", root=root, image_size=16, val_fraction=0.25, test_every=1,
                        workers=2)
    message = str(err.value)
    assert message.startswith(f"cannot decode image {broken} (") and "\n" not in message
    assert ("truncated" if damage == "truncated" else "cannot identify image file") in message
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_imagenet_quirks_load_as_rgb(tmp_path):
    """ImageNet's grayscale and CMYK JPEGs and its PNG under a .JPEG name are read as 3-channel RGB."""
    root = tmp_path / "imagenet"
    quirks = imagenet_tree(root, classes=2, train_per_class=4, val_per_class=1)
    modes = {}
    for quirk, path in quirks.items():
        with Image.open(path) as image:
            modes[quirk] = (image.format, image.mode)
    assert modes == {"grayscale": ("JPEG", "L"), "cmyk": ("JPEG", "CMYK"), "png": ("PNG", "RGB")}
    prepare_dataset("imagenet", tmp_path / "out", root=root, image_size=32, val_fraction=0.0, test_every=1)
    train = load_split(tmp_path / "out", "train")
    position = {rel: i for i, rel in enumerate(train.paths)}
    for path in quirks.values():
        x, _ = train[position[str(path.relative_to(root))]]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    gray, _ = train[position[str(quirks["grayscale"].relative_to(root))]]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])


def test_imagenet_image_damaged_after_prepare_is_refused_when_loaded(tmp_path):
    root = fake_imagenet(tmp_path / "imagenet")
    prepare_dataset("imagenet", tmp_path / "out", root=root, image_size=16, val_fraction=0.0, test_every=1)
    broken = root / "val" / "n01" / "n01_0.JPEG"
    broken.write_bytes(b"definitely not a jpeg")
    test = load_split(tmp_path / "out", "test")
    with pytest.raises(UserError, match="cannot read image") as err:
        test[0]
    assert str(broken) in str(err.value)
    assert test[1][0].shape == (3, 16, 16)


def test_imagenet_layout_errors(tmp_path):
    with pytest.raises(UserError, match=re.escape(str(tmp_path / "missing"))):
        prepare_dataset("imagenet", tmp_path / "out", root=tmp_path / "missing")

    root = fake_imagenet(tmp_path / "a")
    (root / "val" / "n09").mkdir()
    with pytest.raises(UserError, match=re.escape(str(root / "val" / "n09"))):
        prepare_dataset("imagenet", tmp_path / "out", root=root)

    root = fake_imagenet(tmp_path / "b")
    (root / "train" / "n04").mkdir()
    with pytest.raises(UserError, match="no images") as err:
        prepare_dataset("imagenet", tmp_path / "out", root=root)
    assert str(root / "train" / "n04") in str(err.value)
    assert not (tmp_path / "out").exists()


def test_imagenet_label_out_of_range(tmp_path):
    root = fake_imagenet(tmp_path / "imagenet")
    prepare_dataset("imagenet", tmp_path / "out", root=root, image_size=16, val_fraction=0.0, test_every=1)
    index = tmp_path / "out" / "test.tsv"
    index.write_text(index.read_text().replace("\t2\n", "\t7\n"))
    with pytest.raises(UserError, match="out of range") as err:
        load_split(tmp_path / "out", "test")
    assert str(index) in str(err.value)
