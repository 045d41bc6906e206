"""Reliability, bad input: every user mistake ends the `dmae` command with exit 2 and one message naming the key
(or file) and the value, writes no output and shows no Python traceback. Unsafe files are refused unread.

Tables here go through the command line (typer's CliRunner, plus one real subprocess). They reuse, rather than
repeat, the library-level tables: the invalid settings of tests/test_settings.py (`BAD`) and the malformed
certification files of tests/test_certify.py. Data set problems of the preparation step are tested in
tests/test_data.py; here only what a stage sees of a broken prepared folder.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from typer.testing import CliRunner

from dmae.data import read_meta
from dmae.models.autoencoder import DenoisingMAE
from dmae.models.checkpoint import save_weights
from dmae.models.classifier import Classifier
from dmae.settings import load_params
from dmae.smoothing.certify import CertifyRow, write_certify_tsv
from dmae.train.loop import resume as resume_training
from dmae.util.errors import UserError
from dmae.util.io import write_json
from dmae.util.state import load_state, save_state
from stages import paths, resolved
from stages.cli import app
from stages.common import work_state
from tests.conftest import params_with, settings
from tests.test_certify import test_malformed_tsv_names_file_and_line as _malformed_tsv_test
from tests.test_settings import BAD as SETTINGS_BAD

runner = CliRunner()
INF, NAN = float("inf"), float("nan")


def flat(text: str) -> str:
    """Command output with rich's line wrapping undone."""
    return " ".join(text.split())


def squeezed(text: str) -> str:
    """Without any whitespace: rich also folds long words (paths) across lines."""
    return "".join(text.split())


