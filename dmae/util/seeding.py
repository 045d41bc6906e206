"""Stable seeds derived from tuples of values (Python's hash() is salted per process, so never that), and a block
with every global random generator seeded."""

from __future__ import annotations

import contextlib
import hashlib
import random
from typing import Iterator

import numpy as np
import torch


def derive_seed(*parts) -> int:
    """A 63-bit seed that depends only on the repr of `parts`."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@contextlib.contextmanager
def seeded_globally(seed: int) -> Iterator[None]:
    """Inside the block, torch's CPU generator, Python's `random` and NumPy's global generator are seeded from
    `seed` (what torchvision's and timm's transforms draw from); after it, all three are as they were before.
    CUDA's generators are left alone."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
