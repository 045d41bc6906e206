"""The report: certified accuracy, ACR and the best-sigma envelope against hand-computed values; input checks;
a self-contained, deterministic HTML report."""

import json
import re

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
import yaml
from scipy.stats import norm
from typer.testing import CliRunner

from dmae.defense.robustness import Row, columns
from dmae.report.attack import attack_metrics, section
from dmae.report.certified import Summary, certification_metrics, load_runs
from dmae.report.document import Figure, Heading, Paragraph, Table, from_json, to_json, to_markdown
from dmae.report.render import radius_cap_text
from dmae.smoothing.bounds import fewest_samples
from dmae.smoothing.certify import HEADER
from dmae.settings import parse_params
from dmae.util.errors import UserError
from stages.cli import app
from tests.conftest import NO_AUTOATTACK, REPO, params_with, settings

# idx, label, predict, radius, correct. Radii 0.25, 0.5, 0.75 and 1.0 sit exactly on grid points; predict -1
# is an abstention; sigma 0.5 idx 3 is correct with radius 0 (pA_lower exactly 0.5).
ROWS = {
    0.25: [(0, 1, 1, 0.5, 1), (1, 2, 2, 0.25, 1), (2, 3, -1, 0.0, 0), (3, 4, 5, 0.8, 0), (4, 5, 5, 1.0, 1),
           (5, 6, 6, 0.1, 1)],
    0.5: [(0, 1, 1, 0.75, 1), (1, 2, -1, 0.0, 0), (2, 3, -1, 0.0, 0), (3, 4, 4, 0.0, 1), (4, 5, -1, 0.0, 0),
          (5, 6, 6, 1.5, 1)],
}
RADII = [0.0, 0.25, 0.5, 0.75, 1.0]
# By hand: sigma 0.25 correct with radius >= r: r=0 {0,1,4,5}, 0.25 {0,1,4}, 0.5 {0,4}, 0.75 {4}, 1.0 {4};
# sigma 0.5: r=0 {0,3,5}, 0.25 {0,5}, 0.5 {0,5}, 0.75 {0,5}, 1.0 {5}.
EXPECTED = {0.25: [4 / 6, 3 / 6, 2 / 6, 1 / 6, 1 / 6], 0.5: [3 / 6, 2 / 6, 2 / 6, 2 / 6, 1 / 6]}
EXPECTED_ACR = {0.25: (0.5 + 0.25 + 1.0 + 0.1) / 6, 0.5: (0.75 + 1.5) / 6}
EXPECTED_BEST = [(4 / 6, 0.25), (3 / 6, 0.25), (2 / 6, 0.25), (2 / 6, 0.5), (1 / 6, 0.25)]  # ties: smaller sigma


def write_tsv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [HEADER] + ["\t".join(map(str, (*row, 500, 490))) for row in rows]  # 500 samples, 490 votes
    path.write_text("\n".join(lines) + "\n")
    return path


def write_certify(folder, rows=ROWS):
    return {sigma: write_tsv(folder / f"sigma-{sigma}.tsv", r) for sigma, r in rows.items()}


@pytest.fixture
def summary(tmp_path):
    return Summary.of(load_runs(write_certify(tmp_path)), RADII)


def test_certified_accuracy_acr_abstain_clean(summary):
    for sigma, run in summary.runs.items():
        assert run.certified_accuracy(RADII) == pytest.approx(EXPECTED[sigma])
        assert run.acr == pytest.approx(EXPECTED_ACR[sigma])
    assert summary.runs[0.25].abstain_rate == pytest.approx(1 / 6)
    assert summary.runs[0.5].abstain_rate == pytest.approx(3 / 6)
    assert summary.runs[0.25].clean_accuracy == pytest.approx(4 / 6)
    assert summary.runs[0.5].clean_accuracy == pytest.approx(3 / 6)  # includes the radius-0 correct example


def test_fixed_n_need_per_example(summary):
    """The fewest samples a fixed-N test knowing pA = 490/500 needs for each example's bracket; 0 on abstain."""
    need = summary.runs[0.25].fixed_n_samples(RADII, 0.001)
    brackets = [0.5, 0.25, None, 0.75, 1.0, 0.0]  # the highest radius of RADII not above each radius
    expected = [0 if r is None else fewest_samples(0.98, norm.cdf(r / 0.25), 0.001) or 500 for r in brackets]
    assert list(need) == expected and expected[2] == 0 and expected[3] == expected[4] == 500  # 0.98 < Phi(3)
    assert expected[5] == fewest_samples(0.98, 0.5, 0.001) < expected[1] < expected[0]


