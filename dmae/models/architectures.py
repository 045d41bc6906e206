"""Named architectures (params model.preset): encoder and decoder sizes of the denoising masked autoencoder.

Patch size and input size are params (model.patch_size, model.img_size); a preset fixes widths and depths.
`base` and `large` are the paper's ViT-B/16 and ViT-L/16 with the 512-wide, 8-block decoder.
"""

from __future__ import annotations

from dataclasses import dataclass


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
