"""`dmae bench` end to end, the FLOP formula, and the fast certification paths against a plain one (fp32)."""

import json
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

from dmae.models.architectures import ModelConfig
from dmae.models.autoencoder import DenoisingMAE
from dmae.models.classifier import Classifier
from dmae.smoothing import ESTIMATION, NOISE_BLOCK, Smooth, block_seed
from dmae.util.accel import Compiled, largest_batch
from stages.cli import app
from tools.bench import COLUMNS, fused_attention, reference_certify
from tools.flops import autoencoder_flops, classifier_flops

TINY = ModelConfig("tiny", 16, 4, 1, (0.5,), (0.25,))


def test_quick_bench_runs_end_to_end(tmp_path):
    out = tmp_path / "bench.md"
    result = CliRunner().invoke(app, ["bench", "--quick", "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["preset"] == "tiny" and report["quick"] and report["fused_attention"]
    assert {"cpu", "cpu_cores", "torch", "timm"} <= report["machine"].keys()
    rows = report["rows"]
    assert [r["section"] for r in rows[:3]] == ["peak", "peak", "certify"]
    assert {r["section"] for r in rows} == {"peak", "certify", "pretrain", "finetune"}
    assert {("certify", "bf16"), ("pretrain", "bf16"), ("finetune", "fp32")} <= {
        (r["section"], r["precision"]) for r in rows}
    for row in rows:
        assert row["best_s"] > 0 and row["flops_per_s"] > 0 and row["peak_fraction"] > 0
        assert (row["samples_per_s"] is not None) == (row["section"] == "certify")
    assert all(r["speedup"] is not None for r in rows if r["section"] == "certify")
    assert all(r["same_certificates"] for r in rows if r["same_certificates"] is not None)
    table = out.read_text().splitlines()
    assert "| " + " | ".join(COLUMNS) + " |" in table
    assert sum(line.startswith("| certify |") for line in table) == sum(r["section"] == "certify" for r in rows)


def test_bench_rejects_unknown_preset(tmp_path):
    result = CliRunner().invoke(app, ["bench", "--preset", "huge", "--out", str(tmp_path / "b.md")])
    assert result.exit_code == 2 and "huge" in result.output


def test_flop_formula_matches_hand_count():
    # tiny: P = 16 patches of 4x4x1, T = 17 tokens, D = 128, MLP 512, 6 blocks, 10 classes
    patch_embed = 2 * 16 * 16 * 128
    block = 2 * 17 * (4 * 128**2 + 2 * 128 * 512) + 2 * 2 * 17**2 * 128
    assert classifier_flops(TINY, 10) == patch_embed + 6 * block + 2 * 128 * 10 == 41_063_936
    # pretraining, mask 0.75: the encoder sees 4 patches + cls; decoder D = 64, 2 blocks, on all 17 tokens
    encoder_block = 2 * 5 * (4 * 128**2 + 2 * 128 * 512) + 2 * 2 * 5**2 * 128
    decoder_block = 2 * 17 * (4 * 64**2 + 2 * 64 * 256) + 2 * 2 * 17**2 * 64
    expected = patch_embed + 6 * encoder_block + 2 * 5 * 128 * 64 + 2 * decoder_block + 2 * 17 * 64 * 16
    assert autoencoder_flops(TINY, 0.75) == expected == 15_545_856


def test_flop_formula_matches_torch_flop_counter():
    # Unfused attention, so that torch's counter sees its two matrix products too.
    model, x = Classifier(TINY, 10).eval(), torch.rand(3, 1, 16, 16)
    with FlopCounterMode(display=False) as counter, torch.no_grad(), fused_attention(model, False):
        model(x)
    assert counter.get_total_flops() == 3 * classifier_flops(TINY, 10)
    autoencoder = DenoisingMAE(TINY)
    with FlopCounterMode(display=False) as counter, fused_attention(autoencoder, False):
        loss, _, _ = autoencoder(x, x, 0.75)
        forward = counter.get_total_flops()
        loss.backward()
    assert forward == 3 * autoencoder_flops(TINY, 0.75)
    assert counter.get_total_flops() / forward == pytest.approx(3, rel=0.01)  # flops.TRAIN_FACTOR


def plain_counts(model, x, num, batch_size, sigma, num_classes, *, seed=0, index=0, phase=ESTIMATION):
    """Smooth's seeded noise consumed the obvious way: every block drawn up front, the input repeated per batch,
    fp32 under no_grad, predictions counted on the host."""
    blocks = []
    for k in range(math.ceil(num / NOISE_BLOCK)):
        gen = torch.Generator().manual_seed(block_seed(seed, sigma, index, phase, k))
        blocks.append(torch.randn((min(NOISE_BLOCK, num - k * NOISE_BLOCK), *x.shape), generator=gen))
    noise = torch.cat(blocks)
    counts = np.zeros(num_classes, dtype=int)
    with torch.no_grad():
        for start in range(0, num, batch_size):
            eps = noise[start:start + batch_size]
            for c in model(x.repeat(len(eps), 1, 1, 1) + eps * sigma).argmax(1).tolist():
                counts[c] += 1
    return counts


def decisive_classifier() -> Classifier:
    """The tiny ViT with a head scaled up, so that noisy inputs spread over several classes."""
    torch.manual_seed(0)
    model = Classifier(TINY, 10).eval()
    nn.init.normal_(model.vit.head.weight, std=1.0)
    return model


def test_engine_counts_equal_plain_path_fp32():
    model, sigma = decisive_classifier(), 0.5
    x = torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(0))
    for num, batch in ((700, 256), (300, 1000)):
        counts = Smooth(model, 10, sigma).sample_counts(x, num, batch, index=0, phase=ESTIMATION)
        expected = plain_counts(model, x, num, batch, sigma, 10)
        np.testing.assert_array_equal(counts, expected)
        assert np.count_nonzero(expected) > 1


def test_compiled_engine_counts_equal_plain_path_fp32():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.GELU(), nn.LayerNorm(32), nn.Linear(32, 4))
    x, sigma = torch.rand(1, 8, 8), 0.5
    smooth = Smooth(model, 4, sigma, compile=True)
    assert isinstance(smooth.base_classifier, Compiled) and smooth.device == torch.device("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the eager fallback would warn
        counts = smooth.sample_counts(x, 600, 256, index=0, phase=ESTIMATION)
    np.testing.assert_array_equal(counts, plain_counts(model, x, 600, 256, sigma, 4))


def test_compile_failure_falls_back_to_eager():
    def broken_backend(graph, example_inputs):
        raise RuntimeError("no compiler here")

    model = nn.Linear(4, 3)
    wrapped = Compiled(model, backend=broken_backend)
    x = torch.rand(5, 4)
    with pytest.warns(RuntimeWarning, match="running eagerly"):
        out = wrapped(x)
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)
    assert list(wrapped.state_dict()) == ["module.weight", "module.bias"]


