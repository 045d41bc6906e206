"""Where every stage reads and writes, relative to the project root: the one definition of the pipeline's paths.

The stage commands default to these; dvc.yaml names the same paths as deps and outs (tests/test_layout.py checks
that they agree).
"""

from __future__ import annotations

from pathlib import Path

from dmae.settings import MAIN_DENOISER
from dmae.util.errors import UserError

PREPARED = Path("data/prepared")
MODELS = Path("models")
PRETRAINED = MODELS / "pretrain"
PRETRAIN_RESULTS = Path("results/pretrain")
CERTIFY_RESULTS = Path("results/certify")
ATTACK_RESULTS = Path("results/attack")
CHAIN_RESULTS = Path("results/chains")  # certification of the denoise-then-classify chains
REPORT = Path("results/report")
SETTINGS = Path("results/settings")  # the resolved settings of every stage (the `settings` stage)
PRESETS = Path("presets")  # complete params files at paper scale


def presets(folder: Path = PRESETS) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.yaml"))


def preset_file(name: str) -> Path:
    """presets/NAME.yaml, or a UserError listing the presets there are."""
    path = PRESETS / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(presets()) or f"none (run from the project root, where {PRESETS}/ is)"
        raise UserError(f"unknown preset {name!r}; presets: {known}")
    return path


def pretrained(name: str, models: Path = MODELS) -> Path:
    """A pretrained autoencoder by name: 'dmae' is the `pretrain` output, the others are defense.denoisers."""
    return models / "pretrain" if name == MAIN_DENOISER else models / "denoisers" / name


def pretrain_results(name: str) -> Path:
    return PRETRAIN_RESULTS if name == MAIN_DENOISER else Path("results/denoisers") / name


def finetuned(sigma: float, models: Path = MODELS) -> Path:
    return models / "finetune" / f"sigma-{float(sigma)}"


def finetune_results(sigma: float, folder: Path = Path("results/finetune")) -> Path:
    return folder / f"sigma-{float(sigma)}"


def certification(sigma: float, folder: Path = CERTIFY_RESULTS) -> Path:
    return folder / f"sigma-{float(sigma)}.tsv"


def defense_classifier(name: str, models: Path = MODELS) -> Path:
    return models / "defense" / name


def defense_results(name: str) -> Path:
    return Path("results/defense") / name


def chain_classifier(sigma: float, models: Path = MODELS) -> Path:
    """The per_sigma classifier of denoised smoothing (fine-tuned on reconstructions at sigma)."""
    return models / "chains" / f"sigma-{float(sigma)}"


def chain_finetune_results(sigma: float) -> Path:
    return Path("results/chain_finetune") / f"sigma-{float(sigma)}"


def chain_certification(chain: str, sigma: float, folder: Path = CHAIN_RESULTS) -> Path:
    return folder / chain / f"sigma-{float(sigma)}.tsv"


def timing(output: Path) -> Path:
    """Seconds per example of a certification output: outside every DVC output and dependency, as times vary."""
    return Path("results/timings") / f"certify-{Path(output).stem}.tsv"


def chain_timing(chain: str, sigma: float) -> Path:
    return Path("results/timings") / f"chain-{chain}-sigma-{float(sigma)}.tsv"
