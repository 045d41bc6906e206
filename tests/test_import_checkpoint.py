"""Importing checkpoints: every accepted file format, refusals (wrong preset, damaged file, code-running pickle),
and starting the pipeline from an imported checkpoint (pretrain.init_from with epochs 0).

Fabricated files use the `tiny` preset (same key layout as ViT-B/L); one test writes real ViT-B weights, and the
ViT-B/L key layouts are checked in full on the meta device.
"""

import argparse
import json
import os
import pickle
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import yaml
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer
from typer.testing import CliRunner

from dmae.models.architectures import ModelConfig
from dmae.models.autoencoder import DenoisingMAE, encoder_state_dict_from
from dmae.models.checkpoint import load_weights
from dmae.models.classifier import Classifier, load_classifier
from dmae.models.imports import convert, import_checkpoint, model_config
from dmae.util.errors import UserError
from stages.cli import app
from tests.conftest import settings

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TINY = ModelConfig("tiny", 16, 4, 3, MEAN, STD)


def _args() -> argparse.Namespace:  # what the reference training code stores under 'args'
    return argparse.Namespace(model="mae_vit_base_patch16", input_size=224, mask_ratio=0.75, sigma=0.25,
                              blr=1.5e-4, lr=None, output_dir="./output_dir", norm_pix_loss=True)


def _training_checkpoint(state: dict) -> dict:
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(2))])
    return {"model": state, "optimizer": opt.state_dict(), "epoch": 1099, "scaler": {"scale": 65536.0},
            "args": _args()}


def _write(path: Path, content) -> Path:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in content.items()}, str(path))
    else:
        torch.save(content, path)
    return path


@pytest.fixture(scope="module")
def autoencoder() -> DenoisingMAE:
    torch.manual_seed(0)
    model = DenoisingMAE(TINY).eval()
    with torch.no_grad():  # random everything, so a dropped or swapped tensor changes the outputs
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


def _timm_vit(pool: str) -> VisionTransformer:
    """A timm ViT with the tiny preset's sizes: avg pooling + fc_norm (MAE fine-tuning) or cls token + norm."""
    torch.manual_seed(1)
    vit = VisionTransformer(img_size=16, patch_size=4, num_classes=10, embed_dim=128, depth=6, num_heads=4,
                            qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), global_pool=pool,
                            fc_norm=pool == "avg", weight_init="skip").eval()
    with torch.no_grad():
        for p in vit.parameters():
            p.normal_(0, 0.05)
    return vit


def _same_autoencoder_outputs(original: DenoisingMAE, out: Path) -> None:
    loaded = DenoisingMAE(TINY).eval()
    loaded.load_state_dict(load_weights(out))
    noisy = torch.rand(2, 3, 16, 16) + 0.25 * torch.randn(2, 3, 16, 16)
    assert torch.equal(original.reconstruct(noisy, sigma=0.25), loaded.reconstruct(noisy, sigma=0.25))


# -- accepted formats ----------------------------------------------------------------------------------------
AUTOENCODER_FORMATS = {  # name -> (file suffix, content from the state dict)
    "released flat state dict": (".pth", lambda sd: sd),
    "flat .safetensors": (".safetensors", lambda sd: sd),
    "{'model': ...}": (".pth", lambda sd: {"model": sd}),
    "reference training checkpoint with args Namespace": (".pth", _training_checkpoint),
    "DDP 'module.' prefix": (".pth", lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}}),
}


@pytest.mark.parametrize("fmt", list(AUTOENCODER_FORMATS))
def test_autoencoder_formats_load_into_the_same_model(tmp_path, autoencoder, fmt):
    suffix, content = AUTOENCODER_FORMATS[fmt]
    src = _write(tmp_path / f"ckpt{suffix}", content(autoencoder.state_dict()))
    result = import_checkpoint(src, tmp_path / "out", "autoencoder", TINY)
    assert result.kind == "autoencoder" and result.ignored == []
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config == {"kind": "autoencoder", **TINY.to_dict()}  # as the pretrain stage writes it
    assert set(load_weights(tmp_path / "out")) == set(autoencoder.state_dict())
    _same_autoencoder_outputs(autoencoder, tmp_path / "out")
    if fmt.startswith("reference"):
        assert "epoch 1099" in result.container and "args" in result.container


