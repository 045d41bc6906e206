"""Reliability, identity of work in progress: a rerun after an upstream change never resumes work of the old
inputs; one writer per output; mismatched shards are not merged; a certification rerun is byte-identical.

Each case interrupts a stage (KeyboardInterrupt from inside its loop, as Ctrl-C does), changes one input, and
reruns: the result must equal a run that was never interrupted, made from the new input.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from dmae.defense import robustness
from dmae.settings import load_params
import dmae.smoothing.smooth
import dmae.train.loop
from dmae.util.io import write_json
from stages import paths, resolved
from stages.cli import app
from stages.common import work_state
from tests.conftest import TINY, params_with

SIGMA = 0.25


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def flat(result) -> str:
    return " ".join(result.output.split())


def update(params_path: Path, section: str, **values) -> None:
    raw = yaml.safe_load(params_path.read_text())
    raw[section] = {**raw[section], **values}
    params_path.write_text(yaml.safe_dump(raw))


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A tiny project with prepared data, a pretrained model and a classifier at SIGMA, made once."""
    root = tmp_path_factory.mktemp("template")
    with pytest.MonkeyPatch.context() as m:
        m.chdir(root)
        m.setenv("DMAE_STATE_DIR", str(root / "state"))
        m.setenv("DMAE_PROGRESS", "0")
        raw = params_with({**TINY, "data": {"image_size": 8, "test_every": 30, "val_fraction": 0.8},
                           "model": {"preset": "tiny", "img_size": 8, "patch_size": 4}, "cpu_threads": 1})
        raw["pretrain"].update(batch_size=64)
        raw["finetune"].update(epochs=2, batch_size=64)
        Path("params.yaml").write_text(yaml.safe_dump(raw))
        for stage in (["prepare"], ["pretrain"], ["finetune", "--sigma", SIGMA]):
            assert run(*stage).exit_code == 0, stage
    return root


@pytest.fixture
def project(template, tmp_path, monkeypatch) -> Path:
    """A copy of the template as the working directory; returns its params.yaml."""
    root = tmp_path / "project"
    shutil.copytree(template, root)
    monkeypatch.chdir(root)
    monkeypatch.setenv("DMAE_STATE_DIR", str(root / "state"))
    monkeypatch.setenv("DMAE_PROGRESS", "0")
    return root / "params.yaml"


def interrupt_training_after(monkeypatch, epochs: int):
    saved = dmae.train.loop.save_state
    calls = []

    def save_then_stop(path, state):
        saved(path, state)
        calls.append(1)
        if len(calls) == epochs:
            raise KeyboardInterrupt
    monkeypatch.setattr(dmae.train.loop, "save_state", save_then_stop)


def interrupt_certification_after(monkeypatch, rows: int):
    certify_all = dmae.smoothing.smooth.Smooth.certify_all

    def stop_after(self, *args, **kwargs):
        for i, result in enumerate(certify_all(self, *args, **kwargs)):
            if i == rows:
                raise KeyboardInterrupt
            yield result
    monkeypatch.setattr(dmae.smoothing.smooth.Smooth, "certify_all", stop_after)


def test_finetune_after_a_new_pretrained_model_starts_over(project, monkeypatch):
    with monkeypatch.context() as m:
        interrupt_training_after(m, 1)
        assert run("finetune", "--sigma", SIGMA).exit_code == 130
    update(project, "pretrain", mask_ratio=0.5)  # another encoder
    assert run("pretrain").exit_code == 0
    rerun = run("finetune", "--sigma", SIGMA)
    assert rerun.exit_code == 0
    assert "discarding the work in progress" in flat(rerun) and "models/pretrain" in flat(rerun)
    assert "resuming" not in rerun.output
    resumed = Path("models/finetune/sigma-0.25/model.safetensors").read_bytes()
    assert run("finetune", "--sigma", SIGMA, "--out", "fresh", "--results", "fresh-results").exit_code == 0
    assert Path("fresh/model.safetensors").read_bytes() == resumed  # as if never interrupted


def test_finetune_resumes_when_nothing_changed(project, monkeypatch):
    with monkeypatch.context() as m:
        interrupt_training_after(m, 1)
        assert run("finetune", "--sigma", SIGMA).exit_code == 130
    rerun = run("finetune", "--sigma", SIGMA)
    assert rerun.exit_code == 0 and "resuming finetune" in flat(rerun) and "discarding" not in rerun.output


def test_certify_after_a_new_classifier_starts_over(project, monkeypatch):
    with monkeypatch.context() as m:
        interrupt_certification_after(m, 3)
        assert run("certify", "--sigma", SIGMA).exit_code == 130
    update(project, "finetune", seed=1)  # another classifier
    assert run("finetune", "--sigma", SIGMA).exit_code == 0
    rerun = run("certify", "--sigma", SIGMA)
    assert rerun.exit_code == 0 and "models/finetune/sigma-0.25" in flat(rerun) and "discarding" in rerun.output
    certified = Path("results/certify/sigma-0.25.tsv").read_bytes()
    assert run("certify", "--sigma", SIGMA, "--out", "fresh.tsv").exit_code == 0
    assert Path("fresh.tsv").read_bytes() == certified
    # and a rerun of the same certification writes the same bytes (no times in the TSV)
    assert run("certify", "--sigma", SIGMA).exit_code == 0
    assert Path("results/certify/sigma-0.25.tsv").read_bytes() == certified
    assert Path("results/timings/certify-sigma-0.25.tsv").read_text().startswith("idx\tsamples\tseconds\n")


