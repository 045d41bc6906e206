"""Checkpoints from elsewhere: import a file into the project's format, and start pretraining from one.

Accepted files, read without running code (safetensors, or `torch.load(weights_only=True)` with
`argparse.Namespace` as the only extra class allowed, for the `args` the reference training code stores):
- the released DMAE-B/L weights: a flat state dict with MAE names, encoder and decoder;
- the same wrapped as {'model': ...}, or a training checkpoint {'model', 'optimizer', 'epoch', 'scaler', 'args'}
  (DMAE/MAE reference code; timm's {'state_dict', ...} likewise);
- official MAE weights: encoder only, with decoder, or fine-tuned (fc_norm, head);
- timm VisionTransformer state dicts (.pth or .safetensors): cls_token, pos_embed, patch_embed.proj, blocks,
  norm or fc_norm, head.

What a file becomes (`kind`):
- autoencoder: the whole DenoisingMAE, e.g. to certify the released models (pretrain.init_from, epochs 0);
- encoder: the encoder alone (MAE pretrain weights, timm ViTs); fine-tuning needs nothing more, and
  pretrain.init_from starts a fresh decoder on it;
- classifier: a fine-tuned ViT (average pooling, fc_norm, head), as dmae.classifier.Classifier.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import pickle
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from dmae.models.architectures import ARCHITECTURES
from dmae.models.architectures import ModelConfig
from dmae.models.autoencoder import DenoisingMAE, encoder_state_dict_from
from dmae.models.checkpoint import CONFIG, load_config, load_into, load_weights, save_weights
from dmae.models.classifier import Classifier
from dmae.util.errors import UserError
from dmae.util.io import write_json
from dmae.util.progress import log

Kind = Literal["autoencoder", "encoder", "classifier"]
WRAPPERS = ("model", "state_dict")  # reference / MAE code, timm's train.py
DECODER = ("decoder_", "mask_token")
SOURCE = "source.json"  # provenance of an imported checkpoint, beside its config
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Imported:
    """What an import found and wrote."""

    kind: str
    container: str  # what the file held, in words
    num_params: int
    ignored: list[str]  # keys of the file the model does not use
    sha256: str


def _is_safetensors(path: Path) -> bool:
    """A safetensors file starts with an 8-byte header length followed by a JSON header."""
    with open(path, "rb") as fh:
        head = fh.read(9)
    return len(head) == 9 and head[8:] == b"{" and struct.unpack("<Q", head[:8])[0] < path.stat().st_size


def read_file(path: Path) -> object:
    """The file's content, loaded without executing anything it contains."""
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    if _is_safetensors(path):
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise UserError(f"{path}: not a readable safetensors file (truncated or corrupt?): {exc}") from None
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        unsafe = re.search(r"GLOBAL (\S+)", str(exc))
        if unsafe:
            raise UserError(f"{path}: refused: loading it would call or build {unsafe.group(1)}, which is neither "
                            f"a tensor nor argparse.Namespace; a pickle like this can run arbitrary code, so it "
                            f"is never loaded") from None
        raise UserError(f"{path}: not a readable checkpoint: its pickled data is malformed or uses constructs "
                        f"the safe loader refuses (truncated, corrupt, or not written by torch.save?)") from None
    except Exception as exc:  # zip, EOF and format errors: anything else means a damaged file
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "").split(". ")[0]
        raise UserError(f"{path}: not a readable checkpoint (truncated or corrupt?): {type(exc).__name__}: "
                        f"{first}") from None


