"""`dmae rehearse`: what it shrinks and keeps, what it fabricates, how it projects cost and what it checks.

The rehearsals themselves (every preset's whole DAG at toy sizes: minutes each) are slow tests, run by
`make test-all`; CI rehearses imagenet-nim-vit-b with `make rehearse`.
"""

from __future__ import annotations

import subprocess
import sys
import pytest
import torch
import yaml

from dmae.models.architectures import ModelConfig
from dmae.models.imports import import_checkpoint
from dmae.settings import parse_params
from stages.paths import presets
from tests.conftest import REPO
from tools import fabricate, rehearse
from tools.projection import gpu_hours, stage_flops

PRESETS = presets(REPO / "presets")
SIZES = {"cpu_threads", "data.val_fraction", "data.test_every"}  # keys besides the sizes of TOY_SIZES


def flatten(raw: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in raw.items():
        section = isinstance(value, dict) and value and all(isinstance(k, str) for k in value)
        if section and key not in ("budget", "augment"):  # these two compared whole
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def preset(name: str) -> dict:
    return yaml.safe_load((REPO / "presets" / f"{name}.yaml").read_text())


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("nproc", [1, 2])
def test_shrink_changes_only_sizes_and_the_result_validates(name, nproc):
    raw = preset(name)
    small, changes = rehearse.shrink(raw, nproc, threads=1)
    params = parse_params(small)  # valid as it stands
    before, after = flatten(raw), flatten(small)
    changed = {k for k in after if before.get(k) != after[k]}
    allowed = set(rehearse.TOY_SIZES) | SIZES
    sizes = ("epochs", "warmup_epochs", "batch_size")
    assert all(k in allowed or k.endswith(sizes) for k in changed), sorted(changed - allowed)
    assert len(changes) == len(changed) and all("→" in c for c in changes)
    for key in ("model.preset", "model.img_size", "model.patch_size", "data.dataset", "data.image_size",
                "pretrain.precision", "finetune.precision", "certify.precision", "pretrain.accum_steps",
                "finetune.accum_steps", "pretrain.augment", "finetune.augment", "pretrain.mask_ratio"):
        assert after[key] == before[key], key
    for section in (params.pretrain, params.finetune, params.defense_finetune(),
                    *(params.denoiser_settings(d) for d in params.defense.denoisers)):
        assert section.batch_size == section.accum_steps * nproc * rehearse.MICRO_BATCH
        assert section.epochs in (0, 1) or section.epochs == {s: 1 for s in params.sigmas}
    assert params.pretrain.epochs == min(raw["pretrain"]["epochs"], 1)  # a released model stays untrained


def test_every_released_preset_names_its_import_step():
    for name in PRESETS:
        steps = rehearse.import_steps((REPO / "presets" / f"{name}.yaml").read_text())
        params = parse_params(preset(name))
        init = {params.denoiser_settings(d).init_from for d in ["dmae", *params.defense.denoisers]} - {None}
        outs = {options[options.index("--out") + 1] for _, options in steps}
        assert init <= outs, f"{name}: init_from {init} is not written by its header's import steps {outs}"
        for _, options in steps:
            assert options[options.index("--preset") + 1] == params.model.preset


@pytest.mark.parametrize("kind", fabricate.CHECKPOINT_KINDS)
def test_fabricated_checkpoints_have_their_authors_layout_and_import(tmp_path, kind):
    cfg = ModelConfig("tiny", 16, 4, 3, (0.5,) * 3, (0.5,) * 3)
    path = fabricate.checkpoint(tmp_path / f"{kind}.pth", kind, cfg, num_classes=7)
    content = torch.load(path, weights_only=True)
    if kind == "encoder":
        assert set(content) == {"model"} and not any(k.startswith("decoder") for k in content["model"])
    elif kind == "autoencoder":
        assert "decoder_pred.weight" in content and "mask_token" in content  # flat, MAE names
    else:
        assert content["head.weight"].shape[0] == 7 and "fc_norm.weight" in content
    imported = import_checkpoint(path, tmp_path / "out", kind, cfg)
    assert imported.kind == kind and not imported.ignored


def test_projection_reproduces_the_readme_arithmetic():
    """README: DMAE-B pretraining 3 x 19.6 GFLOP x 1.27M x 1,100 = 8.2e19 FLOP = 76 GPU-hours at 300 TFLOP/s;
    ViT-B fine-tuning 3 x 2 x 35.1 GFLOP x 1.27M x 100 = 2.7e19 = 25 GPU-hours per sigma."""
    flops = stage_flops(parse_params(preset("imagenet-dmae-vit-b")))
    assert gpu_hours(flops["pretrain"]) == pytest.approx(76, abs=1)
    assert gpu_hours(flops["finetune@0.25"]) == pytest.approx(25, abs=0.5)
    released = stage_flops(parse_params(preset("imagenet-dmae-vit-b-released")))
    assert released["pretrain"] == 0 and released["finetune@0.5"] == flops["finetune@0.5"]


@pytest.mark.parametrize("name", PRESETS)
def test_projection_covers_every_stage_that_trains_or_evaluates(name):
    params = parse_params(preset(name))
    flops = stage_flops(params)
    expected = {"pretrain", "attack", *(f"denoiser@{d}" for d in params.defense.denoisers),
                *(f"{stage}@{s}" for s in params.sigmas for stage in ("finetune", "certify", "finetune_chain")),
                *(f"finetune_defense@{c}" for c in params.defense.classifiers),
                *(f"certify_chain@{s}-{c}" for s in params.sigmas for c in params.denoised_smoothing.chains)}
    assert set(flops) == expected and all(v >= 0 for v in flops.values())


def test_report_checks_name_what_is_missing():
    params = parse_params(preset("imagenet-nim-vit-b"))
    complete = "\n".join([*rehearse.REPORT_SECTIONS, *(f"### σ = {s:g}" for s in params.sigmas)])
    assert rehearse.missing_sections(complete, params) == []
    broken = complete.replace("## Per σ", "").replace("### σ = 0.5", "")
    assert rehearse.missing_sections(broken, params) == ["report.md lacks the section '## Per σ'",
                                                         "report.md lacks the chains' table at σ = 0.5"]


def test_unknown_preset_is_refused_in_one_line():
    done = subprocess.run([sys.executable, "-m", "stages.cli", "rehearse", "imagenet-vit-z"], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.strip().startswith("error: unknown preset 'imagenet-vit-z'")


@pytest.mark.slow
@pytest.mark.parametrize("name", PRESETS)
def test_preset_rehearses_end_to_end(name, tmp_path):
    done = subprocess.run([sys.executable, "-m", "stages.cli", "rehearse", name, "--workspace",
                           str(tmp_path / "ws")], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "rehearsal passed" in done.stderr


@pytest.mark.slow
def test_preset_rehearses_with_two_processes_per_stage(tmp_path):
    done = subprocess.run([sys.executable, "-m", "stages.cli", "rehearse", "imagenet-dmae-vit-b-released",
                           "--nproc", "2", "--workspace", str(tmp_path / "ws")], cwd=REPO, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-4000:]
