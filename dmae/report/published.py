"""Published certified accuracies (%, best sigma per radius) from the DMAE paper (Wu et al., ICLR 2023).

The report shows them beside ours when params data.dataset is imagenet or cifar10, with the difference to the
DMAE rows (`compare`). The paper certifies with N0 = 100, alpha = 0.001 and N = 10,000 (ImageNet, every 50th
validation image) or N = 100,000 (CIFAR-10, the whole test set); a smaller N lowers the largest radius reachable.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Published:
    method: str
    params: str  # model size as the paper states it
    accuracy: tuple[float, ...]  # certified accuracy (%) at the table's radii
    compare: bool = False  # a DMAE row: the report shows ours minus it


@dataclass(frozen=True)
class PublishedTable:
    dataset: str
    protocol: str
    radii: tuple[float, ...]
    rows: tuple[Published, ...]


IMAGENET = PublishedTable(
    dataset="ImageNet",
    protocol="N = 10,000, N0 = 100, alpha = 0.001, every 50th validation image (1,000)",
    radii=(0.5, 1.0, 1.5, 2.0, 3.0),
    rows=(
        Published("RS (Cohen et al.)", "26M", (49.0, 37.0, 29.0, 19.0, 12.0)),
        Published("SmoothAdv", "26M", (54.0, 43.0, 37.0, 27.0, 20.0)),
        Published("Consistency", "26M", (50.0, 44.0, 34.0, 24.0, 17.0)),
        Published("MACER", "26M", (57.0, 43.0, 31.0, 25.0, 14.0)),
        Published("Boosting", "78M", (57.0, 44.6, 38.4, 28.6, 20.2)),
        Published("SmoothMix", "26M", (50.0, 43.0, 38.0, 26.0, 17.0)),
        Published("Diffusion + BEiT-L (Carlini et al. 2022)", "857M", (71.1, 54.3, 38.1, 29.5, 13.1)),
        Published("DMAE ViT-B", "87M", (69.6, 57.9, 47.8, 35.4, 22.5), compare=True),
        Published("DMAE ViT-L", "304M", (73.6, 64.6, 53.7, 41.5, 27.5), compare=True),
    ),
)

CIFAR10 = PublishedTable(
    dataset="CIFAR-10",
    protocol="N = 100,000, N0 = 100, alpha = 0.001, the whole test set (10,000)",
    radii=(0.25, 0.5, 0.75, 1.0),
    rows=(
        Published("RS", "1.7M", (61.0, 43.0, 32.0, 23.0)),
        Published("Consistency", "1.7M", (68.8, 58.1, 48.5, 37.8)),
        Published("Diffusion (Carlini et al.)", "137M", (79.3, 65.5, 48.7, 35.5)),
        Published("DMAE ViT-B", "87M", (79.2, 64.6, 47.3, 36.1), compare=True),
        Published("DMAE ViT-B + continued pretraining", "87M", (80.8, 67.1, 49.7, 37.7), compare=True),
    ),
)

PUBLISHED = {"imagenet": IMAGENET, "cifar10": CIFAR10}  # keyed by params data.dataset
