"""De^3: the defense chain, the fine-tuning inputs, the attack evaluation and its settings (untrained tiny models)."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from dmae.defense import robustness
from dmae.defense.attacks import input_gradient
from dmae.defense.chain import Defense, DefenseInputs
from dmae.defense.robustness import columns, craft, evaluate_defense
from dmae.models.architectures import ModelConfig
from dmae.models.autoencoder import DenoisingMAE
from dmae.models.classifier import Classifier
from dmae.settings import deep_merge, parse_params
from dmae.util.errors import UserError
from tests.conftest import NO_AUTOATTACK, params_with, settings

CFG = ModelConfig("tiny", 16, 4, 1, (0.3,), (0.3,))
ATTACK = settings("attack", examples=4, batch_size=3, test_sigmas=[0.0, 0.25], eps=8 / 255, eot=3,
                  pgd={"steps": 2, "step_size": 4 / 255}, square={"queries": 6}, autoattack=NO_AUTOATTACK)


class BackwardCounter:
    """Counts backward passes through the denoiser's last layer."""

    def __init__(self, denoiser: DenoisingMAE):
        self.calls = 0
        denoiser.decoder_pred.register_full_backward_hook(self._hook)

    def _hook(self, module, grad_input, grad_output):
        self.calls += 1


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    denoiser, classifier = DenoisingMAE(CFG), Classifier(CFG, 10)
    torch.nn.init.normal_(classifier.vit.head.weight, std=0.5)  # untrained, not flat: nonzero input gradients
    x = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 3])
    return denoiser, classifier, x, y


def test_defense_is_differentiable_end_to_end_and_the_denoiser_stays_frozen(parts):
    denoiser, classifier, x, y = parts
    defense = Defense(denoiser, classifier, sigma=0.25)
    counter = BackwardCounter(denoiser)
    grad = input_gradient(defense, x, y)
    assert grad.abs().sum() > 0 and counter.calls == 1
    assert all(not p.requires_grad and p.grad is None for p in denoiser.parameters())
    defense.train()
    assert not denoiser.training and classifier.training
    classifier.eval()


def test_sigma_zero_is_the_classifier_alone(parts):
    denoiser, classifier, x, _ = parts
    counter = BackwardCounter(denoiser)
    defense = Defense(denoiser, classifier, sigma=0.0)
    assert torch.equal(defense(x), classifier(x))
    with pytest.raises(UserError, match="needs a denoiser"):
        Defense(None, classifier, sigma=0.1)
    input_gradient(defense, x, torch.zeros(4, dtype=torch.long))
    assert counter.calls == 0


def test_gray_box_gradients_never_pass_through_the_denoiser(parts):
    denoiser, classifier, x, y = parts
    defense = Defense(denoiser, classifier, sigma=0.25)
    counter = BackwardCounter(denoiser)
    for column in ("gray_fgsm", "gray_pgd"):
        x_adv = craft(column, defense, x, y, ATTACK, seed=0)
        assert (x_adv - x).abs().max() <= ATTACK.eps + 1e-6
    assert counter.calls == 0
    craft("white_pgd", defense, x, y, ATTACK, seed=0)
    assert counter.calls == ATTACK.pgd.steps


def test_eot_averages_fresh_draws(parts):
    denoiser, classifier, x, y = parts
    defense = Defense(denoiser, classifier, sigma=0.25)
    torch.manual_seed(5)
    averaged = input_gradient(defense, x, y, eot=3)
    torch.manual_seed(5)
    singles = [input_gradient(defense, x, y) for _ in range(3)]
    assert not torch.allclose(singles[0], singles[1])  # each pass draws its own noise
    torch.testing.assert_close(averaged, sum(singles) / 3)


def test_training_inputs(parts):
    denoiser, _, x, _ = parts
    eps, u = torch.randn_like(x), torch.tensor([0.0, 0.5, 1.0, 0.25])
    assert torch.equal(DefenseInputs("clean", 0.1).view(x, eps, u), x)
    noisy = DefenseInputs("noisy", 0.1).view(x, eps, u)
    torch.testing.assert_close(noisy, x + 0.1 * u.view(-1, 1, 1, 1) * eps)
    denoised = DefenseInputs("denoised", 0.1, denoiser).view(x, eps, u)
    assert not denoised.requires_grad and denoised.min() >= 0 and denoised.max() <= 1
    torch.testing.assert_close(denoised, denoiser.reconstruct(noisy, True, 0.1 * u))
    with pytest.raises(UserError, match="needs a denoiser"):
        DefenseInputs("denoised", 0.1)