def test_attack_after_a_swapped_classifier_starts_over(project, monkeypatch):
    raw = yaml.safe_load(project.read_text())
    chain = {"input": "denoised", "encoder": "dmae", "denoiser": "dmae"}
    raw["defense"].update(denoisers={}, classifiers={"dmae": chain},
                          finetune={"consistency": {"enabled": False}, "epochs": 1, "warmup_epochs": 0})
    raw["denoised_smoothing"].update(finetune={"denoiser": "dmae", "encoder": "dmae"},
                                     chains={"de3": {"denoiser": "dmae", "classifier": "dmae"}})
    raw["attack"].update(examples=4, batch_size=4, test_sigmas=[0.0, 0.25], eot=1, figure="dmae",
                         autoattack={**raw["attack"]["autoattack"], "versions": [], "examples": 1, "classifiers": [],
                                     "test_sigmas": []},
                         pgd={"steps": 1, "step_size": 0.05, "random_start": True},
                         square={"queries": 3, "p_init": 0.8})
    project.write_text(yaml.safe_dump(raw))
    assert run("finetune-defense", "--classifier", "dmae").exit_code == 0
    calls = []
    evaluate = robustness.evaluate_defense

    def after_one_row(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return evaluate(*args, **kwargs)
    with monkeypatch.context() as m:
        m.setattr(robustness, "evaluate_defense", after_one_row)
        assert run("attack").exit_code == 130
    update(project, "finetune", seed=1)  # the De^3 classifier is fine-tuned anew: another model
    assert run("finetune-defense", "--classifier", "dmae").exit_code == 0
    rerun = run("attack")
    assert rerun.exit_code == 0 and "discarding" in rerun.output and "models/defense/dmae" in flat(rerun), rerun.output
    attacked = Path("results/attack/metrics.json").read_bytes()
    assert run("attack", "--out", "fresh").exit_code == 0
    assert Path("fresh/metrics.json").read_bytes() == attacked


def test_merge_refuses_shards_of_other_settings(project):
    assert run("certify", "--sigma", SIGMA, "--shard", "0/2").exit_code == 0
    update(project, "certify", n_max=40)  # the default method (mixture) stops at n_max
    assert run("certify", "--sigma", SIGMA, "--shard", "1/2").exit_code == 0
    merged = run("certify-merge", "--sigma", SIGMA, "--shards", 2)
    assert merged.exit_code == 2 and "shard-0-of-2.tsv was certified from other inputs" in flat(merged)
    assert "settings.certify.n_max" in flat(merged) and not Path("results/certify/sigma-0.25.tsv").exists()
    assert run("certify", "--sigma", SIGMA, "--shard", "0/2").exit_code == 0  # the same settings again
    assert run("certify-merge", "--sigma", SIGMA, "--shards", 2).exit_code == 0
    assert run("certify", "--sigma", SIGMA, "--out", "whole.tsv").exit_code == 0
    assert Path("whole.tsv").read_bytes() == Path("results/certify/sigma-0.25.tsv").read_bytes()


def test_a_second_writer_is_refused_naming_the_holder(project):
    params = load_params(project)
    out = paths.certification(SIGMA)
    with work_state("certify", out, resolved.certify(params, SIGMA), []):  # this process holds the lock
        second = run("certify", "--sigma", SIGMA)
    assert second.exit_code == 2 and "Traceback" not in second.output
    assert f"{out} is being written by another process (pid " in flat(second)
    assert run("certify", "--sigma", SIGMA).exit_code == 0  # released: the next run goes ahead


def test_a_lock_left_by_a_killed_process_does_not_block(project, tmp_path):
    params = load_params(project)
    state = work_state("pretrain", paths.PRETRAINED, resolved.pretrain(params), [])
    state.lock_path.parent.mkdir(parents=True, exist_ok=True)
    state.lock_path.write_text("pid 999999: dmae pretrain\n")  # what a killed holder leaves: the file, no lock
    assert run("pretrain").exit_code == 0


def test_unknown_work_in_progress_is_discarded(project):
    params = load_params(project)
    state = work_state("pretrain", paths.PRETRAINED, resolved.pretrain(params), [paths.PREPARED])
    write_json(state.path("fingerprint.json"), {"settings": {"pretrain": {"epochs": 1}}})
    rerun = run("pretrain")
    assert rerun.exit_code == 0 and "discarding" in rerun.output and "settings.pretrain" in flat(rerun)


def test_certify_refuses_data_prepared_with_other_settings(project):
    update(project, "data", test_every=5)
    result = run("certify", "--sigma", SIGMA)
    assert result.exit_code == 2
    assert "data/prepared was prepared with other data settings: data.test_every 30 (params: 5)" in flat(result)


def test_progress_lines_in_logs(project, monkeypatch):
    """Not a terminal (CliRunner's output): progress comes as lines at a steady pace."""
    monkeypatch.setenv("DMAE_PROGRESS", "1")
    result = run("certify", "--sigma", SIGMA)
    lines = [line for line in result.output.splitlines() if "certify sigma-0.25.tsv:" in line]
    assert len(lines) >= 10 and "12/12 (100 %)" in lines[-1] and "img/s" in lines[-1]
    recorded = json.loads(Path("results/certify/sigma-0.25.settings.json").read_text())["certify"]
    assert recorded["n_max"] == yaml.safe_load(project.read_text())["certify"]["n_max"]
