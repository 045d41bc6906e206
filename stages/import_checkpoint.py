"""`dmae import-checkpoint`: turn a released or foreign checkpoint file into the project's format.

Not a DVC stage: run it once per downloaded file, then point `pretrain.init_from` (or a stage's model option)
at the folder it writes.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from dmae.models.imports import import_checkpoint, model_config
from dmae.util.errors import UserError
from dmae.util.progress import say
from stages.common import user_errors


class Kind(str, Enum):
    autoencoder = "autoencoder"
    encoder = "encoder"
    classifier = "classifier"


def _floats(option: str, text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"{option} {text!r}: expected comma-separated numbers, e.g. 0.485,0.456,0.406") from None


@user_errors
def main(
    src: Path = typer.Argument(..., help="The checkpoint file (.pth, .pt, .bin or .safetensors)."),
    preset: str = typer.Option(..., help="Architecture the file must fit: base (ViT-B/16) | large (ViT-L/16) "
                                         "| small | tiny."),
    out: Path = typer.Option(..., help="Output folder, e.g. models/imported/dmae-vit-b."),
    kind: Kind = typer.Option(Kind.autoencoder, help="autoencoder: encoder + decoder (released DMAE, MAE "
                                                      "visualize); encoder: encoder only (MAE pretrain, timm "
                                                      "ViT); classifier: fine-tuned ViT with fc_norm + head."),
    img_size: int = typer.Option(224, help="Model input size the weights were trained at."),
    patch_size: int = typer.Option(16, help="Patch size."),
    in_chans: int = typer.Option(3, help="Input channels."),
    mean: str = typer.Option(None, help="Normalization mean, comma-separated [default: ImageNet's]; the "
                                        "pipeline uses the data set's own."),
    std: str = typer.Option(None, help="Normalization std, comma-separated [default: ImageNet's]."),
) -> None:
    """Check every key and shape of SRC against the preset, then write OUT/model.safetensors + config.json
    (the format the stages write) and OUT/source.json (file name, sha256, what was ignored).

    Reads flat state dicts, {'model': ...} / {'state_dict': ...} wrappers and the reference code's training
    checkpoints, without ever running code from the file. A file that does not fit is refused with the
    missing, unexpected and mis-shaped keys.
    """
    cfg = model_config(preset, img_size, patch_size, in_chans, _floats("--mean", mean), _floats("--std", std))
    result = import_checkpoint(src, out, kind.value, cfg)
    say(f"read {src}: {result.container}")
    say(f"wrote {out} as {result.kind} (preset {preset}, {result.num_params / 1e6:.1f}M parameters, "
                  f"sha256 of the source {result.sha256[:16]}...)")
    if result.ignored:
        say(f"ignored {len(result.ignored)} keys the {result.kind} does not use: "
                      f"{', '.join(result.ignored[:6])}{', ...' if len(result.ignored) > 6 else ''}")
    if result.kind != "classifier":
        say(f"next: set `pretrain.init_from: {out}` in params.yaml (with `pretrain.epochs: 0` to use "
                      f"the weights as they are), then `dvc repro`")
