"""Named architectures (params model.preset): encoder and decoder sizes of the denoising masked autoencoder.

Patch size and input size are params (model.patch_size, model.img_size); a preset fixes widths and depths.
`base` and `large` are the paper's ViT-B/16 and ViT-L/16 with the 512-wide, 8-block decoder.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from dmae.util.errors import UserError


@dataclass(frozen=True)
class Architecture:
    embed_dim: int
    depth: int
    num_heads: int
    decoder_embed_dim: int
    decoder_depth: int
    decoder_num_heads: int
    mlp_ratio: float = 4.0


ARCHITECTURES: dict[str, Architecture] = {
    # trains in minutes on a laptop CPU (the embedded default)
    "tiny": Architecture(embed_dim=128, depth=6, num_heads=4, decoder_embed_dim=64, decoder_depth=2,
                         decoder_num_heads=4),
    "small": Architecture(embed_dim=384, depth=12, num_heads=6, decoder_embed_dim=256, decoder_depth=4,
                          decoder_num_heads=8),
    "base": Architecture(embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=512, decoder_depth=8,
                         decoder_num_heads=16),
    "large": Architecture(embed_dim=1024, depth=24, num_heads=16, decoder_embed_dim=512, decoder_depth=8,
                          decoder_num_heads=16),
}


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model: saved as JSON beside its weights."""

    preset: str
    img_size: int
    patch_size: int
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def arch(self) -> Architecture:
        return ARCHITECTURES[self.preset]

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    def to_dict(self) -> dict:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """From a checkpoint's config.json (extra keys such as `kind` are ignored)."""
        fields = {"preset", "img_size", "patch_size", "in_chans", "mean", "std"}
        missing = fields - d.keys()
        if missing:
            raise UserError(f"model config lacks {sorted(missing)}")
        if d["preset"] not in ARCHITECTURES:
            raise UserError(f"model config names unknown preset {d['preset']!r}")
        kw = {k: d[k] for k in fields}
        return cls(**{**kw, "mean": tuple(kw["mean"]), "std": tuple(kw["std"])})
