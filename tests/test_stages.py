"""The stage commands end to end on a tiny configuration, and their behaviour on bad input."""

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from dmae.smoothing.certify import read_certify_tsv
from stages.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_help_lists_every_stage():
    out = invoke("--help").output
    for stage in ("prepare", "pretrain", "finetune", "certify", "certify-merge"):
        assert stage in out
    assert "--sigma" in invoke("finetune", "--help").output


@pytest.mark.slow
def test_pipeline_stages_on_tiny_settings(tiny_params):
    assert invoke("prepare").exit_code == 0
    meta = json.loads(Path("data/prepared/meta.json").read_text())
    assert meta["dataset"] == "digits" and meta["splits"]["test"] == 12

    assert invoke("pretrain").exit_code == 0
    for f in ("models/pretrain/model.safetensors", "models/pretrain/config.json", "models/pretrain/settings.json",
              "results/pretrain/reconstructions.png", "results/pretrain/reconstructions.svg"):
        assert Path(f).is_file(), f
    assert Path("results/pretrain/metrics.tsv").read_text().splitlines()[0] == "epoch\tloss\tlr"
    assert not Path("state/pretrain").exists() or not any(Path("state/pretrain").iterdir())

    assert invoke("finetune", "--sigma", "0.25").exit_code == 0
    assert Path("models/finetune/sigma-0.25/model.safetensors").is_file()
    assert len(Path("results/finetune/sigma-0.25/metrics.tsv").read_text().splitlines()) == 2

    assert invoke("certify", "--sigma", "0.25").exit_code == 0
    rows = read_certify_tsv("results/certify/sigma-0.25.tsv")
    assert [r.idx for r in rows] == list(range(12))

    # two shards merged give the same rows as one run (time aside)
    for i in range(2):
        assert invoke("certify", "--sigma", "0.25", "--shard", f"{i}/2").exit_code == 0
    assert invoke("certify-merge", "--sigma", "0.25", "--shards", "2").exit_code == 0
    merged = read_certify_tsv("results/certify/sigma-0.25.tsv")
    assert [(r.idx, r.predict, r.radius) for r in merged] == [(r.idx, r.predict, r.radius) for r in rows]

    # certify.test_every: every k-th test example, counted by idx
    _with(tiny_params, "certify", "test_every", 5)
    assert invoke("certify", "--sigma", "0.25").exit_code == 0
    thinned = read_certify_tsv("results/certify/sigma-0.25.tsv")
    assert [(r.idx, r.label) for r in thinned] == [(0, rows[0].label), (1, rows[5].label), (2, rows[10].label)]


def _with(params_path: Path, section: str, key: str, value) -> None:
    raw = yaml.safe_load(params_path.read_text())
    raw.setdefault(section, {})[key] = value
    params_path.write_text(yaml.safe_dump(raw))


@pytest.mark.parametrize("stage, section, key, value, message", [
    ("pretrain", "pretrain", "mask_ratio", 1.2, "pretrain.mask_ratio = 1.2"),
    ("pretrain", "pretrain", "noise", {"sigma": -1}, "pretrain.noise.sigma = -1"),
    ("pretrain", "model", "patch_size", 5, "img_size 16 is not divisible by patch_size 5"),
    ("pretrain", "model", "preset", "giant", "unknown preset 'giant'"),
    ("prepare", "data", "typo_key", 1, "data.typo_key: unknown key"),
    ("certify", "certify", "alpha", 2, "certify.alpha = 2"),
])
def test_bad_params_exit_2_with_one_message_and_no_outputs(tiny_params, stage, section, key, value, message):
    _with(tiny_params, section, key, value)
    args = [stage] + (["--sigma", "0.25"] if stage == "certify" else [])
    result = invoke(*args)
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert not any(Path(d).exists() for d in ("data", "models", "results"))


def test_missing_data_and_models_are_clear_errors(tiny_params):
    result = invoke("pretrain")
    assert result.exit_code == 2 and "data/prepared" in result.output
    assert invoke("prepare").exit_code == 0
    result = invoke("certify", "--sigma", "0.25")
    assert result.exit_code == 2 and "models/finetune/sigma-0.25" in result.output
    result = invoke("finetune", "--sigma", "0.3")
    assert result.exit_code == 2 and "--sigma 0.3 is not one of params sigmas" in result.output
    result = invoke("certify", "--sigma", "0.25", "--shard", "3/2")
    assert result.exit_code == 2 and "--shard" in result.output


def test_missing_cifar10_names_where_it_looked(tiny_params):
    raw = yaml.safe_load(tiny_params.read_text())
    raw["data"].update(dataset="cifar10", image_size=32, root="nowhere")
    raw["model"]["img_size"] = 32
    tiny_params.write_text(yaml.safe_dump(raw))
    result = invoke("prepare")
    assert result.exit_code == 2 and "nowhere" in result.output
    assert not Path("data/prepared").exists()
