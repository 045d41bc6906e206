"""Stable seeds derived from tuples of values (Python's hash() is salted per process, so never that)."""

from __future__ import annotations

import hashlib


def derive_seed(*parts) -> int:
    """A 63-bit seed that depends only on the repr of `parts`."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)