def test_official_mae_encoder_only_weights_fine_tune_identically(tmp_path, autoencoder):
    """MAE's pretrain weights ({'model': encoder only}) become an `encoder` checkpoint the classifier loads."""
    encoder = encoder_state_dict_from(autoencoder.state_dict())
    src = _write(tmp_path / "mae_pretrain_vit_tiny.pth", {"model": encoder})
    with pytest.raises(UserError, match="holds no decoder: import it with --kind encoder"):
        import_checkpoint(src, tmp_path / "ae", "autoencoder", TINY)
    import_checkpoint(src, tmp_path / "enc", "encoder", TINY)
    assert json.loads((tmp_path / "enc" / "config.json").read_text())["kind"] == "encoder"
    a, b = Classifier(TINY, 10).eval(), Classifier(TINY, 10).eval()
    b.load_state_dict(a.state_dict())  # same head
    a.load_encoder(encoder, "original")
    b.load_encoder(encoder_state_dict_from(load_weights(tmp_path / "enc")), "imported")
    x = torch.rand(2, 3, 16, 16)
    assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_token_pooled_vit_imports_as_encoder(tmp_path, suffix):
    """A timm ViT (cls token, norm, head): its encoder features are ours exactly; the head is reported ignored."""
    vit = _timm_vit("token")
    src = _write(tmp_path / f"vit{suffix}", vit.state_dict())
    with pytest.raises(UserError, match="pooled on the cls token"):
        import_checkpoint(src, tmp_path / "cls", "classifier", TINY)
    result = import_checkpoint(src, tmp_path / "enc", "encoder", TINY)
    assert result.ignored == ["head.bias", "head.weight"]
    model = DenoisingMAE(TINY).eval()
    model.load_state_dict(load_weights(tmp_path / "enc"), strict=False)
    x = torch.rand(2, 3, 16, 16)
    ours, _, _ = model.forward_encoder(model.input_adapter(x), 0.0)
    theirs = vit.forward_features((x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1))
    assert torch.allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("wrap", ["timm .safetensors", "MAE fine-tuned {'model': ...}", "training checkpoint"])
def test_fine_tuned_classifiers_give_the_same_logits(tmp_path, wrap):
    """timm / MAE fine-tuned ViTs (avg pooling, fc_norm, head) load into dmae's Classifier unchanged."""
    vit = _timm_vit("avg")
    sd = vit.state_dict()
    content = {"timm .safetensors": sd, "MAE fine-tuned {'model': ...}": {"model": sd},
               "training checkpoint": _training_checkpoint(sd)}[wrap]
    src = _write(tmp_path / ("vit.safetensors" if wrap.startswith("timm") else "vit.pth"), content)
    import_checkpoint(src, tmp_path / "out", "classifier", TINY)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    with torch.device("meta"):
        assert config == Classifier(TINY, 10).config()
    model = load_classifier(tmp_path / "out", expect_classes=10, expect_cfg=TINY).eval()
    x = torch.rand(4, 3, 16, 16)
    expected = vit((x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1))
    assert torch.allclose(model(x), expected, atol=1e-6)


def test_released_vit_b_weights_round_trip(tmp_path):
    """Real ViT-B/16 weights (112M parameters) as the released flat file: every tensor kept exactly."""
    cfg = ModelConfig("base", 224, 16, 3, MEAN, STD)
    state = DenoisingMAE(cfg).state_dict()
    src = _write(tmp_path / "dmae_base.pth", state)
    result = import_checkpoint(src, tmp_path / "out", "autoencoder", cfg)
    assert round(result.num_params / 1e6, 1) == 111.9
    weights = load_weights(tmp_path / "out")
    assert weights.keys() == state.keys() and all(torch.equal(weights[k], v) for k, v in state.items())
    with pytest.raises(UserError, match=r"dmae_base\.pth: does not fit --preset large"):
        import_checkpoint(src, tmp_path / "bad", "autoencoder", ModelConfig("large", 224, 16, 3, MEAN, STD))
    assert not (tmp_path / "bad").exists()


