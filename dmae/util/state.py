"""Work in progress saved for resume (training checkpoints, finished attack rows), never a stage output.

Written atomically with `torch.save`; read with `torch.load(weights_only=True)`, so a state file can hold tensors
and plain containers but never makes the loader call code.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from dmae.util.errors import UserError
from dmae.util.io import atomic_path


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_state(path: str | Path) -> dict[str, Any] | None:
    """The saved state, or None if there is none; a damaged or unsafe file is a UserError naming it."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt resume file must not be trusted or silently used
        unsafe = re.search(r"GLOBAL (\S+)", str(exc)) if isinstance(exc, pickle.UnpicklingError) else None
        if unsafe:  # torch's own text suggests weights_only=False: exactly what must not be done here
            reason = (f"refused: loading it would call or build {unsafe.group(1)}; a pickle like this can run "
                      f"arbitrary code, so it is never loaded")
        else:
            first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
            reason = f"{type(exc).__name__}: {first[:200]}"
        raise UserError(f"{path}: resume state is unreadable ({reason}); delete it to start the stage afresh") \
            from None
