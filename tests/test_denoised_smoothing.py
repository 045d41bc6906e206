"""Denoised smoothing: the denoise-then-classify base classifier, its settings, stages and report section."""

import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from dmae.defense.chain import Defense, DefenseInputs, Denoised
from dmae.models.architectures import ModelConfig
from dmae.models.autoencoder import DenoisingMAE
from dmae.models.classifier import Classifier
from dmae.settings import parse_params
from dmae.smoothing import Smooth
from dmae.util.errors import UserError
from stages.cli import app
from tests.conftest import params_with

CFG = ModelConfig("tiny", 16, 4, 1, (0.3,), (0.3,))
SIGMA = 0.5


@pytest.fixture(scope="module")
def chain():
    torch.manual_seed(0)
    denoiser, classifier = DenoisingMAE(CFG), Classifier(CFG, 10)
    torch.nn.init.normal_(classifier.vit.head.weight, std=0.5)  # untrained, not flat: the classes differ
    return Denoised(denoiser, classifier, SIGMA)


def test_chain_is_a_pure_function_of_its_input(chain):
    x = torch.rand(6, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    rng = torch.get_rng_state()
    with torch.no_grad():
        first, second = chain(x), chain(x.clone())
        one_by_one = torch.cat([chain(x[i:i + 1]) for i in range(len(x))])
    assert torch.equal(torch.get_rng_state(), rng)  # no noise or masking drawn inside
    assert torch.equal(first, second)
    assert torch.allclose(first, one_by_one, atol=1e-5)  # each output depends on its own input only
    assert not torch.allclose(first[0], first[1])


def test_chain_is_the_defense_without_its_noise(chain):
    """Denoised(x + eps) is what the De^3 defense computes after drawing eps itself."""
    x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    defense = Defense(chain.denoiser, chain.classifier, SIGMA)
    torch.manual_seed(5)
    with torch.no_grad():
        expected = defense(x)
    torch.manual_seed(5)
    noisy = x + SIGMA * torch.randn_like(x)
    with torch.no_grad():
        assert torch.allclose(chain(noisy), expected, atol=1e-6)


def test_chain_denoiser_is_frozen_in_training(chain):
    chain.train()
    try:
        assert not chain.denoiser.training and chain.classifier.training
        assert not any(p.requires_grad for p in chain.denoiser.parameters())
        loss = chain(torch.rand(2, 1, 16, 16)).sum()
        loss.backward()
        assert all(p.grad is None for p in chain.denoiser.parameters())
        assert any(p.grad is not None for p in chain.classifier.parameters())
    finally:
        chain.eval()
        chain.classifier.zero_grad(set_to_none=True)


def test_certificates_through_the_chain_do_not_depend_on_batch_size(chain):
    smooth = Smooth(chain, 10, SIGMA, seed=0)
    xs = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    for i, x in enumerate(xs):
        results = {b: smooth.certify(x, 20, 200, 0.01, b, index=i) for b in (7, 64, 220)}
        assert len(set(results.values())) == 1, results
    adaptive = {b: smooth.certify_adaptive(xs[0], 20, 300, 0.01, b, radii=[0.0, 0.25, 0.5]) for b in (9, 128)}
    assert len(set(adaptive.values())) == 1, adaptive


def test_fixed_sigma_inputs_noise_every_image_at_sigma():
    torch.manual_seed(0)
    denoiser = DenoisingMAE(CFG)
    x = torch.full((4, 1, 16, 16), 0.5)
    eps = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(4))
    u = torch.tensor([0.0, 0.25, 0.5, 1.0])
    noisy = DefenseInputs("noisy", 0.3, fixed=True).view(x, eps, u)
    assert torch.allclose(noisy, x + 0.3 * eps)  # u is ignored: one sigma for all
    spread = DefenseInputs("noisy", 0.3).view(x, eps, u)
    assert torch.allclose(spread[0], x[0]) and torch.allclose(spread[3], x[3] + 0.3 * eps[3])
    denoised = DefenseInputs("denoised", 0.3, denoiser, fixed=True).view(x, eps, u)
    assert torch.allclose(denoised, denoiser.reconstruct(x + 0.3 * eps, True, 0.3))


