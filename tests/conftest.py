import copy
import os
from pathlib import Path

import pytest
import yaml

from dmae.settings import deep_merge, load_params, merged

REPO = Path(__file__).resolve().parents[1]
REPO_PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())  # every setting has its default there only


def params_with(overrides: dict) -> dict:
    """The project's params.yaml (as a new mapping) with `overrides` deep-merged in."""
    return deep_merge(copy.deepcopy(REPO_PARAMS), overrides)


def settings(section: str, **changes):
    """Section `section` of the project's params.yaml with `changes` merged in, validated (ValueError if bad)."""
    return merged(getattr(load_params(REPO / "params.yaml"), section), changes, section)


NO_AUTOATTACK = {"versions": [], "examples": 1, "classifiers": [], "test_sigmas": []}  # attack.autoattack off

# Tiny settings for the stage tests (merged into params.yaml): a few seconds per stage on 2 CPU cores.
TINY = {
    "sigmas": [0.25, 0.5],
    "data": {"image_size": 16, "test_every": 30},
    "model": {"preset": "tiny", "img_size": 16, "patch_size": 4},
    "pretrain": {"epochs": 2, "batch_size": 256, "warmup_epochs": 1},
    "finetune": {"epochs": 1, "batch_size": 256, "warmup_epochs": 0},
    "certify": {"n0": 10, "n": 50, "n_max": 50, "batch_size": 64, "test_every": 1},
}


@pytest.fixture
def tiny_params(tmp_path, monkeypatch) -> Path:
    """A params.yaml with the tiny settings in an empty working directory (stage outputs land there)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DMAE_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("DMAE_PROGRESS", "0")
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params_with(TINY)))
    return path


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """The digits data set prepared once per test session (16x16)."""
    from dmae.data import prepare_dataset

    out = tmp_path_factory.mktemp("digits") / "prepared"
    prepare_dataset("digits", out, image_size=16, val_fraction=0.1, seed=0, test_every=30)
    return out


def pytest_configure(config):
    os.environ.setdefault("DMAE_PROGRESS", "0")