def test_evaluate_is_deterministic_and_copies_what_is_equal_without_noise(parts):
    denoiser, classifier, x, y = parts
    run = []
    plain = evaluate_defense(Defense(denoiser, classifier, 0.0), x, y, ATTACK, key=("c", 0.0),
                     on_column=lambda column, accuracy, seconds: run.append(column))
    assert plain.accuracy["gray_pgd"] == plain.accuracy["white_pgd"]
    assert plain.accuracy["white_fgsm_eot"] == plain.accuracy["white_fgsm"]
    assert run == ["clean", "white_fgsm", "white_pgd", "square", "sweep_pgd_0.5"]
    assert plain.accuracy["sweep_pgd_0"] == plain.accuracy["clean"]  # PGD with eps 0 is not run: the clean image

    noisy = Defense(denoiser, classifier, 0.25)
    runs = [evaluate_defense(noisy, x, y, ATTACK, key=("c", 0.25), keep=2) for _ in range(2)]
    assert runs[0].accuracy == runs[1].accuracy and list(runs[0].accuracy) == columns(ATTACK)
    assert runs[0].shown.shape == (2, 1, 16, 16) and torch.equal(runs[0].shown, runs[1].shown)
    assert all(0 <= a <= 1 for a in runs[0].accuracy.values())


def test_autoattack_runs_on_the_first_examples_at_its_test_sigmas_only(parts, monkeypatch):
    """AutoAttack sees the first autoattack.examples examples (accuracy over those), only for its classifiers at
    its test sigmas, and 'rand' never without noise. The attack is replaced by one that breaks every other example."""
    denoiser, classifier, x, y = parts
    seen = []

    def fake_autoattack(model, xb, yb, eps, version, seed, batch_size, warnings, **budget):
        assert budget == cfg.autoattack.budget.model_dump()  # the params' budget reaches the attack
        seen.append((version, len(xb)))
        return xb + (torch.arange(len(xb)) % 2 == 1).float()[:, None, None, None]  # odd ones: moved away

    monkeypatch.setattr(robustness, "autoattack", fake_autoattack)
    monkeypatch.setattr(robustness, "correct_per_draw",  # correct unless moved
                        lambda model, x_adv, yb, draws: [int((x_adv.flatten(1).amax(1) <= 1).sum())] * draws)
    cfg = settings("attack", examples=4, batch_size=2, test_sigmas=[0.0, 0.25, 0.5], eot=1, draws=2,
                   pgd={"steps": 1}, square={"queries": 2}, eps_sweep=[],
                   autoattack={"versions": ["standard", "rand"], "examples": 3, "classifiers": ["c"],
                               "test_sigmas": [0.0, 0.25]})
    x = x.clamp(0.1, 0.4)  # moved examples exceed 1

    def evaluate(name, sigma):
        return evaluate_defense(Defense(denoiser, classifier, sigma), x, y, cfg, key=(name, sigma),
                                autoattack=tuple(cfg.autoattack_columns(name, sigma)))

    assert evaluate("other", 0.0).accuracy["autoattack_standard"] is None and seen == []
    none = evaluate("c", 0.0)
    assert seen == [("standard", 2), ("standard", 1)]  # 3 examples in batches of 2
    assert none.accuracy["autoattack_standard"] == pytest.approx(2 / 3) and none.accuracy["autoattack_rand"] is None
    seen.clear()
    low = evaluate("c", 0.25)
    assert seen == [("standard", 2), ("standard", 1), ("rand", 2), ("rand", 1)]
    assert low.accuracy["autoattack_rand"] == low.worst["autoattack_rand"] == pytest.approx(2 / 3)
    seen.clear()
    high = evaluate("c", 0.5)
    assert seen == [] and high.accuracy["autoattack_standard"] is None and high.accuracy["autoattack_rand"] is None