def test_reference_loop_certifies_like_the_engine_on_a_clear_case():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[0.0] * 4, [1.0] * 4]))
        model[1].bias.zero_()
    x = torch.full((1, 2, 2), 1.0)
    for flags in ({}, {"inference_mode": True, "count_on_device": True}):
        predict, radius = reference_certify(model, x, n0=10, n=200, alpha=0.001, batch_size=64, sigma=0.25,
                                            num_classes=2, **flags)
        assert predict == 1 and radius > 0.25


def test_largest_batch_off_cuda_is_the_limit():
    assert largest_batch(nn.Linear(4, 2), torch.rand(4), limit=512) == 512


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_largest_batch_on_cuda_is_a_power_of_two_that_runs():
    model = Classifier(TINY, 10).cuda().eval()
    batch = largest_batch(model, torch.rand(1, 16, 16, device="cuda"), "bf16", limit=4096)
    assert batch & (batch - 1) == 0 and 1 <= batch <= 4096


@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu(tmp_path):
    """`make gpu-check`'s script runs every path it measures (bench cases, adaptive in flight vs one at a time,
    torchrun certify) at toy sizes on the CPU, and reports agreeing certificates and a working launch."""
    from tools import gpu_check
    out = tmp_path / "check"
    assert gpu_check.main(["--device", "cpu", "--quick", "--out", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["torchrun_certify"]["ok"] and result["torchrun_certify"]["rows"] == 4
    assert [r["same_certificates"] for r in result["adaptive"]] == [True, True]
    assert "torchrun, 1 process" in out.with_suffix(".md").read_text()


def test_bench_methods_replays_equal_live_runs():
    """tools.certify_bench on a tiny untrained classifier: every method replayed on the recorded predictions gives
    what the engine gives live (CERTIFY image by image, the adaptive methods at another batch size and all in
    flight, the naive method through run_jobs); the simulation draws the larger N it is asked for."""
    from dmae.smoothing.engine import run_jobs, union_job
    from tools.certify_bench import live_check, markdown, record, run_methods, simulated_records, summary
    torch.manual_seed(0)
    model = Classifier(ModelConfig("tiny", 16, 4, 1, (0.5,), (0.25,)), 10).eval()
    torch.nn.init.normal_(model.vit.head.weight, std=2.0)  # confident: the adaptive methods can stop early
    smooth = Smooth(model, 10, 0.25, seed=0)
    xs = list(torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(1)))
    labels, radii, args = [0, 1, 2, 3], [0.0, 0.25, 0.5], {"n0": 10, "alpha": 0.001}
    records = record(smooth, xs, labels, n0=10, n=600, batch_size=128)
    replayed = run_methods(records, 0.25, n=600, radii=radii, **args)
    assert [r[:2] for r in replayed["cohen"]] == [smooth.certify(x, n=600, batch_size=128, index=i, **args)
                                                  for i, x in enumerate(xs)]
    assert [r[3] for r in replayed["cohen"]] == [int(np.sum(rec.estimation == np.argmax(rec.selection)))
                                                 for rec in records]
    for method in ("mixture", "union"):
        assert replayed[method] == [smooth.certify_adaptive(x, n_max=600, batch_size=97, radii=radii, method=method,
                                                            index=i, **args) for i, x in enumerate(xs)]
    naive = dict(run_jobs(smooth.classify(64), 10, 0.25, 0, ((i, x, union_job(10, 600, 0.001, 0.25, radii, True))
                                                              for i, x in enumerate(xs)), 64, smooth.device))
    assert replayed["naive (not valid)"] == [naive[i] for i in range(len(xs))]
    live = live_check(smooth, xs[:2], method="mixture", n=600, radii=radii, batch_size=50, **args)
    assert live["in_flight"] == live["one_by_one"] == replayed["mixture"][:2]
    rows = [summary(method, 0.25, 600, results, labels, radii, 0.001) for method, results in replayed.items()]
    assert rows[0].mean_samples == 600 and max(rows[1].mean_samples, rows[2].mean_samples) < 600
    simulated = simulated_records(records, 5000)
    assert [len(rec.estimation) for rec in simulated] == [5000] * 4
    assert max(r[2] for r in run_methods(simulated, 0.25, n=5000, radii=radii, **args)["mixture"]) <= 5000
    assert "| 0.25 | mixture | 600 |" in markdown(rows, radii)


def test_oracle_records_have_the_known_pa():
    """The linear oracle's estimation samples vote the true class at rate Phi(m / sigma), within 5 standard errors."""
    from scipy.stats import norm
    from tools.certify_bench import oracle_records
    records, margins = oracle_records(0.5, 6, [0.0, 0.5, 1.0], n0=10, n=4000, batch_size=1000)
    assert np.all((0 < margins) & (margins < 1.25))
    for rec, m in zip(records, margins):
        p = norm.cdf(m / 0.5)
        assert rec.label == 1 and abs(np.mean(rec.estimation == 1) - p) <= 5 * math.sqrt(p * (1 - p) / 4000) + 1e-3


def test_bench_input_times_every_view_of_the_preset_recipes(tmp_path):
    """`dmae bench-input` on a few fabricated JPEGs: every case runs the pipeline's own transforms and gives a
    [3, 224, 224] tensor in [0, 1] (erasing aside), and the table names the cores per GPU of every stage."""
    from tools import input_bench

    paths = input_bench.fabricate_jpegs(tmp_path / "jpegs", 2)
    for name, fn in input_bench.cases().items():
        out = fn(paths[0])
        if name.startswith(("pretraining", "fine-tuning", "test")):
            assert out.shape == (3, 224, 224) and 0 <= float(out.min()) and float(out.max()) <= 1, name
    results = input_bench.measure(paths, rounds=1)
    assert len(results) == 6 and all(c.images_per_s > 0 for c in results)
    table = input_bench.markdown(results, paths)
    assert "| imagenet-nim-vit-b | denoiser@nim |" in table and "| imagenet-dmae-vit-b | finetune |" in table