def state_dict_of(content: object, path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict inside a file's content (flat, or under 'model' / 'state_dict') and a description."""
    if not isinstance(content, dict):
        raise UserError(f"{path}: holds a {type(content).__name__}, not a state dict")
    container = "a flat state dict"
    for key in WRAPPERS:
        if isinstance(content.get(key), dict):
            others = sorted(str(k) for k in content if k != key)
            container = f"a state dict under {key!r}" + (f" beside {', '.join(others)}" if others else "")
            if isinstance(content.get("epoch"), int):
                container += f" (epoch {content['epoch']})"
            content = content[key]
            break
    not_tensors = [str(k) for k, v in content.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise UserError(f"{path}: found no state dict ({container} with non-tensor entries "
                        f"{', '.join(not_tensors[:5])}); expected tensors, possibly under 'model' or 'state_dict'")
    state = dict(content)
    if state and all(k.startswith("module.") for k in state):  # saved from a DDP-wrapped model
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state, container


def _target_shapes(kind: Kind, cfg: ModelConfig, num_classes: int) -> dict[str, torch.Size]:
    """Key -> shape the model expects, under MAE/timm names (no `vit.` prefix); built on the meta device."""
    with torch.device("meta"):
        if kind == "classifier":
            state = {k.removeprefix("vit."): v for k, v in Classifier(cfg, num_classes).state_dict().items()}
        else:
            state = DenoisingMAE(cfg).state_dict()
            if kind == "encoder":
                state = encoder_state_dict_from(state)
    return {k: v.shape for k, v in state.items()}


def _ignorable(kind: Kind, key: str) -> bool:
    """Keys a kind drops on purpose: an encoder ignores any decoder and classification head."""
    return kind == "encoder" and key.startswith((*DECODER, "head.", "fc_norm."))


def _looks_like(state: dict[str, torch.Tensor]) -> str:
    """Which preset the file's encoder matches (width and depth), as a hint for a mismatch."""
    if "cls_token" not in state:
        return ""
    dim = state["cls_token"].shape[-1]
    depth = 1 + max((int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    names = [n for n, a in ARCHITECTURES.items() if (a.embed_dim, a.depth) == (dim, depth)]
    return (f"; the file's encoder (width {dim}, {depth} blocks) fits --preset {names[0]}" if names
            else f"; the file's encoder has width {dim} and {depth} blocks")


def _kind_hint(kind: Kind, state: dict[str, torch.Tensor]) -> str:
    has_decoder = any(k.startswith(DECODER) for k in state)
    if kind == "autoencoder" and not has_decoder:
        return "; the file holds no decoder: import it with --kind encoder"
    if kind == "classifier" and "head.weight" not in state:
        return "; the file holds no classification head: import it with --kind autoencoder or encoder"
    if kind == "classifier" and "norm.weight" in state and "fc_norm.weight" not in state:
        return ("; the file is a ViT pooled on the cls token (norm, no fc_norm), while dmae's classifier "
                "averages patch tokens into fc_norm: import it with --kind encoder and fine-tune")
    return ""


def convert(state: dict[str, torch.Tensor], kind: Kind, cfg: ModelConfig, path: Path
            ) -> tuple[dict[str, torch.Tensor], list[str], int]:
    """Check every key and shape against the model; return (its state dict in fp32, ignored keys, classes)."""
    head = state.get("head.weight")
    num_classes = head.shape[0] if kind == "classifier" and head is not None and head.ndim == 2 else 1
    shapes = _target_shapes(kind, cfg, num_classes)
    missing = [k for k in shapes if k not in state]
    unexpected = [k for k in state if k not in shapes and not _ignorable(kind, k)]
    wrong = [f"{k}: file {tuple(state[k].shape)}, model {tuple(s)}" for k, s in shapes.items()
             if k in state and state[k].shape != s]
    if missing or unexpected or wrong:
        parts = [f"{label} ({len(items)}): {', '.join(items[:6])}{', ...' if len(items) > 6 else ''}"
                 for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                      ("shape mismatches", wrong)) if items]
        raise UserError(f"{path}: does not fit --preset {cfg.preset} (img_size {cfg.img_size}, patch_size "
                        f"{cfg.patch_size}, in_chans {cfg.in_chans}) as {kind}:\n  " + "\n  ".join(parts)
                        + _kind_hint(kind, state) + _looks_like(state))
    ignored = sorted(k for k in state if k not in shapes)
    prefix = "vit." if kind == "classifier" else ""
    out = {prefix + k: state[k].float() if state[k].is_floating_point() else state[k] for k in shapes}
    return out, ignored, num_classes


def model_config(preset: str, img_size: int, patch_size: int, in_chans: int,
                 mean: tuple[float, ...] | None, std: tuple[float, ...] | None) -> ModelConfig:
    """A validated config; mean/std default to ImageNet's (the released models' normalization)."""
    if preset not in ARCHITECTURES:
        raise UserError(f"--preset {preset!r}: unknown; known presets: {', '.join(ARCHITECTURES)}")
    for option, value in (("--img-size", img_size), ("--patch-size", patch_size), ("--in-chans", in_chans)):
        if not 1 <= value <= 4096:
            raise UserError(f"{option} {value}: must be between 1 and 4096")
    if img_size % patch_size:
        raise UserError(f"--img-size {img_size} is not divisible by --patch-size {patch_size}")
    if mean is None or std is None:
        if in_chans != 3:
            raise UserError(f"--in-chans {in_chans}: give --mean and --std (the ImageNet defaults have 3 values)")
        mean, std = mean or IMAGENET_MEAN, std or IMAGENET_STD
    if len(mean) != in_chans or len(std) != in_chans:
        raise UserError(f"--mean and --std need {in_chans} values each (got {len(mean)} and {len(std)})")
    if not all(math.isfinite(v) for v in (*mean, *std)):
        raise UserError(f"--mean {list(mean)} / --std {list(std)}: every value must be a finite number")
    if min(std) <= 0:
        raise UserError(f"--std {list(std)}: every value must be positive")
    return ModelConfig(preset, img_size, patch_size, in_chans, tuple(mean), tuple(std))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def import_checkpoint(src: str | Path, out: str | Path, kind: Kind, cfg: ModelConfig) -> Imported:
    """Write OUT/model.safetensors + config.json (as the pipeline's stages write them) + source.json."""
    src, out = Path(src), Path(out)
    state, container = state_dict_of(read_file(src), src)
    weights, ignored, num_classes = convert(state, kind, cfg, src)
    if kind == "classifier":
        config = {"kind": "classifier", "mode": "full", "num_classes": num_classes, **cfg.to_dict()}
    else:
        config = {"kind": kind, **cfg.to_dict()}
    result = Imported(kind, container, sum(v.numel() for v in weights.values()), ignored, _sha256(src))
    save_weights(out, weights, config)
    write_json(out / SOURCE, {"file": src.name, "sha256": result.sha256, "container": container,
                              "ignored_keys": ignored})
    return result


def check_init_from(ckpt_dir: str | Path) -> None:
    """`pretrain.init_from` must name a checkpoint folder (config.json and weights)."""
    if not (Path(ckpt_dir) / CONFIG).is_file():
        raise UserError(f"pretrain.init_from {ckpt_dir}: no checkpoint there; create it with `dmae "
                        f"import-checkpoint FILE --preset PRESET --out {ckpt_dir}`")


def init_from_checkpoint(model: DenoisingMAE, ckpt_dir: str | Path) -> None:
    """Load `pretrain.init_from` (an imported or earlier pretrained checkpoint) into `model`.

    The architecture must match the params; normalization always comes from the data set (it is not part of
    the weights). An encoder-only checkpoint leaves the decoder as freshly initialised.
    """
    ckpt_dir = Path(ckpt_dir)
    check_init_from(ckpt_dir)
    config = load_config(ckpt_dir)
    kind = config.get("kind")
    if kind not in ("autoencoder", "encoder"):
        raise UserError(f"pretrain.init_from {ckpt_dir}: a {kind} checkpoint cannot start pretraining "
                        f"(import the pretrained weights with --kind autoencoder)")
    saved = ModelConfig.from_dict(config)
    arch = ("preset", "img_size", "patch_size", "in_chans")
    if any(getattr(saved, a) != getattr(model.cfg, a) for a in arch):
        raise UserError(f"pretrain.init_from {ckpt_dir}: built for "
                        + ", ".join(f"{a} {getattr(saved, a)}" for a in arch) + "; params ask for "
                        + ", ".join(f"{a} {getattr(model.cfg, a)}" for a in arch))
    load_into(model, load_weights(ckpt_dir), source=str(ckpt_dir),
              allow_missing=DECODER if kind == "encoder" else ())
    if kind == "encoder":
        log(f"{ckpt_dir} holds an encoder only: the decoder starts from a fresh initialisation")
    if (saved.mean, saved.std) != (model.cfg.mean, model.cfg.std):
        log(f"{ckpt_dir} was imported with mean {list(saved.mean)}, std {list(saved.std)}; the data "
                    f"set's mean {list(model.cfg.mean)}, std {list(model.cfg.std)} are used")
