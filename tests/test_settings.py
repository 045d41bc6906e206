"""Settings validation: every bad value fails before any work, with a message naming the key and value."""

import pytest

from dmae.settings import Params, load_params, load_runtime, parse_params
from dmae.util.errors import UserError
from tests.conftest import REPO, REPO_PARAMS, params_with

BAD = [
    ({"pretrain": {"noise": {"sigma": -0.1}}}, "pretrain.noise.sigma = -0.1"),
    ({"pretrain": {"mask_ratio": 1.0}}, "pretrain.mask_ratio = 1.0"),
    ({"pretrain": {"mask_ratio": -0.5}}, "pretrain.mask_ratio = -0.5"),
    ({"pretrain": {"epochs": -1}}, "pretrain.epochs = -1"),
    ({"pretrain": {"epochs": 0}}, "epochs 0 skips pretraining, so it needs init_from"),
    ({"pretrain": {"batch_size": -8}}, "pretrain.batch_size = -8"),
    ({"pretrain": {"learning_rate": 1}}, "pretrain.learning_rate: unknown key"),
    ({"colour": "blue"}, "colour: unknown key"),
    ({"model": {"img_size": 30, "patch_size": 4}}, "img_size 30 is not divisible by patch_size 4"),
    ({"model": {"preset": "huge"}}, "unknown preset 'huge'"),
    ({"data": {"dataset": "mnist"}}, "data.dataset = 'mnist'"),
    ({"data": {"dataset": "cifar10", "image_size": 16}}, "cifar10 images are 32x32"),
    ({"pretrain": {"task": "mae"}}, "task 'mae' is masking only"),
    ({"pretrain": {"task": "nim"}}, "task 'nim' is noise only"),
    ({"pretrain": {"noise": {"dist": "uniform", "low": 0.5, "high": 0.1}}}, "uniform noise needs high > low"),
    ({"pretrain": {"precision": "fp16"}}, "pretrain.precision = 'fp16'"),
    ({"pretrain": {"batch_size": 100, "accum_steps": 3}}, "not divisible by accum_steps"),
    ({"sigmas": [0.25, -1.0]}, "sigmas.1 = -1.0"),
    ({"sigmas": [0.25, 0.25]}, "sigmas has duplicates"),
    ({"sigmas": [0.25, 0.3]}, "eta has no value for sigma [0.3]"),
    ({"certify": {"alpha": 1.5}}, "certify.alpha = 1.5"),
    ({"certify": {"alpha": 0}}, "certify.alpha = 0"),
    ({"certify": {"n0": 0}}, "certify.n0 = 0"),
    ({"certify": {"n": "many"}}, "certify.n = 'many'"),
    ({"finetune": {"mode": "linear_probe", "init": "scratch"}}, "a linear probe needs a pretrained encoder"),
    ({"data": {"image_size": 32}}, "data.image_size 32 exceeds model.img_size 16"),
    ({"finetune": {"epochs": {0.25: 10, 0.5: 10}}}, "finetune.epochs has no value for sigma [1.0]"),
    ({"finetune": {"epochs": {0.25: 9, 0.5: 2, 1.0: 9}, "warmup_epochs": 3}},
     "warmup_epochs 3.0 exceeds epochs {0.25: 9, 0.5: 2"),
    ({"defense": {"finetune": {"epochs": {0.25: 5}, "consistency": {"enabled": False}}}},
     "defense.finetune.epochs: the De^3 classifiers"),
    ({"data": {"val_fraction": -0.1}}, "data.val_fraction = -0.1"),
    ({"data": {"val_fraction": True}}, "data.val_fraction = True"),
    ({"certify": {"test_every": 0}}, "certify.test_every = 0"),
    ({"pretrain": {"augment": "rrc_flip"}}, "pretrain.augment = 'rrc_flip': expected none or a section"),
]


def test_repo_params_are_valid_and_the_only_defaults():
    params = load_params(REPO / "params.yaml")
    assert params.pretrain.task == "dmae" and params.model.preset == "tiny"
    with pytest.raises(UserError, match="pretrain: Field required"):  # no section, no field has a default
        parse_params({k: v for k, v in REPO_PARAMS.items() if k != "pretrain"})
    raw = params_with({})
    del raw["pretrain"]["noise"]["sigma"]
    with pytest.raises(UserError, match="pretrain.noise.sigma: Field required"):
        parse_params(raw)
    assert Params.model_validate(REPO_PARAMS) == params


@pytest.mark.parametrize("text", ["", "# only a comment\n", "\n\n"])
def test_empty_params_file_is_refused(tmp_path, text):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match="holds no settings"):
        load_params(path)


@pytest.mark.parametrize("raw, message", BAD, ids=[m for _, m in BAD])
def test_bad_values_name_key_and_value(raw, message):
    with pytest.raises(UserError) as err:
        parse_params(params_with(raw), source="params.yaml")
    assert message in str(err.value)
    assert str(err.value).startswith("params.yaml: invalid settings")


def test_val_fraction_0_is_all_of_train():
    assert parse_params(params_with({"data": {"val_fraction": 0}})).data.val_fraction == 0.0


def test_finetune_epochs_per_sigma():
    params = parse_params(params_with({"finetune": {"epochs": {0.25: 10, 0.5: 20, 1.0: 40}},
                                       "defense": {"finetune": {"epochs": 5, "consistency": {"enabled": False}}}}))
    assert [params.finetune.epochs_at(s) for s in params.sigmas] == [10, 20, 40]
    assert params.defense_finetune().epochs_at(0.1) == 5


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(UserError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("pretrain: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_params(bad)


def test_environment_never_changes_results(monkeypatch):
    monkeypatch.setenv("PRETRAIN__EPOCHS", "99")
    monkeypatch.setenv("SIGMAS", "[9]")
    params = parse_params(REPO_PARAMS)
    assert params.pretrain.epochs == REPO_PARAMS["pretrain"]["epochs"] and params.sigmas == REPO_PARAMS["sigmas"]


def test_runtime_knobs_from_environment(monkeypatch):
    monkeypatch.setenv("DMAE_WORKERS", "3")
    assert load_runtime().workers == 3
    monkeypatch.setenv("DMAE_WORKERS", "-1")
    with pytest.raises(UserError, match="DMAE_WORKERS"):
        load_runtime()