@pytest.mark.parametrize("method, says", [("mixture", "one-sided beta-binomial mixtures"), ("union", "split over")])
def test_overview_says_how_the_adaptive_method_stops(summary, method, says):
    from dmae.report.render import ReportInputs, overview, per_sigma
    certify = {"method": method, "n0": 100, "n_max": 10_000, "alpha": 0.001}
    text = overview(ReportInputs(summary, "digits", {"certify σ=0.25": {"certify": certify}}))[1].text
    assert "at most N = 10000" in text and says in text
    assert per_sigma(summary, certify)[1].header[9] == "N" and per_sigma(summary, certify)[1].rows[0][9] == "10,000"


def test_best_sigma_envelope(summary):
    best = summary.best()
    assert [b.accuracy for b in best] == pytest.approx([a for a, _ in EXPECTED_BEST])
    assert [b.sigma for b in best] == [s for _, s in EXPECTED_BEST]
    best_acr = summary.best_acr()
    assert (best_acr.accuracy, best_acr.sigma) == (pytest.approx(EXPECTED_ACR[0.5]), 0.5)


def test_metrics_layout(summary):
    m = certification_metrics(summary)
    assert m["certified_accuracy"] == pytest.approx(
        {f"r={r!r}": round(a, 6) for r, (a, _) in zip(RADII, EXPECTED_BEST)})
    assert m["best_sigma"] == {"r=0.0": 0.25, "r=0.25": 0.25, "r=0.5": 0.25, "r=0.75": 0.5, "r=1.0": 0.25}
    assert (m["acr"], m["acr_sigma"], m["examples"]) == (round(EXPECTED_ACR[0.5], 6), 0.5, 6)
    s = m["per_sigma"]["sigma=0.25"]
    assert s["certified_accuracy"]["r=0.75"] == round(1 / 6, 6)
    assert (s["acr"], s["abstain_rate"], s["clean_accuracy"]) == (round(EXPECTED_ACR[0.25], 6),
                                                                  round(1 / 6, 6), round(4 / 6, 6))


def test_curves_sample_the_step_function(summary):
    grid, per_sigma, best = summary.curves()
    assert grid[0] == 0.0 and grid[-1] == 1.51  # one step past the largest radius, 1.5
    for sigma, values in per_sigma.items():
        at = {r: v for r, v in zip(grid, values)}
        assert [at[r] for r in RADII] == pytest.approx(EXPECTED[sigma])
        assert values[-1] == 0 and np.all(np.diff(values) <= 0)
    assert best == [max(v) for v in zip(*per_sigma.values())]


@pytest.mark.parametrize("bad_rows, message", [
    ([(0, 1, 1, 0.5, 1), (2, 3, 3, 0.5, 1), (5, 6, 6, 0.5, 1)], "misses 3 example"),  # idx 1, 3, 4 missing
    ([(0, 1, 1, 0.5, 1), (1, 2, 2, 0.5, 1), (1, 2, 2, 0.5, 1)], "unique idx"),  # duplicated
    ([], "no examples"),
])
def test_bad_files_are_named(tmp_path, bad_rows, message):
    paths = write_certify(tmp_path, {**ROWS, 0.5: bad_rows})
    with pytest.raises(UserError, match=message) as err:
        load_runs(paths)
    assert str(paths[0.5]) in str(err.value)


def test_differing_idx_sets_name_the_short_file(tmp_path):
    extra = ROWS[0.5] + [(6, 1, 1, 0.5, 1)]
    paths = write_certify(tmp_path, {**ROWS, 0.5: extra})
    with pytest.raises(UserError, match=r"misses 1 example\(s\) \(idx 6\)") as err:
        load_runs(paths)
    assert str(paths[0.25]) in str(err.value)


def test_missing_sigma_file_is_named(tmp_path):
    write_certify(tmp_path)
    paths = {s: tmp_path / f"sigma-{s}.tsv" for s in (0.25, 0.5, 1.0)}
    with pytest.raises(UserError, match=re.escape(str(paths[1.0]))):
        load_runs(paths)


# --- the stage ----------------------------------------------------------------------------------------------