def test_attack_examples_all_or_a_seeded_count_and_autoattack_on_those_drawn_first(parts, monkeypatch):
    """A class-sorted split (labels 0,0,...,9,9): `all` is every example in index order; a count is the first drawn
    of the same seeded order, so AutoAttack's examples (ranks below its count) are a random subset of them."""
    labels = torch.arange(40) // 4
    split = torch.utils.data.TensorDataset(torch.rand(40, 1, 4, 4), labels)
    x, y, ranks = robustness.attack_examples(split, "all", seed=3)
    assert torch.equal(y, labels) and sorted(ranks.tolist()) == list(range(40))
    few_x, few_y, few_ranks = robustness.attack_examples(split, 12, seed=3, workers=2)
    assert torch.equal(few_x, x[ranks < 12]) and torch.equal(few_y, y[ranks < 12])
    assert torch.equal(few_ranks, ranks[ranks < 12])
    assert len(set(y[ranks < 5].tolist())) > 2  # the first five drawn are not the first classes

    denoiser, classifier, xs, ys = parts
    seen = []
    monkeypatch.setattr(robustness, "autoattack", lambda model, xb, *args, **kwargs: seen.append(xb) or xb)
    cfg = settings("attack", examples=4, batch_size=4, test_sigmas=[0.0], eot=1, draws=1, pgd={"steps": 1},
                   square={"queries": 2}, eps_sweep=[], autoattack={"versions": ["standard"], "examples": 2,
                                                                  "classifiers": ["c"], "test_sigmas": [0.0]})
    evaluate_defense(Defense(denoiser, classifier, 0.0), xs, ys, cfg, key=("c", 0.0),
                     autoattack=("autoattack_standard",), ranks=torch.tensor([3, 0, 2, 1]))
    assert len(seen) == 1 and torch.equal(seen[0], xs[[1, 3]])  # ranks 0 and 1, in index order


@pytest.mark.parametrize("raw, message", [
    ({"attack": {"eps": 1.5}}, "attack.eps = 1.5"),
    ({"attack": {"pgd": {"steps": 0}}}, "attack.pgd.steps = 0"),
    ({"attack": {"eot": 0}}, "attack.eot = 0"),
    ({"attack": {"autoattack": {"versions": ["fast"]}}}, "attack.autoattack.versions.0 = 'fast'"),
    ({"attack": {"autoattack": {"test_sigmas": [0.5]}}}, "autoattack.test_sigmas [0.5] are not in test_sigmas"),
    ({"attack": {"examples": 8, "autoattack": {"examples": 9}}}, "autoattack.examples = 9 is more than examples = 8"),
    ({"attack": {"examples": "every"}}, "attack.examples = 'every'"),
    ({"attack": {"autoattack": {"examples": 0}}}, "attack.autoattack.examples = 0"),
    ({"attack": {"autoattack": {"versions": ["rand", "rand"]}}}, "autoattack.versions has duplicates"),
    ({"attack": {"autoattack": ["standard"]}}, "attack.autoattack"),
    ({"attack": {"autoattack": {"classifiers": ["vit"]}}}, "attack.autoattack.classifiers ['vit']: not keys of"),
    ({"attack": {"test_sigmas": [0.0, -0.1]}}, "attack.test_sigmas.1 = -0.1"),
    ({"attack": {"figure": "undefended"}}, "attack.figure = 'undefended'"),
    ({"attack": {"queries": 5}}, "attack.queries: unknown key"),
    ({"defense": {"train_sigma_max": 2}}, "defense.train_sigma_max = 2"),
    ({"defense": {"denoisers": {"nim": {"mask_ratio": 0.5, "task": "nim"}}}},
     "defense.denoisers.nim: task 'nim' is noise only"),
    ({"defense": {"denoisers": {"nim": {"task": "nim", "mask_ratio": 0, "epochs": -1}}}},
     "defense.denoisers.nim.epochs = -1"),
    ({"defense": {"denoisers": {"dmae": {}}}}, "defense.denoisers.dmae: the name is taken"),
    ({"defense": {"classifiers": {"a": {"input": "clean", "encoder": "simclr", "denoiser": None}}}},
     "defense.classifiers.a.encoder = 'simclr'"),
    ({"defense": {"classifiers": {"a": {"input": "denoised", "encoder": "nim", "denoiser": None}}}},
     "needs a denoiser"),
    ({"defense": {"finetune": {"consistency": {"enabled": True}}}}, "defense.finetune.consistency.enabled"),
    ({"defense": {"finetune": {"lr": 1}}}, "defense.finetune.lr: unknown key"),
])
def test_bad_defense_and_attack_params_name_the_key(raw, message):
    with pytest.raises(UserError) as err:
        parse_params(params_with(raw), source="params.yaml")
    assert message in str(err.value)


