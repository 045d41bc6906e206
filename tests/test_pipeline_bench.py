"""`dmae bench-pipeline` counts the work of an adaptive certification stage by the samples it drew."""

from pathlib import Path

import pytest
import yaml

from dmae.settings import parse_params
from tools.pipeline_bench import drawn_flops
from tools.projection import stage_flops


def write_table(path: Path, samples: list[int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [f"{i}\t0\t0\t0.1\t1\t{s}\t{s}" for i, s in enumerate(samples)]
    path.write_text("\n".join(["idx\tlabel\tpredict\tradius\tcorrect\tsamples\tvotes", *rows]) + "\n")


def test_adaptive_certification_counts_the_samples_drawn(tmp_path):
    raw = yaml.safe_load(Path("params.yaml").read_text())
    raw["certify"].update(method="mixture", n0=100, n_max=500)
    params = parse_params(raw)
    flops = stage_flops(params)
    lock = {}
    for stage in flops:
        if stage.startswith(("certify@", "certify_chain@")):
            table = f"results/{stage}.tsv"
            lock[stage] = {"outs": [{"path": f"results/{stage}.settings.json"}, {"path": table}]}
            # certify: (600 + 200) / 2 of 600 drawn; chains: 300 of 600
            write_table(tmp_path / table, [500, 100] if stage.startswith("certify@") else [200, 200])
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": lock}))
    counted = drawn_flops(flops, params, tmp_path)
    sigma, chain = params.sigmas[0], next(iter(params.denoised_smoothing.chains))
    assert counted[f"certify@{sigma}"] == pytest.approx(flops[f"certify@{sigma}"] * 400 / 600)
    assert counted[f"certify_chain@{sigma}-{chain}"] == pytest.approx(flops[f"certify_chain@{sigma}-{chain}"] / 2)
    assert counted["pretrain"] == flops["pretrain"]

    raw["certify"]["method"] = "cohen"  # CERTIFY draws N0 + N for every image: the count stands
    cohen = parse_params(raw)
    assert drawn_flops(stage_flops(cohen), cohen, tmp_path) == stage_flops(cohen)