def make_project(root, dataset="cifar10"):
    """A project folder with params, certification TSVs, settings, training metrics and a reconstruction PNG."""
    sigmas = list(ROWS)
    size = 32 if dataset == "cifar10" else 16
    (root / "params.yaml").write_text(json.dumps(params_with({
        "sigmas": sigmas, "data": {"dataset": dataset, "image_size": size}, "model": {"img_size": size},
        "report": {"radii": RADII}})))
    write_certify(root / "results/certify")
    for chain in ("off_the_shelf", "fine_tuned"):  # the default's chains, every 3rd example
        write_certify(root / f"results/chains/{chain}",
                      {s: [(i, *row[1:]) for i, row in enumerate(r[::3])] for s, r in ROWS.items()})
    for sigma in sigmas:
        settings = {"certify": {"n0": 100, "n": 500, "alpha": 0.001}, "data": {"dataset": dataset}, "sigma": sigma}
        (root / f"results/certify/sigma-{sigma}.settings.json").write_text(json.dumps(settings))
        (root / f"models/finetune/sigma-{sigma}").mkdir(parents=True)
        (root / f"models/finetune/sigma-{sigma}/settings.json").write_text(json.dumps({"finetune": {"m": 2}}))
        ft = root / f"results/finetune/sigma-{sigma}/metrics.tsv"
        ft.parent.mkdir(parents=True)
        ft.write_text("epoch\ttrain_loss\tval_clean_acc\tval_noisy_acc\tlr\n1\t2.0\t0.5\t0.4\t0.001\n"
                      "2\t1.5\t0.7\t0.6\t0.0005\n")
    (root / "models/pretrain").mkdir(parents=True)
    (root / "models/pretrain/settings.json").write_text(json.dumps({"data": {"dataset": dataset},
                                                                    "pretrain": {"mask_ratio": 0.75}}))
    (root / "results/pretrain").mkdir(parents=True)
    (root / "results/pretrain/metrics.tsv").write_text("epoch\tloss\tlr\n1\t1.0\t0.001\n2\t0.5\t0.002\n")
    plt.imsave(root / "results/pretrain/reconstructions.png", np.eye(8))


def run_report(root, attack=False):
    args = ["report", "--params", f"{root}/params.yaml"]
    for option, path in [("--certify-dir", "results/certify"), ("--pretrain-results", "results/pretrain"),
                         ("--finetune-results", "results/finetune"), ("--models", "models"),
                         ("--chain-dir", "results/chains"), ("--out", "results/report")] \
            + [("--attack-results", "results/attack")] * attack:
        args += [option, f"{root}/{path}"]
    return CliRunner().invoke(app, args)


def attack_params(**attack):
    """The project's params with `attack` merged into its attack section."""
    return parse_params(params_with({"attack": attack}))


def write_attack_results(folder):
    """What `dmae attack` leaves for the report: its section as document blocks, the figures, settings.json."""
    params = attack_params(eot=2, autoattack={"versions": ["standard", "rand"], "examples": 16})
    cfg = params.attack
    accuracy = {c: 0.5 for c in columns(cfg)}
    undefended = {**accuracy, "autoattack_standard": 0.25, "autoattack_rand": None}  # rand: no noise, no column
    nim = {**accuracy, "white_pgd_eot": 0.625, "gray_pgd": 0.375, "sweep_pgd_0.5": 0.0, "autoattack_rand": 0.125}
    rows = [Row("undefended", 0.0, False, undefended, undefended, None), Row("nim", 0.25, True, nim, nim, 0.01)]
    folder.mkdir(parents=True)
    for stem in ("tradeoff", "adversarial"):
        plt.imsave(folder / f"{stem}.png", np.eye(4))
    blocks = section(rows, params, 64, ["tradeoff.png", "adversarial.png"])
    (folder / "attack.json").write_text(json.dumps(to_json(blocks)))
    (folder / "metrics.json").write_text(json.dumps(attack_metrics(rows)))
    (folder / "settings.json").write_text(json.dumps({"attack": {"eot": 2}}))


def test_attack_section_warns_about_autoattack_only_when_run():
    for versions in ([], ["standard", "rand"]):
        params = attack_params(autoattack={"versions": versions})
        cfg = params.attack
        rows = [Row("nim", 0.25, True, {c: 0.5 for c in columns(cfg)}, {c: 0.5 for c in columns(cfg)}, 0.01)]
        text = to_markdown(section(rows, params, 8, ["t.png", "a.png"]))
        assert ("its accuracy is an upper bound" in text) == bool(versions)