def test_denoiser_settings_merge_the_variant_into_pretrain():
    raw = params_with({"pretrain": {"epochs": 7, "base_lr": 0.01}})
    raw["defense"]["denoisers"]["nim"] = {"task": "nim", "mask_ratio": 0.0,
                                          "noise": {"dist": "gamma", "shape": 25.0, "scale": 3.0, "per255": True}}
    params = parse_params(raw)
    nim = params.denoiser_settings("nim")
    assert (nim.task, nim.mask_ratio, nim.noise.dist, nim.noise.per255) == ("nim", 0.0, "gamma", True)
    assert nim.epochs == 7 and nim.base_lr == 0.01 and nim.noise.sigma == params.pretrain.noise.sigma
    assert params.denoiser_settings("dmae") == params.pretrain
    assert not params.defense_finetune().consistency.enabled


# -- the stages ------------------------------------------------------------------------------------------------

def _invoke(*args):
    from typer.testing import CliRunner

    from stages.cli import app

    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def _update(params_path, replace: dict | None = None, **sections):
    """Deep-merge `sections` into the params file; `replace` sets dotted keys to a value as it is."""
    raw = deep_merge(yaml.safe_load(params_path.read_text()), sections)
    for key, value in (replace or {}).items():
        *parents, leaf = key.split(".")
        node = raw
        for name in parents:
            node = node[name]
        node[leaf] = value
    params_path.write_text(yaml.safe_dump(raw))


@pytest.mark.parametrize("args, section, message", [
    (["attack"], {"attack": {"eps": 2}}, "attack.eps = 2"),
    (["attack"], {"attack": {"pgd": {"steps": 0}}}, "attack.pgd.steps = 0"),
    (["finetune-defense", "--classifier", "nim"], {"defense": {"train_sigma_max": -1}},
     "defense.train_sigma_max = -1"),
    (["finetune-defense", "--classifier", "simclr"], {}, "--classifier 'simclr' is not a key"),
    (["pretrain", "--variant", "dmae"], {}, "--variant 'dmae' is not a key"),
])
def test_bad_params_and_names_exit_2_before_any_work(tiny_params, args, section, message):
    _update(tiny_params, **section)
    result = _invoke(*args)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert not any(Path(d).exists() for d in ("data", "models", "results"))