# -- refusals ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("file_preset, asked", [("large", "base"), ("base", "large")])
def test_vit_b_and_l_layouts_checked_key_by_key(file_preset, asked):
    """The full ViT-B/L key layouts, on the meta device: the right preset fits, the other is refused by name."""
    cfg = {p: ModelConfig(p, 224, 16, 3, MEAN, STD) for p in ("base", "large")}
    with torch.device("meta"):
        state = DenoisingMAE(cfg[file_preset]).state_dict()
    weights, ignored, _ = convert(state, "autoencoder", cfg[file_preset], Path("released.pth"))
    assert weights.keys() == state.keys() and not ignored
    with pytest.raises(UserError) as err:
        convert(state, "autoencoder", cfg[asked], Path("released.pth"))
    msg = str(err.value)
    width = {"base": 768, "large": 1024}
    assert msg.startswith(f"released.pth: does not fit --preset {asked}")
    assert f"cls_token: file (1, 1, {width[file_preset]}), model (1, 1, {width[asked]})" in msg
    assert f"fits --preset {file_preset}" in msg


def test_wrong_input_size_and_channels_refused(tmp_path, autoencoder):
    src = _write(tmp_path / "ckpt.pth", autoencoder.state_dict())
    with pytest.raises(UserError, match=r"pos_embed: file \(1, 17, 128\), model \(1, 65, 128\)"):
        import_checkpoint(src, tmp_path / "out", "autoencoder", ModelConfig("tiny", 32, 4, 3, MEAN, STD))
    with pytest.raises(UserError, match=r"patch_embed.proj.weight: file \(128, 3, 4, 4\), model \(128, 1, 4, 4\)"):
        import_checkpoint(src, tmp_path / "out", "autoencoder", ModelConfig("tiny", 16, 4, 1, (0.5,), (0.2,)))
    assert not (tmp_path / "out").exists()


def test_unexpected_keys_refused(tmp_path, autoencoder):
    src = _write(tmp_path / "ckpt.pth", {**autoencoder.state_dict(), "extra.weight": torch.zeros(3)})
    with pytest.raises(UserError, match=r"unexpected keys \(1\): extra.weight"):
        import_checkpoint(src, tmp_path / "out", "autoencoder", TINY)


