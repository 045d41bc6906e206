"""torchrun with 2 CPU processes (gloo) computes what 1 process computes: pretrain, finetune and certify."""

import os
import shutil
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
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--no-python",
                "--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0", "--max-restarts=0"]
    dmae = shutil.which("dmae")
    cmd = (launcher if nproc > 1 else []) + [dmae, *args]
    result = subprocess.run(cmd, env={**os.environ, **(env or {}), "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=600)
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
