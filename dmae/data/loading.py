"""Reading prepared data sets: float images in [0, 1] with int labels, augmented (dmae.data.augment) when asked."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch.utils.data import Dataset

from dmae.data.augment import training_transform
from dmae.data.common import SPLITS
from dmae.util.errors import UserError

PREPARE_HINT = "run the data preparation stage first (dvc repro, or the dmae prepare command)"
META_KEYS = {"storage", "num_classes", "channels", "image_size", "mean", "std"}  # what the stages read


def read_meta(prepared_dir: str | os.PathLike) -> dict:
    path = Path(prepared_dir) / "meta.json"
    if not path.is_file():
        raise UserError(f"{path} not found; {PREPARE_HINT}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err}); {PREPARE_HINT}") from None
    missing = sorted(META_KEYS - meta.keys()) if isinstance(meta, dict) else None
    if missing is None or missing:
        what = f"lacks {missing}" if missing else f"holds a {type(meta).__name__}, not an object"
        raise UserError(f"{path} {what}; {PREPARE_HINT}")
    return meta


def _evaluation_view(image_size: int) -> list:
    """PIL images of any size: resize the short side to 256/224 of the crop, then centre-crop (MAE's eval view)."""
    from torchvision import transforms as T  # here: torchvision takes seconds to import
    bicubic = T.InterpolationMode.BICUBIC
    return [T.Resize(round(image_size * 256 / 224), interpolation=bicubic), T.CenterCrop(image_size)]


def _pil_image(image: torch.Tensor) -> Image.Image:
    """uint8 [C, H, W] -> a PIL image (mode L for one channel, RGB for three)."""
    array = image.permute(1, 2, 0).numpy()
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def _check_labels(labels: torch.Tensor, num_classes: int, source: Path) -> None:
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < num_classes:
        raise UserError(f"{source}: label out of range 0..{num_classes - 1}; {PREPARE_HINT}")


class TensorSplit(Dataset):
    """A split stored as uint8 images in safetensors; each item is converted to float when it is read (through PIL
    when it is augmented, as the reference code reads its images)."""

    def __init__(self, path: Path, num_classes: int, transform=None):
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise UserError(f"cannot read {path} ({err}); {PREPARE_HINT}") from None
        images, labels = tensors.get("images"), tensors.get("labels")
        if (images is None or labels is None or images.dtype != torch.uint8 or images.ndim != 4
                or labels.shape != (len(images),)):
            raise UserError(f"{path} must hold 'images' uint8 [N, C, H, W] and 'labels' [N]; {PREPARE_HINT}")
        _check_labels(labels, num_classes, path)
        self.images, self.labels, self.transform = images, labels.long(), transform

    def __len__(self) -> int:
        return len(self.labels)

    def items(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The un-augmented images [len(indices), C, H, W] and labels at `indices`, as one batch (the same values
        as collating dataset[i] one by one)."""
        return self.images[indices].float().div_(255), self.labels[indices]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self.transform is None:
            return self.images[i].float().div_(255), int(self.labels[i])
        return self.transform(_pil_image(self.images[i])), int(self.labels[i])


class ImageFileSplit(Dataset):
    """A split stored as an index (`path<TAB>label` lines, paths relative to `root`); images are read with PIL."""

    def __init__(self, index: Path, root: Path, num_classes: int, transform):
        lines = index.read_text(encoding="utf-8").splitlines()
        if not lines or lines[0] != "path\tlabel":
            raise UserError(f"{index} is not a data index (expected a 'path<TAB>label' header); {PREPARE_HINT}")
        try:
            rows = [(rel, int(label)) for rel, label in (line.split("\t") for line in lines[1:])]
        except ValueError:
            raise UserError(f"{index} has a malformed line; {PREPARE_HINT}") from None
        self.paths = [rel for rel, _ in rows]
        self.labels = torch.tensor([label for _, label in rows], dtype=torch.long)
        _check_labels(self.labels, num_classes, index)
        self.root, self.transform = root, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path = self.root / self.paths[i]
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
        except (OSError, ValueError) as err:
            raise UserError(f"cannot read image {path} ({err}); replace or remove it and prepare again") from None
        return self.transform(image), int(self.labels[i])


def load_split(prepared_dir: str | os.PathLike, split: str, augment: dict | None = None,
               root: str | os.PathLike | None = None) -> Dataset:
    """The `split` ("train", "val" or "test") of a prepared data set as a Dataset of (image [C,H,W], label).

    `augment`: None for the images as stored (ImageNet: resized and centre-cropped), or the options of
    dmae.data.augment.training_transform (params `augment`). `root` overrides the image root recorded in
    meta.json for data sets stored as an index (ImageNet); a relative root is resolved from the working directory.
    """
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    meta = read_meta(prepared_dir)
    storage = meta.get("storage")
    path = Path(prepared_dir) / f"{split}.{storage}"
    if storage not in ("safetensors", "tsv") or not path.is_file():
        raise UserError(f"prepared split {path} not found; {PREPARE_HINT}")
    size = meta["image_size"]
    view = [] if storage == "safetensors" else _evaluation_view(size)  # tensors are stored at their size
    transform = None
    if augment is not None:
        transform = training_transform(size, meta["mean"], meta["std"], view, **augment)
    if storage == "safetensors":
        return TensorSplit(path, meta["num_classes"], transform)
    from torchvision import transforms as T

    image_root = Path(root if root is not None else meta["root"])
    transform = transform or T.Compose([*view, T.ToTensor()])
    return ImageFileSplit(path, image_root, meta["num_classes"], transform)