def test_attack_section_says_when_autoattack_ran_with_a_reduced_budget():
    def text(budget):
        params = attack_params(autoattack={"versions": ["standard"], "budget": budget})
        accuracy = {c: 0.5 for c in columns(params.attack)}
        return to_markdown(section([Row("nim", 0.25, True, accuracy, accuracy, 0.01)], params, 8, ["t.png", "a.png"]))

    assert "REDUCED" not in text({})  # params.yaml: the standard budget
    reduced = text({"iterations": 5, "square_queries": 50})
    assert "REDUCED budget: iterations 5 (standard 100), square queries 50 (standard 5000)" in reduced
    assert "target classes" not in reduced.split("REDUCED")[1].split(".")[0]  # only the reduced keys are named


def test_autoattack_cells_take_their_interval_over_the_autoattack_examples():
    params = attack_params(autoattack={"versions": ["standard"], "examples": 16, "test_sigmas": [0.0]})
    accuracy = {c: 0.5 for c in columns(params.attack)}
    text = to_markdown(section([Row("undefended", 0.0, False, accuracy, accuracy, None)], params, 64,
                               ["t.png", "a.png"]))
    # 0.5 over 64 examples: 38-62 (the other columns); over 16: centre 0.5,
    # half-width 1.96 sqrt(1/64 + 1.96^2/1024) / 1.2401 = 0.2200 -> 28-72
    assert "50.0 (38–62)" in text and "50.0 (28–72)" in text
    assert "on 16 of them (a seeded subset), for undefended, nim at test σ none" in text


def test_wilson_interval_against_hand_computed_values():
    from dmae.report.attack import wilson_interval
    low, high = wilson_interval(0.5, 64)  # centre 0.5, half-width 1.96 sqrt(1/256 + 1.96^2/16384) / 1.0600 = 0.1190
    assert low == pytest.approx(0.3810, abs=1e-4) and high == pytest.approx(0.6190, abs=1e-4)
    low, high = wilson_interval(0.0, 64)  # all wrong: the interval still reaches 1.96^2 / (64 + 1.96^2)
    assert low == 0.0 and high == pytest.approx(3.8415 / 67.8415, abs=1e-4)
    assert wilson_interval(1.0, 10)[1] == pytest.approx(1.0)


def test_attack_table_shows_interval_and_worst_draw():
    params = attack_params(autoattack=NO_AUTOATTACK, draws=8)
    cfg = params.attack
    rows = [Row("nim", 0.25, True, {c: 0.5 for c in columns(cfg)}, {c: 0.375 for c in columns(cfg)}, 0.0123)]
    text = to_markdown(section(rows, params, 64, ["t.png", "a.png"]))
    assert "50.0 (38–62)" in text and "37.5" in text and "worst of 8 noise draws" in text and "| 12.3 |" in text


