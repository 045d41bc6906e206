"""Training augmentation (dmae/data/augment.py and params `augment`): each of timm's transforms gives images of
the right shape in [0,1]; the paper recipe is timm's create_transform with normalization moved into the model;
random erasing fills in normalized units; the draws are keyed per sample over every RNG the transforms use, so
data-loader workers and resuming change no byte; bad settings are refused naming the key."""

import random

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Subset
from torchvision import transforms as T

from dmae.data import load_split
from dmae.data.augment import NormalizedErasing, randaugment, training_transform
from dmae.settings import parse_params
from dmae.train.batches import KeyedAugmentation, epoch_batches
from dmae.util.errors import UserError
from dmae.util.seeding import seeded_globally
from tests.conftest import params_with

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIZE = 24
OFF = {"crop_scale": None, "crop_ratio": None, "hflip": 0.0, "rand_augment": None, "erase_prob": 0.0,
       "erase_mode": "const", "erase_count": 1}
CROP = {"crop_scale": (0.08, 1.0), "crop_ratio": (0.75, 4 / 3)}
EACH = {"crop": CROP, "flip": {"hflip": 1.0}, "rand_augment": {"rand_augment": "rand-m9-mstd0.5-inc1"},
        "erase_const": {"erase_prob": 1.0}, "erase_rand": {"erase_prob": 1.0, "erase_mode": "rand", "erase_count": 3},
        "erase_pixel": {"erase_prob": 1.0, "erase_mode": "pixel"}}
NIM = {**OFF, **CROP, "hflip": 0.5, "rand_augment": "rand-m9-mstd0.5-inc1", "erase_prob": 0.25, "erase_mode": "pixel"}


