"""ImageNet in ImageFolder layout; the prepared form is an index of relative paths and labels, not pixels.

Preparing decodes every image once (JPEGs at 1/8 scale, which still reads every byte of the file), in parallel,
so that a truncated, corrupt or non-image file stops the pipeline here, naming the file, and not hours into
training. Grayscale and CMYK JPEGs and PNGs (ImageNet holds all three, one PNG under a .JPEG name) are read as
RGB when loaded.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from dmae.data.common import building_dir, check_split_options, holdout, write_meta
from dmae.util.errors import UserError
from dmae.util.io import atomic_write_text
from dmae.util.progress import progress_bar

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
EXTENSIONS = (".jpeg", ".jpg", ".png")
INDEX_HEADER = "path\tlabel"
LAYOUT = ("expected root/train/<wnid>/*.JPEG and root/val/<wnid>/*.JPEG, with the validation images already "
          "sorted into class folders")


def _class_dirs(folder: Path) -> list[str]:
    if not folder.is_dir():
        raise UserError(f"ImageNet folder {folder} not found; {LAYOUT}")
    names = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if not names:
        raise UserError(f"ImageNet folder {folder} has no class folders; {LAYOUT}")
    return names


def _scan(root: Path, split: str, classes: list[str], class_index: dict[str, int]) -> list[tuple[str, int]]:
    """(path relative to root, label) of every image of `split`, in sorted order (class, then file name)."""
    items = []
    for wnid in classes:
        folder = root / split / wnid
        names = sorted(e.name for e in os.scandir(folder) if e.is_file() and e.name.lower().endswith(EXTENSIONS))
        if not names:
            raise UserError(f"ImageNet class folder {folder} holds no images ({', '.join(EXTENSIONS)}); {LAYOUT}")
        bad = next((n for n in names if "\t" in n or "\n" in n), None)
        if bad is not None:
            raise UserError(f"image file name {folder / bad!r} contains a tab or newline; rename it")
        items += [(f"{split}/{wnid}/{name}", class_index[wnid]) for name in names]
    return items


def undecodable(path: str | os.PathLike) -> str | None:
    """Why the image at `path` cannot be decoded, or None when it can."""
    try:
        with Image.open(path) as image:
            image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))  # JPEG: DCT scaling
            image.load()
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        why = " ".join(str(err).replace(f"'{os.fspath(path)}'", "").split())  # the caller names the file
        return why or type(err).__name__
    return None


def check_images(paths: list[Path], workers: int, progress: bool = True) -> None:
    """Decode every image (in `workers` processes); a UserError names the first one that fails."""
    chunk = 64
    with progress_bar(progress, unit="img") as bar, ProcessPoolExecutor(max(1, workers)) as pool:
        task = bar.add_task("check images", total=len(paths), status="")
        for start in range(0, len(paths), chunk * max(1, workers)):
            batch = paths[start:start + chunk * max(1, workers)]
            for path, why in zip(batch, pool.map(undecodable, batch, chunksize=chunk)):
                if why is not None:
                    raise UserError(f"cannot decode image {path} ({why}); replace or remove it, then prepare again")
            bar.update(task, advance=len(batch))


def _write_index(path: Path, items: list[tuple[str, int]]) -> None:
    atomic_write_text(path, INDEX_HEADER + "\n" + "".join(f"{rel}\t{label}\n" for rel, label in items))


def prepare(out_dir: str | os.PathLike, *, root: str | os.PathLike = "data/raw/imagenet", image_size: int = 224,
            val_fraction: float = 0.01, seed: int = 0, test_every: int = 50, workers: int = 1) -> dict:
    """Write train/val/test.tsv (relative path, label) and meta.json, once every image listed in them decodes
    (checked in `workers` processes); `root` is recorded as given."""
    check_split_options(val_fraction, test_every, image_size)
    given_root, root = os.fspath(root), Path(root)
    if not root.is_dir():
        raise UserError(f"ImageNet root {root} not found; {LAYOUT}")
    classes = _class_dirs(root / "train")
    val_classes = _class_dirs(root / "val")
    class_index = {wnid: i for i, wnid in enumerate(classes)}
    unknown = [wnid for wnid in val_classes if wnid not in class_index]
    if unknown:
        raise UserError(f"validation class folder {root / 'val' / unknown[0]} has no counterpart in {root / 'train'}"
                        f" ({len(unknown)} such classes); {LAYOUT}")

    train_items = _scan(root, "train", classes, class_index)
    val_items = _scan(root, "val", val_classes, class_index)
    labels = np.array([label for _, label in train_items])
    train, val = holdout(np.arange(len(train_items)), labels, val_fraction, seed, "validation")
    parts = {"train": [train_items[i] for i in train], "val": [train_items[i] for i in val],
             "test": val_items[::test_every]}
    check_images([root / rel for items in parts.values() for rel, _ in items], workers)
    with building_dir(out_dir) as out:
        for split, items in parts.items():
            _write_index(out / f"{split}.tsv", items)
        return write_meta(out, dataset="imagenet", storage="tsv", class_names=classes, channels=3,
                          image_size=image_size, mean=MEAN, std=STD,
                          splits={split: len(items) for split, items in parts.items()}, root=given_root)
