"""Training augmentation from timm's transforms, in timm's order: RandomResizedCrop, horizontal flip, RandAugment,
then (on the tensor) random erasing. It acts on the clean [0,1] image; the training step adds the noise after it.

Normalization is the model's first operation here, while timm (and the reference code) erases after normalizing.
So the eraser sees the image normalized with the data set's mean and std, and the pixels it erased are mapped
back to [0,1] units: the model's normalized input holds timm's fill exactly (mode `pixel`: N(0, 1) per value,
i.e. mean + std * N(0, 1) in [0,1] units, unclamped as in the reference; `const`: the data set's mean).

Random draws come from Python's `random` (crop, RandAugment, erasing boxes), NumPy's global generator
(RandAugment's choice of operations) and torch's CPU generator (flip, erasing fill): the training loop seeds all
three per sample (dmae.util.seeding.seeded_globally).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from PIL import Image

INTERPOLATION = "bicubic"  # of the crop and RandAugment's geometric operations (MAE, DMAE and NIM)


def _posterize(img: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """timm's posterize as it ran up to Pillow 12: keeping 0 bits gives a black image. Pillow 13 refuses 0 bits,
    which timm's PosterizeIncreasing asks for at magnitude 10 (m9 + magnitude noise reaches it)."""
    from timm.data.auto_augment import posterize

    return img.point(lambda _: 0) if bits_to_keep <= 0 else posterize(img, bits_to_keep, **kwargs)


def randaugment(policy: str, image_size: int, mean: Sequence[float]) -> Callable:
    """timm's RandAugment with the hparams timm's create_transform gives it (translation up to 45 % of the size,
    the data set's mean as fill colour, bicubic), its posterize ops made safe for Pillow 13 (_posterize)."""
    from timm.data.auto_augment import posterize, rand_augment_transform
    from timm.data.transforms import str_to_pil_interp

    hparams = {"translate_const": int(image_size * 0.45), "img_mean": tuple(min(255, round(255 * m)) for m in mean),
               "interpolation": str_to_pil_interp(INTERPOLATION)}
    transform = rand_augment_transform(policy, hparams)
    for op in transform.ops:
        if op.aug_fn is posterize:
            op.aug_fn = _posterize
    return transform


class NormalizedErasing:
    """timm's RandomErasing where timm applies it, after normalization, on a [0,1] image: erased pixels take the
    fill mapped back to [0,1] units; every other pixel is returned exactly as it came."""

    def __init__(self, prob: float, mode: str, count: int, mean: Sequence[float], std: Sequence[float]):
        from timm.data.random_erasing import RandomErasing

        self.erase = RandomErasing(prob, mode=mode, max_count=count, device="cpu")
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        normalized = (x - self.mean) / self.std
        erased = self.erase(normalized.clone())
        return torch.where(erased != normalized, erased * self.std + self.mean, x)


def training_transform(image_size: int, mean: Sequence[float], std: Sequence[float], view: Sequence[Callable], *,
                       crop_scale: Sequence[float] | None, crop_ratio: Sequence[float] | None, hflip: float,
                       rand_augment: str | None, erase_prob: float, erase_mode: str,
                       erase_count: int) -> Callable:
    """PIL image -> augmented float tensor [C, image_size, image_size] in [0,1] (outside erased boxes).

    `view` is what replaces the random crop when `crop_scale` is None (e.g. resize + centre crop, or nothing for
    images stored at their size); `mean`/`std` are the data set's normalization (RandAugment's fill colour and
    the erasing's normalized space, as timm takes them). The keyword options are params `augment` (settings.py).
    """
    from timm.data.transforms import RandomResizedCropAndInterpolation
    from torchvision import transforms as T

    if crop_scale is None:
        steps = list(view)
    else:
        steps = [RandomResizedCropAndInterpolation(image_size, scale=tuple(crop_scale), ratio=tuple(crop_ratio),
                                                   interpolation=INTERPOLATION)]
    if hflip > 0:
        steps.append(T.RandomHorizontalFlip(hflip))
    if rand_augment:
        steps.append(randaugment(rand_augment, image_size, mean))
    steps.append(T.ToTensor())
    if erase_prob > 0:
        steps.append(NormalizedErasing(erase_prob, erase_mode, erase_count, mean, std))
    return T.Compose(steps)