def photo(seed: int = 0, size: tuple[int, int] = (40, 30)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def view() -> list:
    return [T.Resize(SIZE), T.CenterCrop(SIZE)]


def normalized(x: torch.Tensor) -> torch.Tensor:
    return (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


@pytest.mark.parametrize("name", list(EACH))
def test_each_transform_gives_the_size_in_0_1_outside_erased_pixels(name):
    transform = training_transform(SIZE, MEAN, STD, view(), **{**OFF, **EACH[name]})
    plain = T.Compose([*view(), T.ToTensor()])(photo())
    changed = 0
    for seed in range(20):
        with seeded_globally(seed):
            x = transform(photo())
        assert x.shape == (3, SIZE, SIZE) and x.dtype == torch.float32
        changed += not torch.equal(x, plain)
        if name.startswith("erase"):  # what is not erased is the image; erased values are timm's fill
            kept = (x == plain).all(0)
            assert not kept.all() and kept.float().mean() > 0.5
            fill = normalized(x)[:, ~kept]
            if name == "erase_const":
                assert torch.allclose(fill, torch.zeros_like(fill), atol=1e-6)  # the data set's mean
        else:
            assert 0 <= x.min() and x.max() <= 1
    assert changed >= (20 if name == "flip" or name.startswith("erase") else 10)  # RandAugment: p 0.5 per op


def test_random_erasing_is_timms_on_the_normalized_image():
    from timm.data.random_erasing import RandomErasing

    x = torch.rand(3, SIZE, SIZE)
    for mode in ("const", "rand", "pixel"):
        ours, timms = NormalizedErasing(1.0, mode, 2, MEAN, STD), RandomErasing(1.0, mode=mode, max_count=2,
                                                                               device="cpu")
        for seed in range(10):
            with seeded_globally(seed):
                got = ours(x)
            with seeded_globally(seed):
                expected = timms(normalized(x))
            erased = (expected != normalized(x)).any(0)
            assert erased.any() and torch.equal(got[:, ~erased], x[:, ~erased])  # untouched pixels: exact
            assert torch.allclose(normalized(got), expected, atol=1e-5)  # the model sees timm's fill


def test_the_nim_recipe_is_timms_create_transform_with_normalization_moved_into_the_model():
    """Same seeds, same draws: RandomResizedCrop 0.08-1, flip, RandAugment m9-mstd0.5-inc1 (timm's hparams:
    translate 45 % of the size, the data set's mean as fill, bicubic) and erasing 0.25 in pixel mode."""
    from timm.data import create_transform

    theirs = create_transform(SIZE, is_training=True, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5,
                              color_jitter=None, auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic",
                              re_prob=0.25, re_mode="pixel", re_count=1, mean=MEAN, std=STD)
    ours = training_transform(SIZE, MEAN, STD, [], **NIM)
    for seed in range(30):
        with seeded_globally(seed):
            got = ours(photo(seed))
        with seeded_globally(seed):
            expected = theirs(photo(seed))
        assert torch.allclose(normalized(got), expected, atol=1e-5), seed


def test_posterize_at_magnitude_10_gives_a_black_image_as_timm_did_before_pillow_13():
    """timm's PosterizeIncreasing keeps 0 bits at magnitude 10, which m9 with magnitude noise 0.5 reaches for
    about 2 % of its draws; Pillow 13 raises on 0 bits, Pillow up to 12 returned a black image."""
    (op,) = [op for op in randaugment("rand-m10-inc1", SIZE, MEAN).ops if op.name == "PosterizeIncreasing"]
    op.prob = 1.0
    assert np.asarray(op(photo())).max() == 0


def test_tensor_splits_are_augmented_through_pil(digits_dir):
    """digits: one channel, stored at its size (no resize); the paper recipe keeps the size and range."""
    plain = load_split(digits_dir, "train")
    flipped = load_split(digits_dir, "train", augment={**OFF, "hflip": 1.0})
    assert torch.equal(flipped[5][0], plain[5][0].flip(-1))  # the PIL round trip is lossless
    augmented = load_split(digits_dir, "train", augment=NIM)
    for i in range(10):
        with seeded_globally(i):
            x, y = augmented[i]
        assert x.shape == (1, 16, 16) and y == plain[i][1]


def _bytes(dataset, workers: int, epoch: int = 0) -> list[bytes]:
    return [b.x.numpy().tobytes() for b in epoch_batches(dataset, 16, 1, seed=7, epoch=epoch, workers=workers)]


def test_keyed_augmentation_is_the_same_in_workers_and_on_resume_and_leaves_global_rngs_alone(digits_dir):
    dataset = Subset(load_split(digits_dir, "train", augment=NIM), range(48))
    states = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    KeyedAugmentation(dataset)[(3, 12345)]
    assert random.getstate() == states[0] and (np.random.get_state()[1] == states[1]).all()
    assert torch.equal(torch.get_rng_state(), states[2])
    in_process = _bytes(dataset, workers=0)
    assert _bytes(dataset, workers=2) == in_process  # each sample drawn in some worker: the same bytes
    assert _bytes(dataset, workers=0) == in_process  # a resumed run redoes the epoch: the same bytes
    assert _bytes(dataset, workers=0, epoch=1) != in_process


BAD = [
    ({"augment": "flip"}, "finetune.augment = 'flip': expected none or a section"),
    ({"augment": None}, "finetune.augment = None: expected none or a section"),
    ({"augment": {**NIM, "rand_augment": "rand-x9"}}, "rand_augment = 'rand-x9': not a RandAugment policy"),
    ({"augment": {**NIM, "rand_augment": "rand-m9-mstd"}}, "rand_augment = 'rand-m9-mstd'"),
    ({"augment": {**NIM, "crop_scale": [0.5, 0.2]}}, "crop_scale = [0.5, 0.2]: expected [low, high]"),
    ({"augment": {**NIM, "crop_scale": [0.0, 1.0]}}, "finetune.augment.crop_scale.0 = 0.0"),
    ({"augment": {**NIM, "crop_ratio": None}}, "crop_scale and crop_ratio: set both"),
    ({"augment": {**NIM, "hflip": 1.5}}, "finetune.augment.hflip = 1.5"),
    ({"augment": {**NIM, "erase_prob": -0.1}}, "finetune.augment.erase_prob = -0.1"),
    ({"augment": {**NIM, "erase_mode": "zero"}}, "finetune.augment.erase_mode = 'zero'"),
    ({"augment": {**NIM, "erase_count": 0}}, "finetune.augment.erase_count = 0"),
    ({"augment": {**NIM, "vflip": 0.5}}, "finetune.augment.vflip: unknown key"),
    ({"augment": OFF}, "every augmentation is off: write `augment: none`"),
]


@pytest.mark.parametrize("finetune, message", BAD, ids=[m for _, m in BAD])
def test_bad_augmentation_settings_name_the_key(finetune, message):
    with pytest.raises(UserError) as err:
        parse_params(params_with({"finetune": finetune}), source="params.yaml")
    assert message in str(err.value)


def test_defense_finetune_overrides_single_augmentation_keys():
    params = parse_params(params_with({"finetune": {"augment": {**NIM, "erase_prob": 0.0}},
                                       "defense": {"finetune": {"augment": {"erase_prob": 0.25}}}}))
    assert params.finetune.augment.erase_prob == 0.0 and params.defense_finetune().augment.model_dump() == {
        **NIM, "crop_scale": (0.08, 1.0), "crop_ratio": (0.75, 4 / 3)}
    assert params.model_dump(mode="json")["pretrain"]["augment"] == "none"  # as params.yaml writes it