@pytest.mark.parametrize("change, message", [
    ({"chains": {"x": {"denoiser": "nope", "classifier": "undefended"}}},
     "denoised_smoothing.chains.x.denoiser = 'nope': not a pretrained model"),
    ({"chains": {"x": {"denoiser": "wide", "classifier": "nope"}}},
     "denoised_smoothing.chains.x.classifier = 'nope': not per_sigma or a key of defense.classifiers"),
    ({"finetune": {"encoder": "nope"}}, "denoised_smoothing.finetune.encoder = 'nope'"),
    ({"test_every": 0}, "test_every"),
])
def test_bad_chain_settings_name_the_key(change, message):
    with pytest.raises(UserError, match=message.replace(".", r"\.").replace("(", r"\(")):
        parse_params(params_with({"denoised_smoothing": change}))


def test_chain_stages_and_report_on_tiny_settings(tiny_params, monkeypatch):
    """prepare -> the two autoencoders -> the clean classifier -> the per-sigma classifier -> both chains ->
    the report's denoised-smoothing section and headline metrics."""
    params = yaml.safe_load(tiny_params.read_text())
    params["sigmas"] = [0.5]
    params["defense"]["denoisers"] = {"wide": {**params["defense"]["denoisers"]["wide"], "epochs": 1,
                                               "warmup_epochs": 0}}
    params["defense"]["classifiers"] = {  # the attack stage (and its figure's classifier) is not run here
        "undefended": {"input": "clean", "encoder": "wide", "denoiser": None},
        "shown": {"input": "denoised", "encoder": "wide", "denoiser": "wide"}}
    params["defense"]["finetune"].update(epochs=1, warmup_epochs=0)
    params["attack"]["figure"] = "shown"
    params["attack"]["autoattack"]["classifiers"] = ["undefended"]
    tiny_params.write_text(yaml.safe_dump(params))

    runner = CliRunner()

    def invoke(*args):
        result = runner.invoke(app, list(args), catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result

    for args in (["prepare"], ["pretrain"], ["pretrain", "--variant", "wide"],
                 ["finetune-defense", "--classifier", "undefended"]):
        invoke(*args)
    table = invoke("bench-denoisers").output
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert {"none (the noisy input, clamped)", "dmae", "wide"} <= set(rows)
    bad = runner.invoke(app, ["certify-chain", "--sigma", "0.5", "--chain", "nope"])
    assert bad.exit_code == 2 and "--chain 'nope' is not a key of params denoised_smoothing.chains" in bad.output
    invoke("finetune", "--sigma", "0.5")
    invoke("certify", "--sigma", "0.5")
    invoke("finetune-chain", "--sigma", "0.5")
    for name in ("off_the_shelf", "fine_tuned"):
        invoke("certify-chain", "--sigma", "0.5", "--chain", name)
    rows = (tiny_params.parent / "results/chains/fine_tuned/sigma-0.5.tsv").read_text().splitlines()
    assert rows[0] == "idx\tlabel\tpredict\tradius\tcorrect\tsamples\tvotes"
    tests = json.loads((tiny_params.parent / "data/prepared/meta.json").read_text())["splits"]["test"]
    assert [int(row.split()[0]) for row in rows[1:]] == list(range(len(range(0, tests, 3))))  # every 3rd
    settings = json.loads((tiny_params.parent / "models/chains/sigma-0.5/settings.json").read_text())
    assert settings["sigma"] == 0.5 and settings["chain_finetune"] == {"denoiser": "wide", "encoder": "dmae"}

    invoke("report")
    report = (tiny_params.parent / "results/report/report.md").read_text()
    assert "Denoised smoothing: one denoiser, any classifier" in report
    assert "off_the_shelf: denoiser wide + classifier undefended" in report
    assert (tiny_params.parent / "results/report/figures/chains.png").is_file()
    headline = json.loads((tiny_params.parent / "results/report/headline.json").read_text())
    assert set(headline["denoised_smoothing"]) == {"off_the_shelf", "fine_tuned"}