@pytest.mark.parametrize("damage", ["truncated .pth", "truncated .safetensors", "random bytes", "empty"])
def test_damaged_files_refused_with_a_clear_message(tmp_path, autoencoder, damage):
    suffix = ".safetensors" if "safetensors" in damage else ".pth"
    good = _write(tmp_path / f"good{suffix}", autoencoder.state_dict()).read_bytes()
    data = {"random bytes": os.urandom(4096), "empty": b""}.get(damage, good[: len(good) // 2])
    src = tmp_path / f"bad{suffix}"
    src.write_bytes(data)
    with pytest.raises(UserError, match=r"bad\.(pth|safetensors): not a readable (checkpoint|safetensors file)"):
        import_checkpoint(src, tmp_path / "out", "autoencoder", TINY)
    assert not (tmp_path / "out").exists()


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("how", ["torch.save", "pickle protocol 2", "pickle protocol 4"])
def test_pickle_that_would_run_code_is_refused(tmp_path, autoencoder, how):
    marker = tmp_path / "pwned"
    content = {"args": _RunsCode(marker), "model": autoencoder.state_dict()}  # the payload is met first
    src = tmp_path / "evil.pth"
    if how == "torch.save":
        torch.save(content, src)
    else:
        with open(src, "wb") as fh:
            pickle.dump(content, fh, protocol=int(how[-1]))
    # protocol 4 framing is itself refused by the safe loader, before any global is looked at
    reason = "not a readable checkpoint" if how.endswith("4") else "refused: loading it would call or build posix"
    with pytest.warns(UserWarning) if how.endswith("4") else nullcontext():
        with pytest.raises(UserError, match=rf"evil\.pth: {reason}"):
            import_checkpoint(src, tmp_path / "out", "autoencoder", TINY)
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_files_without_a_state_dict_refused(tmp_path):
    with pytest.raises(UserError, match="holds a list, not a state dict"):
        import_checkpoint(_write(tmp_path / "a.pth", [torch.zeros(1)]), tmp_path / "out", "autoencoder", TINY)
    with pytest.raises(UserError, match="found no state dict"):
        import_checkpoint(_write(tmp_path / "b.pth", {"epoch": 3, "w": torch.zeros(1)}), tmp_path / "out",
                          "autoencoder", TINY)
    with pytest.raises(UserError, match="file not found"):
        import_checkpoint(tmp_path / "missing.pth", tmp_path / "out", "autoencoder", TINY)


def test_model_config_options_validated():
    assert model_config("base", 224, 16, 3, None, None).mean == MEAN
    with pytest.raises(UserError, match="unknown"):
        model_config("huge", 224, 16, 3, None, None)
    with pytest.raises(UserError, match="not divisible"):
        model_config("base", 224, 15, 3, None, None)
    with pytest.raises(UserError, match="give --mean and --std"):
        model_config("tiny", 16, 4, 1, None, None)
    with pytest.raises(UserError, match="3 values each"):
        model_config("base", 224, 16, 3, (0.5,), (0.2,))


# -- the command and pretrain.init_from ------------------------------------------------------------------------
runner = CliRunner()


def _flat(output: str) -> str:
    """Command output with rich's line wrapping undone."""
    return " ".join(output.split())


def test_command_writes_checkpoint_and_refuses_mismatch(tmp_path, autoencoder):
    src = _write(tmp_path / "released.pth", autoencoder.state_dict())
    common = ["import-checkpoint", str(src), "--img-size", "16", "--patch-size", "4", "--out", str(tmp_path / "o")]
    ok = runner.invoke(app, [*common, "--preset", "tiny", "--mean", "0.4914,0.4822,0.4465",
                             "--std", "0.2471,0.2435,0.2616"])
    assert ok.exit_code == 0, ok.output
    assert json.loads((tmp_path / "o" / "config.json").read_text())["mean"] == [0.4914, 0.4822, 0.4465]
    source = json.loads((tmp_path / "o" / "source.json").read_text())
    assert source["file"] == "released.pth" and len(source["sha256"]) == 64
    bad = runner.invoke(app, [*common, "--preset", "small"])
    assert bad.exit_code == 2 and "released.pth: does not fit --preset small" in _flat(bad.output)
    assert "fits --preset tiny" in _flat(bad.output)


def _params(path: Path, **pretrain) -> None:
    raw = yaml.safe_load(path.read_text())
    raw["pretrain"].update(pretrain)
    path.write_text(yaml.safe_dump(raw))


def test_pretrain_with_zero_epochs_copies_the_imported_weights(tiny_params, digits_dir):
    """`pretrain.epochs: 0` + init_from: models/pretrain holds the imported weights, under the data's config."""
    digits = ModelConfig("tiny", 16, 4, 1, (0.5,), (0.3,))
    torch.manual_seed(0)
    state = DenoisingMAE(digits).state_dict()
    src = _write(Path("released.pth"), state)
    import_checkpoint(src, "models/imported/tiny", "autoencoder", digits)
    _params(tiny_params, epochs=0, warmup_epochs=0, init_from="models/imported/tiny")
    result = runner.invoke(app, ["pretrain", "--data", str(digits_dir)])
    assert result.exit_code == 0, result.output
    weights = load_weights("models/pretrain")
    assert all(torch.equal(weights[k], v) for k, v in state.items())
    meta = json.loads((digits_dir / "meta.json").read_text())
    assert json.loads(Path("models/pretrain/config.json").read_text())["mean"] == meta["mean"]  # the data's
    assert Path("results/pretrain/metrics.tsv").read_text() == "epoch\tloss\tlr\n"
    assert Path("results/pretrain/reconstructions.png").is_file()


def test_zero_epochs_needs_init_from_and_ignores_warm_up():
    assert settings("pretrain", epochs=0, init_from="models/imported/x", warmup_epochs=4).epochs == 0
    with pytest.raises(ValueError, match="needs init_from"):
        settings("pretrain", epochs=0, warmup_epochs=0)


def test_init_from_refusals(tiny_params, digits_dir, autoencoder):
    _params(tiny_params, epochs=0, warmup_epochs=0, init_from="models/imported/none")
    missing = runner.invoke(app, ["pretrain", "--data", str(digits_dir)])
    assert missing.exit_code == 2 and "dmae import-checkpoint" in _flat(missing.output)
    import_checkpoint(_write(Path("rgb.pth"), autoencoder.state_dict()), "models/imported/rgb", "autoencoder", TINY)
    _params(tiny_params, init_from="models/imported/rgb")  # 3 channels, the digits have 1
    wrong = runner.invoke(app, ["pretrain", "--data", str(digits_dir)])
    assert wrong.exit_code == 2 and "in_chans 3; params ask for" in _flat(wrong.output)
    _params(tiny_params, init_from=None)
    unset = runner.invoke(app, ["pretrain", "--data", str(digits_dir)])
    assert unset.exit_code == 2 and "epochs 0 skips pretraining, so it needs init_from" in _flat(unset.output)