def test_attack_outputs_with_autoattack_at_some_sigmas_only(tmp_path):
    from dmae.report.attack import write_attack_outputs

    params = attack_params(examples=64, test_sigmas=[0.0, 0.1372549, 0.2745098, 0.5490196],
                           autoattack={"versions": ["standard", "rand"], "examples": 16,
                                       "test_sigmas": [0.0, 0.2745098]})
    cols = columns(params.attack)

    def row(name, sigma, defended):
        accuracy = {c: 0.5 for c in cols}
        if sigma not in params.attack.autoattack.test_sigmas:
            accuracy |= {"autoattack_standard": None, "autoattack_rand": None}
        if sigma == 0:
            accuracy["autoattack_rand"] = None
        return Row(name, sigma, defended, accuracy, accuracy, 0.01 if sigma else None)

    rows = [row("undefended", 0.0, False), *(row("nim", s, True) for s in params.attack.test_sigmas)]
    shown = {"clean": torch.zeros(2, 1, 16, 16)}
    write_attack_outputs(rows, shown, params, 64, tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["nim"]["sigma-0.27451"]["autoattack"] == {"standard": 0.5, "rand": 0.5}
    assert "autoattack" not in metrics["nim"]["sigma-0.137255"]
    assert (tmp_path / "tradeoff.png").is_file() and "| nim | 35/255 |" in (tmp_path / "attack.md").read_text()


def test_paper_comparison_says_what_the_run_can_show():
    from dmae.report.attack import paper_comparison

    digits = to_markdown(paper_comparison(attack_params(examples=64, autoattack={"examples": 16}), 64))
    assert "not comparable to its tables" in digits and "38–62 %" in digits  # Wilson at 0.5 over 64
    assert "| examples | 64 (AutoAttack: 16) | 50,000 (AutoAttack: 5,000) |" in digits
    preset = parse_params(yaml.safe_load((REPO / "presets/imagenet-nim-vit-b.yaml").read_text()))
    imagenet = to_markdown(paper_comparison(preset, 1000))
    assert "Same data as the paper" in imagenet and "| ℓ∞ budget ε | 4/255 | 4/255 |" in imagenet
    assert "| test σ | none, 70/255, 140/255 |" in imagenet


def test_document_blocks_survive_json():
    blocks = [Heading("h", 3), Paragraph("p"), Table(["a", "b"], [["x", "1"]], numeric=False), Figure("f.png", "c")]
    assert from_json(json.loads(json.dumps(to_json(blocks)))) == blocks
    with pytest.raises(ValueError, match="item 1 is not a document block"):
        from_json([to_json(blocks)[0], {"kind": "video", "path": "v.mp4"}])


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_stage_writes_a_self_contained_deterministic_report(tmp_path):
    make_project(tmp_path)
    result = run_report(tmp_path)
    assert result.exit_code == 0, result.output
    out = tmp_path / "results/report"
    first = snapshot(out)
    assert {"metrics.json", "curves.tsv", "report.md", "report.html", "figures/certified_accuracy.png",
            "figures/certified_accuracy.svg", "figures/finetune.png", "figures/pretrain_loss.png",
            "figures/reconstructions.png"} <= set(first)

    assert json.loads(first["metrics.json"])["best_sigma"]["r=0.75"] == 0.5
    header = first["curves.tsv"].decode().splitlines()[0]
    assert header == "radius\tsigma=0.25\tsigma=0.5\tbest"

    md = first["report.md"].decode()
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(linked) == 5 and all((out / path).is_file() for path in linked)
    # the chains hold the encoder's rows 0, 3 (every 3rd): the encoder, restricted to them, must read the same
    tables = [line.split(" | ") for line in md.splitlines() if line.startswith(("| DMAE encoder", "| off_the_shelf"))]
    assert len(tables) == 4 and tables[0][1:-2] == tables[1][1:-2] and tables[2][1:-2] == tables[3][1:-2]
    assert tables[0][-1] != tables[1][-1]  # but a chain runs two models per sample
    assert "| ours − DMAE ViT-B |  | -29.2 |" in md  # ours at r = 0.25 is 3/6 = 50.0 %, DMAE ViT-B 79.2 %
    assert "fixed-N need (mean)" in md and "Mean / need says" in md  # from the certify settings' alpha and N
    assert str(tmp_path) not in md

    page = first["report.html"].decode()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page)
    assert "<script" not in page and "<link" not in page
    images = re.findall(r"<img[^>]*\ssrc=\"([^\"]*)\"", page)
    assert len(images) == 5 and all(src.startswith("data:image/png;base64,") for src in images)

    result = run_report(tmp_path)
    assert result.exit_code == 0, result.output
    assert snapshot(out) == first  # byte-identical, SVGs included


def test_stage_includes_the_attack_section(tmp_path):
    make_project(tmp_path, dataset="digits")
    write_attack_results(tmp_path / "results/attack")
    result = run_report(tmp_path, attack=True)
    assert result.exit_code == 0, result.output
    out = tmp_path / "results/report"
    md = (out / "report.md").read_text()
    assert "## Adversarial robustness: NIM / De³" in md
    assert re.search(r"\| nim \| 63\.8/255 \|( 50\.0 \(38–62\) \|){4} 62\.5 \(50–73\) \|", md)  # PGD EOT-2: 6th
    # the headline's worst case is over the attacks at the configured eps run on every example: gray-box PGD,
    # not the eps sweep, not AutoAttack (on a subset: reported beside it)
    headline = json.loads((out / "headline.json").read_text())
    assert headline["robust_accuracy"] == {"undefended": 0.5, "nim": 0.375}
    assert headline["autoattack"] == {"undefended": {"sigma-0": {"standard": 0.25}},
                                      "nim": {"sigma-0.25": {"standard": 0.5, "rand": 0.125}}}
    assert "### Against the NIM paper's protocol" in md and "| ℓ∞ budget ε | 16/255 | 4/255 |" in md
    assert "figures/attack_tradeoff.png" in md and "figures/attack_adversarial.png" in md
    assert (out / "figures/attack_tradeoff.png").read_bytes() == (tmp_path / "results/attack/tradeoff.png").read_bytes()
    assert len(re.findall(r"<img ", (out / "report.html").read_text())) == 7  # 5 of ours, 2 of the attack
    assert "attack.eot" in md  # the attack stage's settings join the settings table

    # without the attack results, the section and its copied figures go
    assert run_report(tmp_path).exit_code == 0
    assert "Adversarial" not in (out / "report.md").read_text()
    assert not list((out / "figures").glob("attack_*"))


