"""torchrun with 2 CPU processes (gloo) computes what 1 process computes: pretrain, finetune and certify."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dmae.data import load_split, read_meta
from dmae.models.autoencoder import DenoisingMAE
from dmae.models.checkpoint import load_weights
from dmae.models.classifier import load_classifier
from dmae.smoothing.certify import read_certify_tsv
from tests.conftest import TINY, params_with, settings


def run(args, nproc=1, env=None):
    """`dmae ARGS` in `nproc` processes (DMAE_NPROC: the command relaunches itself under torchrun)."""
    result = subprocess.run([sys.executable, "-m", "stages.cli", *args], capture_output=True, text=True, timeout=900,
                            env={**os.environ, **(env or {}), "OMP_NUM_THREADS": "1", "DMAE_NPROC": str(nproc)})
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = params_with({**TINY, "cpu_threads": 1, "pretrain": {**TINY["pretrain"], "accum_steps": 2},
                          "finetune": {**TINY["finetune"], "drop_path": 0.0, "epochs": 2}})
    Path("params.yaml").write_text(yaml.safe_dump(params))
    env = {"DMAE_STATE_DIR": str(tmp_path / "state"), "DMAE_PROGRESS": "0"}
    run(["prepare"], env=env)
    for nproc in (1, 2):
        out = f"n{nproc}"
        run(["pretrain", "--out", f"{out}/pre", "--results", f"{out}/pre-res"], nproc, env)
        run(["finetune", "--sigma", "0.25", "--pretrained", f"{out}/pre", "--out", f"{out}/ft",
             "--results", f"{out}/ft-res"], nproc, env)
        run(["certify", "--sigma", "0.25", "--model", f"{out}/ft", "--out", f"{out}/cert.tsv"], nproc, env)

    # All-reduce sums gradients in another order than one process does: equal up to rounding. Compare what the
    # models compute, not raw weights: a parameter with zero true gradient (the attention key bias) gets
    # Adam updates of pure rounding noise, which differ but change no output.
    for name in ("pre-res", "ft-res"):
        a, b = (np.loadtxt(f"{n}/{name}/metrics.tsv", skiprows=1) for n in ("n1", "n2"))
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    x = torch.stack([load_split("data/prepared", "test")[i][0] for i in range(12)])
    pre = [DenoisingMAE(settings("model").config(read_meta("data/prepared"))) for _ in range(2)]
    fts = [load_classifier(f"{n}/ft").eval() for n in ("n1", "n2")]
    with torch.no_grad():
        for model, n in zip(pre, ("n1", "n2")):
            model.load_state_dict(load_weights(f"{n}/pre"), strict=False)
        torch.testing.assert_close(pre[0].reconstruct(x), pre[1].reconstruct(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(fts[0](x), fts[1](x), rtol=1e-4, atol=1e-4)
    # certification with the same classifier: identical rows for 1 and 2 processes (time aside)
    run(["certify", "--sigma", "0.25", "--model", "n1/ft", "--out", "n1b/cert.tsv"], 2, env)
    rows_one = [(r.idx, r.predict, r.radius) for r in read_certify_tsv("n1/cert.tsv")]
    rows_two = [(r.idx, r.predict, r.radius) for r in read_certify_tsv("n1b/cert.tsv")]
    assert rows_one == rows_two
    assert not list(Path("n1b").glob("*.shard-*"))


@pytest.mark.slow
def test_example_parallel_stages_write_the_same_bytes_with_one_and_two_processes(tmp_path, monkeypatch):
    """certify, certify-chain and attack: one thread per process, examples (or attack rows) shared out among
    the processes; every output DVC tracks is byte-identical for 1 and 2 processes."""
    monkeypatch.chdir(tmp_path)
    chain = {"input": "denoised", "encoder": "dmae", "denoiser": "dmae"}
    params = params_with({**TINY, "defense": {"finetune": {"epochs": 1, "warmup_epochs": 0}},
        "denoised_smoothing": {"test_every": 2, "finetune": {"denoiser": "dmae", "encoder": "dmae"}},
        "attack": {"examples": 6, "batch_size": 3, "test_sigmas": [0.0, 0.25], "eot": 2, "draws": 2,
                   "pgd": {"steps": 2}, "square": {"queries": 4}, "figure": "dmae",
                   "autoattack": {"versions": ["standard"], "examples": 2, "classifiers": ["plain"],
                                  "test_sigmas": [0.0], "budget": {"iterations": 2, "target_classes": 2,
                                                                   "square_queries": 4, "eot_iter": 2}}}})
    params["defense"] |= {"denoisers": {}, "classifiers": {"dmae": chain, "plain": {  # replaced whole, not merged
        "input": "clean", "encoder": "dmae", "denoiser": None}}}
    params["denoised_smoothing"]["chains"] = {"de3": {"denoiser": "dmae", "classifier": "dmae"}}
    Path("params.yaml").write_text(yaml.safe_dump(params))
    env = {"DMAE_STATE_DIR": str(tmp_path / "state"), "DMAE_PROGRESS": "0"}
    for stage in (["prepare"], ["pretrain"], ["finetune", "--sigma", "0.25"], ["finetune-defense", "--classifier",
                  "dmae"], ["finetune-defense", "--classifier", "plain"]):
        run(stage, 1, env)
    outputs = {}
    for nproc in (1, 2):
        out = Path(f"n{nproc}")
        run(["certify", "--sigma", "0.25", "--out", f"{out}/cert.tsv"], nproc, env)
        run(["certify-chain", "--sigma", "0.25", "--chain", "de3", "--out", f"{out}/chain.tsv"], nproc, env)
        run(["attack", "--out", f"{out}/attack"], nproc, env)
        outputs[nproc] = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
                          if p.is_file()}
    assert set(outputs[1]) == set(outputs[2]) and "attack/metrics.json" in outputs[1]
    assert [name for name in outputs[1] if outputs[1][name] != outputs[2][name]] == []