@pytest.mark.slow
def test_defense_stages_end_to_end_deterministic_and_resumable(tiny_params, monkeypatch):
    _update(tiny_params,
            replace={"defense.denoisers": {"nim": {"task": "nim", "mask_ratio": 0.0, "noise": {"dist": "gamma"}}},
                     "defense.classifiers": {
                         "undefended": {"input": "clean", "encoder": "nim", "denoiser": None},
                         "nim": {"input": "denoised", "encoder": "nim", "denoiser": "nim"},
                         "dmae": {"input": "noisy", "encoder": "dmae", "denoiser": "dmae"}},
                     "defense.finetune": {"consistency": {"enabled": False}, "epochs": 1, "warmup_epochs": 0},
                     "denoised_smoothing.finetune": {"denoiser": "nim", "encoder": "nim"},
                     "denoised_smoothing.chains": {"nim": {"denoiser": "nim", "classifier": "nim"}}},
            attack={"examples": 5, "batch_size": 3, "test_sigmas": [0.0, 0.25], "eot": 2, "pgd": {"steps": 2},
                    "square": {"queries": 4}, "autoattack": NO_AUTOATTACK})
    for args in (["prepare"], ["pretrain"], ["pretrain", "--variant", "nim"],
                 *(["finetune-defense", "--classifier", c] for c in ("undefended", "nim", "dmae"))):
        assert _invoke(*args).exit_code == 0, args
    assert Path("models/denoisers/nim/model.safetensors").is_file()
    assert Path("results/denoisers/nim/reconstructions.png").is_file()
    settings = json.loads(Path("models/defense/nim/settings.json").read_text())
    assert settings["classifier"]["input"] == "denoised" and not settings["finetune"]["consistency"]["enabled"]
    assert len(Path("results/defense/nim/metrics.tsv").read_text().splitlines()) == 2

    assert _invoke("attack").exit_code == 0
    out = Path("results/attack")
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"undefended", "nim", "dmae"} and set(metrics["nim"]) == {"sigma-0", "sigma-0.25"}
    assert set(metrics["undefended"]) == {"sigma-0"} and "white_pgd_eot" in metrics["nim"]["sigma-0.25"]["mean"]
    for columns_ in metrics["nim"]["sigma-0.25"]["worst_draw"], metrics["nim"]["sigma-0.25"]["mean"]:
        assert 0 <= columns_["white_pgd"] <= 1
    worst, mean = metrics["nim"]["sigma-0.25"]["worst_draw"], metrics["nim"]["sigma-0.25"]["mean"]
    assert 0 < metrics["nim"]["sigma-0.25"]["denoising_mse"] < 1 and "denoising_mse" not in metrics["nim"]["sigma-0"]
    assert all(worst[c] <= mean[c] for c in worst)  # the worst draw is never above the mean
    assert len((out / "tradeoff.tsv").read_text().splitlines()) == 1 + 1 + 2 + 2
    for stem in ("tradeoff", "adversarial"):
        assert (out / f"{stem}.png").is_file() and (out / f"{stem}.svg").is_file()
    first = {f: (out / f).read_bytes() for f in ("metrics.json", "tradeoff.tsv", "attack.md", "attack.json",
                                                "tradeoff.svg")}
    assert "| nim | 63.8/255 |" in first["attack.md"].decode() and "worst of" in first["attack.md"].decode()
    assert _invoke("attack").exit_code == 0
    assert first == {f: (out / f).read_bytes() for f in first}

    # interrupted after two rows, then rerun: resumes and ends with the same files
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return evaluate_defense(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(robustness, "evaluate_defense", interrupted)
        assert _invoke("attack").exit_code == 130
    assert any(Path("state").rglob("rows-0.pt"))  # the finished rows, kept for the rerun
    assert _invoke("attack").exit_code == 0
    assert first == {f: (out / f).read_bytes() for f in first}
    assert not any(Path("state").rglob("rows-0.pt"))


def test_mae_denoises_over_complementary_masks_predicting_each_patch_from_the_others():
    """groups = 4: every output patch comes from passes that masked it, so with pixel targets it does not depend
    on its own input patch at all, and does on the others."""
    torch.manual_seed(0)
    mae = DenoisingMAE(CFG).eval()
    x = torch.rand(1, 1, 16, 16, requires_grad=True)
    out = mae.reconstruct(x, norm_pix_loss=False, groups=4)
    out[0, 0, :4, :4].sum().backward()  # patch 0 (top left, 4x4 pixels)
    own, others = x.grad[0, 0, :4, :4], x.grad[0, 0].clone()
    others[:4, :4] = 0
    assert torch.count_nonzero(own) == 0 and torch.count_nonzero(others) > 0
    with torch.no_grad():
        assert torch.equal(mae.reconstruct(x, False, groups=4), mae.reconstruct(x.clone(), False, groups=4))
        assert not torch.allclose(mae.reconstruct(x, False, groups=4), mae.reconstruct(x, False))


def test_reconstruct_groups_follow_the_task():
    from tests.conftest import settings as section
    assert section("pretrain", task="mae", mask_ratio=0.75, noise={"dist": "none"}).reconstruct_groups == 4
    assert section("pretrain", task="mae", mask_ratio=0.5, noise={"dist": "none"}).reconstruct_groups == 2
    assert section("pretrain").reconstruct_groups == 1  # DMAE: one pass without masking


def test_bpda_gradient_is_the_classifiers_at_the_denoised_image(parts):
    from dmae.defense.chain import StraightThrough
    denoiser, classifier, x, y = parts
    defense = Defense(denoiser, classifier, sigma=0.25)
    x = x.clone().requires_grad_(True)
    torch.manual_seed(7)
    torch.nn.functional.cross_entropy(StraightThrough(defense)(x), y).backward()
    torch.manual_seed(7)
    with torch.no_grad():
        denoised = defense.purify(x)[1]
    denoised.requires_grad_(True)
    torch.nn.functional.cross_entropy(classifier(denoised), y).backward()
    assert torch.allclose(x.grad, denoised.grad, atol=1e-7) and x.grad.abs().sum() > 0
    with pytest.raises(UserError, match="BPDA needs a defense with a denoiser"):
        StraightThrough(Defense(None, classifier, 0.0))