@pytest.mark.parametrize("content, message", [(None, "attack.json: not found"),
                                              ('[{"kind": "video"}]', "not a report section"),
                                              ("{", "not a report section"),
                                              ('[{"kind": "figure", "path": "t.png", "caption": "c"}]',
                                               "t.png: figure of")])
def test_stage_names_a_bad_attack_section(tmp_path, content, message):
    make_project(tmp_path, dataset="digits")
    (tmp_path / "results/attack").mkdir(parents=True)
    if content is not None:
        (tmp_path / "results/attack/attack.json").write_text(content)
    result = run_report(tmp_path, attack=True)
    assert result.exit_code == 2
    assert message in result.output.replace("\n", "")
    assert not (tmp_path / "results/report/report.md").exists()  # nothing written


def test_stage_names_the_missing_sigma_file(tmp_path):
    make_project(tmp_path, dataset="digits")
    params = json.loads((tmp_path / "params.yaml").read_text())
    (tmp_path / "params.yaml").write_text(json.dumps({**params, "sigmas": [0.25, 0.5, 1.0]}))
    result = run_report(tmp_path)
    assert result.exit_code == 2
    assert "results/certify/sigma-1.0.tsv" in result.output.replace("\n", "")  # rich wraps long lines


def test_sanity_checks_flag_only_beyond_the_error_bars():
    from dmae.report.attack import sanity_checks
    cfg = settings("attack", autoattack=NO_AUTOATTACK, eps_sweep=[0.0, 0.5])
    good = {c: 0.5 for c in columns(cfg)} | {"sweep_pgd_0": 0.9, "white_pgd": 0.5, "sweep_pgd_0.5": 0.0}
    masked = good | {"white_pgd_eot": 0.9, "white_pgd_bpda": 0.85, "gray_pgd": 0.3, "sweep_pgd_0.5": 0.6,
                     "white_pgd": 0.55}  # a defense whose gradients mislead: every check should trip
    rows = [Row("nim", 0.25, True, good, good, 0.01), Row("nim", 0.5, True, masked, masked, 0.01)]
    checks = sanity_checks(rows, cfg, 256)
    assert [c[-1] for c in checks if c[2] == "63.8/255"] == ["pass"] * 5
    flagged = [c[0].split(" (")[0] for c in checks if c[2] != "63.8/255" and c[-1] == "FLAG"]
    assert len(flagged) == 4, checks  # near 0, gray-box, Square, EOT (0.55 -> 0.6 is within the bars)
    assert sanity_checks(rows, cfg, 4)[-1][-1] == "pass"  # 4 examples: 0.9 vs 0.55 is within the error bar
    warned = Row("nim", 0.25, True, good, good, 0.01, ("square: Square Attack has decreased the robust accuracy",))
    assert sanity_checks([warned], cfg, 256)[-1] == ["Square reports: Square Attack has decreased the robust "
                                                     "accuracy", "nim", "63.8/255", "50.0", "WARN"]


def test_overview_says_when_n_is_too_small_to_certify_any_radius():
    """alpha ** (1 / N) is the highest lower bound on pA; below 1/2 every image abstains (N = 8, alpha = 0.001)."""
    assert radius_cap_text(0.001 ** (1 / 8), "N").startswith("with these, NO radius can be certified")
    assert "0.422 < 1/2" in radius_cap_text(0.001 ** (1 / 8), "N")
    assert radius_cap_text(0.001 ** (1 / 500), "N") == "with these, no certified radius can exceed 2.21 σ"