def run_cli(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def assert_user_error(result, *needles: str) -> None:
    out = flat(result.output)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "error:" in out, result.output
    for needle in needles:
        assert squeezed(needle) in squeezed(out), (needle, result.output)


# -- params.yaml: 25 cases of tests/test_settings.py plus these, all through the command line ----------------------
NEW_BAD = [
    # wrong types
    ({"sigmas": 0.25}, "sigmas = 0.25"),
    ({"model": "tiny"}, "model = 'tiny'"),
    ({"data": {"download": "maybe"}}, "data.download = 'maybe'"),
    ({"data": {"root": 5}}, "data.root = 5"),
    ({"pretrain": {"seed": 1.5}}, "pretrain.seed = 1.5"),
    ({"certify": {"n": 1.5}}, "certify.n = 1.5"),
    ({"finetune": {"consistency": "on"}}, "finetune.consistency = 'on'"),
    # out of range
    ({"model": {"patch_size": 0}}, "model.patch_size = 0"),
    ({"data": {"val_fraction": 1.0}}, "data.val_fraction = 1.0"),
    ({"data": {"test_every": 0}}, "data.test_every = 0"),
    ({"finetune": {"layer_decay": 1.5}}, "finetune.layer_decay = 1.5"),
    ({"finetune": {"drop_path": 1.0}}, "finetune.drop_path = 1.0"),
    ({"finetune": {"consistency": {"m": 1}}}, "finetune.consistency.m = 1"),
    ({"finetune": {"consistency": {"eta": {0.25: -1, 0.5: 0.5, 1.0: 0.1}}}}, "finetune.consistency.eta.0.25 = -1"),
    ({"certify": {"batch_size": 0}}, "certify.batch_size = 0"),
    ({"pretrain": {"noise": {"shape": 0}}}, "pretrain.noise.shape = 0"),
    ({"report": {"radii": [0.0, -0.25]}}, "report.radii.1 = -0.25"),
    ({"attack": {"eps": 2}}, "attack.eps = 2"),
    # not finite
    ({"pretrain": {"base_lr": INF}}, "pretrain.base_lr = inf"),
    ({"report": {"radii": [0.0, INF]}}, "report.radii.1 = inf"),
    ({"sigmas": [0.25, NAN]}, "sigmas.1 = nan"),
    # unknown keys
    ({"certify": {"N": 1000}}, "certify.N: unknown key"),
    ({"finetune": {"consistency": {"lambda": 2}}}, "finetune.consistency.lambda: unknown key"),
    ({"pretrain": {"noise": {"std": 0.5}}}, "pretrain.noise.std: unknown key"),
    # not one of the choices
    ({"finetune": {"mode": "probe"}}, "finetune.mode = 'probe'"),
    ({"pretrain": {"noise": {"dist": "laplace"}}}, "pretrain.noise.dist = 'laplace'"),
    ({"certify": {"precision": "fp64"}}, "certify.precision = 'fp64'"),
    ({"pretrain": {"augment": "mixup"}}, "pretrain.augment = 'mixup'"),
    # inconsistent combinations
    ({"finetune": {"epochs": 2, "warmup_epochs": 5}}, "warmup_epochs 5.0 exceeds epochs 2"),
    ({"finetune": {"batch_size": 100, "accum_steps": 3}}, "batch_size 100 is not divisible by accum_steps 3"),
    ({"pretrain": {"task": "mae", "noise": {"dist": "none"}, "mask_ratio": 0.0}}, "task 'mae' needs mask_ratio > 0"),
    ({"pretrain": {"noise": {"dist": "none"}}}, "task 'dmae' needs noise"),
    ({"defense": {"denoisers": {"dmae": {}}}}, "defense.denoisers.dmae: the name is taken"),
    ({"defense": {"denoisers": {"nim": {"mask_ratio": 2}}}}, "defense.denoisers.nim.mask_ratio = 2"),
    ({"defense": {"classifiers": {"x": {"input": "clean", "encoder": "nope", "denoiser": None}}}},
     "defense.classifiers.x.encoder = 'nope'"),
    ({"defense": {"finetune": {"consistency": {"enabled": True}}}}, "defense.finetune.consistency.enabled"),
    ({"attack": {"figure": "undefended"}}, "attack.figure = 'undefended'"),
    ({"attack": {"test_sigmas": [0.0, 0.0]}}, "test_sigmas has duplicates"),
    # sigma and radius grids the pipeline cannot use
    ({"sigmas": []}, "sigmas = []"),
    ({"sigmas": [0.12]}, "finetune.consistency.eta has no value for sigma [0.12]"),
    ({"report": {"radii": []}}, "report.radii = []"),
    # true/false is not a number, and numbers have a range (not only a sign)
    ({"data": {"image_size": True}}, "data.image_size = True: expected a number, not true/false"),
    ({"cpu_threads": True}, "cpu_threads = True"),
    ({"cpu_threads": 0}, "cpu_threads = 0"),
    ({"sigmas": [1e300]}, "sigmas.0 = 1e+300: Input should be less than or equal to 10"),
    ({"pretrain": {"noise": {"sigma": 1e30}}}, "pretrain.noise.sigma = 1e+30: Input should be less than or equal"),
    ({"pretrain": {"noise": {"sigma": 50}}}, "sigma = 50.0: a noise level must be at most 10 ([0,1] pixel units)"),
    ({"pretrain": {"noise": {"dist": "gamma", "shape": 25, "scale": 3, "high": 300, "per255": True}}},
     "high = 300.0: a noise level must be at most 255 (0-255 units)"),
    ({"data": {"seed": -1}}, "data.seed = -1"),
    ({"finetune": {"base_lr": 100}}, "finetune.base_lr = 100: Input should be less than or equal to 10"),
    ({"certify": {"n": 10**12}}, "certify.n = 1000000000000: Input should be less than or equal to 1000000000"),
    ({"certify": {"method": "fast"}}, "certify.method = 'fast'"),
    ({"certify": {"n_max": 0}}, "certify.n_max = 0"),
    ({"attack": {"test_sigmas": [0.0, 20]}}, "attack.test_sigmas.1 = 20"),
    ({"report": {"radii": [0.0, 1000]}}, "report.radii.1 = 1000"),
    ({"model": {"img_size": 10**6}}, "model.img_size = 1000000"),
    # values and keys holding rich markup are printed as they are, never interpreted
    ({"model": {"preset": "[/x]"}}, "unknown preset '[/x]'"),
    ({"data": {"dataset": "[bold]digits"}}, "data.dataset = '[bold]digits'"),
    ({"[red]": 1}, "[red]: unknown key"),
]
CLI_BAD = [*SETTINGS_BAD, *NEW_BAD]

# The stage each case goes through, in turn: every stage validates all of params.yaml before any work.
STAGES = [["prepare"], ["pretrain"], ["finetune", "--sigma", "0.25"], ["certify", "--sigma", "0.25"], ["report"],
          ["certify-merge", "--sigma", "0.25", "--shards", "2"]]


@pytest.fixture
def empty_project(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DMAE_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("DMAE_PROGRESS", "0")
    return tmp_path


@pytest.mark.parametrize("stage, missing", [
    (["pretrain"], "data/prepared"), (["finetune", "--sigma", "0.25"], "data/prepared"),
    (["certify", "--sigma", "0.25"], "data/prepared"), (["attack"], "data/prepared"),
    (["finetune-defense", "--classifier", "nim"], "data/prepared"),
    (["finetune-chain", "--sigma", "0.25"], "data/prepared"),
    (["certify-chain", "--sigma", "0.25", "--chain", "fine_tuned"], "data/prepared")])
def test_a_stage_without_its_inputs_writes_nothing(empty_project, stage, missing):
    """One line naming the missing input, exit 2, and no lock, fingerprint or output left behind."""
    (empty_project / "params.yaml").write_text(yaml.safe_dump(params_with({})))
    result = run_cli(*stage)
    assert_user_error(result, missing, "not found")
    assert sorted(os.listdir(empty_project)) == ["params.yaml"]


def test_a_stage_without_an_upstream_model_writes_nothing(empty_project):
    (empty_project / "params.yaml").write_text(yaml.safe_dump(params_with({})))
    assert run_cli("prepare").exit_code == 0
    result = run_cli("finetune", "--sigma", "0.25")
    assert_user_error(result, "models/pretrain not found")
    assert sorted(os.listdir(empty_project)) == ["data", "params.yaml"]


def test_enough_invalid_params_cases():
    assert len(CLI_BAD) >= 80
    assert len({m for _, m in CLI_BAD}) == len(CLI_BAD)


@pytest.mark.parametrize("case", range(len(CLI_BAD)), ids=[m for _, m in CLI_BAD])
def test_bad_params_exit_2_naming_key_and_value(empty_project, case):
    raw, message = CLI_BAD[case]
    (empty_project / "params.yaml").write_text(yaml.safe_dump(params_with(raw)))
    result = run_cli(*STAGES[case % len(STAGES)])
    assert_user_error(result, message, "params.yaml: invalid settings")
    assert sorted(os.listdir(empty_project)) == ["params.yaml"]  # no data, models, results or state


@pytest.mark.parametrize("text, message", [
    ("pretrain: [unclosed\n", "params.yaml: not valid YAML"),
    ("- 0.25\n- 0.5\n", "params.yaml: expected a mapping of sections"),
    (None, "params.yaml: params file not found"),
])
def test_bad_params_file_exit_2(empty_project, text, message):
    if text is not None:
        (empty_project / "params.yaml").write_text(text)
    assert_user_error(run_cli("pretrain"), message)
    assert sorted(os.listdir(empty_project)) == ([] if text is None else ["params.yaml"])


@pytest.mark.slow
def test_real_command_prints_one_message_without_traceback(empty_project):
    (empty_project / "params.yaml").write_text(yaml.safe_dump(params_with({"certify": {"alpha": 1.5}})))
    dmae = shutil.which("dmae") or str(Path(sys.executable).with_name("dmae"))
    proc = subprocess.run([dmae, "certify", "--sigma", "0.25"], capture_output=True, text=True, cwd=empty_project,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "certify.alpha = 1.5" in flat(proc.stderr)
    assert proc.stdout == ""
    assert sorted(os.listdir(empty_project)) == ["params.yaml"]


# -- checkpoints: damaged, truncated, mismatched -------------------------------------------------------------------
@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory, digits_dir) -> Path:
    """A fine-tuned classifier as `dmae finetune` writes it, for the tiny settings and the digits data."""
    meta = read_meta(digits_dir)
    torch.manual_seed(0)
    model = Classifier(settings("model").config(meta), meta["num_classes"])
    out = tmp_path_factory.mktemp("classifier") / "sigma-0.25"
    save_weights(out, model.state_dict(), model.config())
    return out


def _small_weights(digits_dir) -> dict:
    meta = read_meta(digits_dir)
    return Classifier(settings("model", preset="small").config(meta), meta["num_classes"]).state_dict()


def _edit_config(**changes):
    def edit(ckpt: Path, digits_dir: Path) -> None:
        config = json.loads((ckpt / "config.json").read_text())
        for key, value in changes.items():
            if value is None:
                del config[key]
            else:
                config[key] = value
        (ckpt / "config.json").write_text(json.dumps(config))
    return edit


def _write(name: str, data):
    def edit(ckpt: Path, digits_dir: Path) -> None:
        content = data(ckpt / name) if callable(data) else data
        (ckpt / name).write_bytes(content)
    return edit


def _remove(name: str):
    return lambda ckpt, digits_dir: (ckpt / name).unlink()


def _small_preset_weights(ckpt: Path, digits_dir: Path) -> None:
    save_file({k: v.contiguous() for k, v in _small_weights(digits_dir).items()}, str(ckpt / "model.safetensors"))


CHECKPOINT_DAMAGE = {
    "garbage safetensors": (_write("model.safetensors", os.urandom(4096)), "not a readable safetensors file"),
    "truncated safetensors": (_write("model.safetensors", lambda p: p.read_bytes()[: p.stat().st_size // 2]),
                              "not a readable safetensors file"),
    "empty safetensors": (_write("model.safetensors", b""), "not a readable safetensors file"),
    "weights missing": (_remove("model.safetensors"), "checkpoint weights not found"),
    "weights of another preset": (_small_preset_weights, "weights do not fit the model"),
    "config missing": (_remove("config.json"), "checkpoint config not found"),
    "config not JSON": (_write("config.json", b"{\"kind\": \"classifier\","), "config.json: not valid JSON"),
    "config not a mapping": (_write("config.json", b"[1, 2]"), "config.json: expected a JSON object"),
    "config names another preset": (_edit_config(preset="small"), "classifier was built for"),
    "config names an unknown preset": (_edit_config(preset="giant"), "unknown preset 'giant'"),
    "config of another number of classes": (_edit_config(num_classes=7), "classifier has 7 classes, the data set 10"),
    "config lacks num_classes": (_edit_config(num_classes=None), "classifier config lacks ['num_classes']"),
    "config lacks the architecture": (_edit_config(patch_size=None), "model config lacks ['patch_size']"),
    "autoencoder instead of classifier": (_edit_config(kind="autoencoder"), "not a fine-tuned classifier"),
}


def test_intact_classifier_certifies(tiny_params, digits_dir, classifier_dir):
    """The control for the table below: the undamaged checkpoint goes through."""
    result = run_cli("certify", "--sigma", "0.25", "--data", str(digits_dir), "--model", str(classifier_dir))
    assert result.exit_code == 0, result.output
    assert Path("results/certify/sigma-0.25.tsv").is_file()


@pytest.mark.parametrize("damage", list(CHECKPOINT_DAMAGE))
def test_damaged_classifier_refused_by_certify(tiny_params, digits_dir, classifier_dir, damage):
    edit, message = CHECKPOINT_DAMAGE[damage]
    ckpt = Path("models/finetune/sigma-0.25")
    shutil.copytree(classifier_dir, ckpt)
    edit(ckpt, digits_dir)
    result = run_cli("certify", "--sigma", "0.25", "--data", str(digits_dir))
    assert_user_error(result, message, str(ckpt))
    assert not Path("results").exists()


@pytest.mark.parametrize("damage, message", [
    ("garbage safetensors", "not a readable safetensors file"),
    ("config names another preset", "params ask for"),
    ("a classifier instead of an autoencoder", "not"),
])
def test_damaged_pretrained_model_refused_by_finetune(tiny_params, digits_dir, classifier_dir, damage, message):
    meta = read_meta(digits_dir)
    pre = Path("models/pretrain")
    if damage == "a classifier instead of an autoencoder":
        shutil.copytree(classifier_dir, pre)
    else:
        model_cfg = settings("model").config(meta)
        save_weights(pre, DenoisingMAE(model_cfg).state_dict(), {"kind": "autoencoder", **model_cfg.to_dict()})
        if damage == "garbage safetensors":
            (pre / "model.safetensors").write_bytes(os.urandom(2048))
        else:
            _edit_config(preset="small")(pre, digits_dir)
    result = run_cli("finetune", "--sigma", "0.25", "--data", str(digits_dir))
    assert_user_error(result, message, str(pre))
    assert not Path("models/finetune").exists() and not Path("results").exists()


# -- training state (resume files): damaged, mismatched, unsafe ------------------------------------------------
class RunsCode:
    """Unpickling this runs a shell command (touches `marker`)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _evil_state(path: Path, marker: Path, how: str) -> None:
    content = {"epoch": 1, "history": [], "payload": RunsCode(marker), "model": {}, "optimizer": {}}
    path.parent.mkdir(parents=True, exist_ok=True)
    if how == "torch.save":
        torch.save(content, path)
    else:
        with open(path, "wb") as fh:
            pickle.dump(content, fh, protocol=2)


@pytest.mark.parametrize("how", ["torch.save", "pickle protocol 2"])
def test_state_file_that_would_run_code_is_refused(tmp_path, how):
    marker, path = tmp_path / "pwned", tmp_path / ".dmae-state" / "finetune" / "0123" / "state.pt"
    _evil_state(path, marker, how)
    if how == "torch.save":  # the payload is live: an unsafe load runs it
        torch.load(path, weights_only=False)
    else:
        with open(path, "rb") as fh:
            pickle.load(fh)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(UserError) as err:
        load_state(path)
    assert not marker.exists()
    assert "state.pt: resume state is unreadable (refused: loading it would call or build posix.system" in str(
        err.value)
    assert "weights_only" not in str(err.value)  # never the advice to load it unsafely


def test_state_of_other_code_is_refused(tmp_path):
    """A state file written by other code (a changed model) under the same settings hash: refused, no traceback."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    other = torch.nn.Linear(4, 2)
    cases = {
        "other model": {"model": other.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 1, "history": []},
        "other optimizer": {"model": model.state_dict(), "optimizer": {"state": {}, "param_groups": []},
                            "epoch": 1, "history": []},
        "no epoch": {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "history": []},
        "a list": [1, 2, 3],
    }
    for name, state in cases.items():
        path = tmp_path / name / "state.pt"
        save_state(path, state)
        with pytest.raises(UserError, match="resume state does not fit this run .*delete it"):
            resume_training(path, model, optimizer)


def _finetune_state_path(params_path: Path, data: Path) -> Path:
    """The resume file `dmae finetune --sigma 0.25` (init: scratch) reads, recorded as made from these inputs."""
    state = work_state("finetune", paths.finetuned(0.25), resolved.finetune(load_params(params_path), 0.25), [data])
    write_json(state.path("fingerprint.json"), state.fingerprint)
    return state.path("state.pt")


def _truncated_state(path: Path, marker: Path) -> None:
    model = torch.nn.Linear(3, 2)
    save_state(path, {"model": model.state_dict(), "epoch": 1, "history": []})
    path.write_bytes(path.read_bytes()[:200])


@pytest.mark.parametrize("damage, message", [
    ("garbage", "resume state is unreadable"),
    ("truncated", "resume state is unreadable"),
    ("code-running pickle", "resume state is unreadable (refused: loading it would call or build"),
    ("state of another model", "resume state does not fit this run"),
])
def test_damaged_resume_state_refused_by_the_stage(tiny_params, digits_dir, damage, message):
    raw = yaml.safe_load(tiny_params.read_text())
    raw["finetune"]["init"] = "scratch"
    tiny_params.write_text(yaml.safe_dump(raw))
    path, marker = _finetune_state_path(tiny_params, digits_dir), Path("pwned").resolve()
    if damage == "garbage":
        path.write_bytes(os.urandom(1000))
    elif damage == "truncated":
        _truncated_state(path, marker)
    elif damage == "code-running pickle":
        _evil_state(path, marker, "torch.save")
    else:
        other = torch.nn.Linear(4, 2)
        save_state(path, {"model": other.state_dict(), "optimizer": torch.optim.AdamW(other.parameters()).state_dict(),
                          "epoch": 1, "history": []})
    result = run_cli("finetune", "--sigma", "0.25", "--data", str(digits_dir))
    assert_user_error(result, message, str(path))  # the stage read exactly this file
    assert not marker.exists()
    assert not Path("models").exists() and not Path("results").exists()
    assert path.is_file()  # kept for the user to inspect; the message says to delete it


# -- a broken prepared data folder, as a stage sees it ---------------------------------------------------------
def _meta_edit(fn):
    def edit(folder: Path) -> None:
        meta = json.loads((folder / "meta.json").read_text())
        (folder / "meta.json").write_text(json.dumps(fn(meta)))
    return edit


DATA_DAMAGE = {
    "folder missing": (lambda d: shutil.rmtree(d), "meta.json not found"),
    "meta.json missing": (lambda d: (d / "meta.json").unlink(), "meta.json not found"),
    "meta.json not JSON": (lambda d: (d / "meta.json").write_text("{"), "meta.json is not valid JSON"),
    "meta.json not a mapping": (lambda d: (d / "meta.json").write_text("[]"), "meta.json holds a list"),
    "meta.json lacks channels": (_meta_edit(lambda m: {k: v for k, v in m.items() if k != "channels"}),
                                 "meta.json lacks ['channels']"),
    "train split missing": (lambda d: (d / "train.safetensors").unlink(), "train.safetensors not found"),
    "train split garbage": (lambda d: (d / "train.safetensors").write_bytes(os.urandom(999)), "cannot read"),
    "labels out of range": (_meta_edit(lambda m: {**m, "num_classes": 3}), "label out of range"),
}


@pytest.mark.parametrize("damage", list(DATA_DAMAGE))
def test_broken_prepared_data_refused_by_pretrain(tiny_params, digits_dir, damage):
    edit, message = DATA_DAMAGE[damage]
    data = Path("data/prepared")
    shutil.copytree(digits_dir, data)
    edit(data)
    result = run_cli("pretrain")
    assert_user_error(result, message, str(data))
    assert not Path("models").exists() and not Path("results").exists()


# -- malformed certification files, as the report sees them ------------------------------------------------------
MALFORMED_TSV = next(m.args[1] for m in _malformed_tsv_test.pytestmark if m.name == "parametrize")


@pytest.mark.parametrize("text, where", MALFORMED_TSV)
def test_malformed_certification_file_refused_by_report(tiny_params, text, where):
    rows = [CertifyRow(i, 1, 1, 0.25, 1, 500, 480) for i in range(3)]
    write_certify_tsv("results/certify/sigma-0.5.tsv", rows)
    Path("results/certify/sigma-0.25.tsv").write_text(text)
    result = run_cli("report")
    assert_user_error(result, "results/certify/sigma-0.25.tsv" + where)
    assert not Path("results/report").exists()


def test_outputs_are_readable_by_others(tiny_params, digits_dir, classifier_dir):
    """Outputs are written through a temporary file: they must not keep its private (0600) mode."""
    ckpt = Path("copy")
    save_weights(ckpt, {"w": torch.zeros(2)}, {"kind": "test"})
    for name in ("model.safetensors", "config.json"):
        assert (ckpt / name).stat().st_mode & 0o777 == 0o644, name


def test_resume_state_is_keyed_by_every_setting(tiny_params):
    """A changed param never resumes stale work: each setting of the stage changes the fingerprint its work in
    progress is kept under (a run with another fingerprint discards it: tests/test_reliability_identity.py)."""
    def key(**changes) -> str:
        raw = yaml.safe_load(tiny_params.read_text())
        sigma = changes.pop("sigma", 0.25)
        for dotted, value in changes.items():
            section, name = dotted.split("__")
            raw.setdefault(section, {})[name] = value
        path = Path("variant.yaml")
        path.write_text(yaml.safe_dump(raw))
        state = work_state("finetune", paths.finetuned(sigma), resolved.finetune(load_params(path), sigma), [])
        return json.dumps(state.fingerprint, sort_keys=True)

    base = key()
    assert key() == base  # stable (a blake2b hash, not Python's salted hash)
    variants = [key(sigma=0.5), key(finetune__seed=1), key(finetune__base_lr=1e-3), key(data__seed=1),
                key(model__patch_size=8), key(finetune__precision="bf16")]
    assert len({base, *variants}) == 1 + len(variants)


def test_paths_with_markup_are_printed_as_given(tiny_params):
    result = run_cli("pretrain", "--data", "data/[bold]x[/]")
    assert_user_error(result, "data/[bold]x[/]/meta.json not found")


def test_long_messages_are_not_wrapped(tiny_params):
    """A log file or pipe gets each message on one line, not folded at 80 columns."""
    result = run_cli("pretrain", "--data", "a/rather/long/path/to/a/prepared/data/set/that/does/not/exist")
    message = ("a/rather/long/path/to/a/prepared/data/set/that/does/not/exist/meta.json not found; run the data "
               "preparation stage first")
    assert result.exit_code == 2 and any(message in line for line in result.output.splitlines()), result.output


@pytest.mark.parametrize("command", [["finetune", "--help"], ["certify", "--help"]])
def test_help_shows_defaults(command):
    text = squeezed(run_cli(*command).output)  # the help formatter may wrap inside a long path
    assert "[default:data/prepared]" in text and "[default:models/finetune/sigma-SIGMA]" in text


@pytest.mark.parametrize("option, value, message", [
    ("--patch-size", "0", "--patch-size 0: must be between 1 and 4096"),
    ("--img-size", "-16", "--img-size -16: must be between 1 and 4096"),
    ("--std", "nan", "every value must be a finite number"),
    ("--mean", "inf", "every value must be a finite number"),
])
def test_import_checkpoint_option_values_refused(tmp_path, option, value, message):
    src = tmp_path / "x.pth"
    torch.save({"w": torch.zeros(1)}, src)
    args = {"--preset": "tiny", "--img-size": "16", "--patch-size": "4", "--in-chans": "1", "--mean": "0.5",
            "--std": "0.25", option: value}
    result = run_cli("import-checkpoint", str(src), "--out", str(tmp_path / "o"),
                     *[x for kv in args.items() for x in kv])
    assert_user_error(result, message)
    assert not (tmp_path / "o").exists()
