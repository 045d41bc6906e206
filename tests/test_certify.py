"""Data set certification: TSV format, shards, resume after interruption, and input validation."""

import pytest
import torch
from torch import nn

from dmae.smoothing import Smooth
from dmae.smoothing.certify import (
    HEADER,
    CertifyRow,
    certify_examples,
    merge_shards,
    read_certify_tsv,
    work_path,
    write_certify_tsv,
)
from dmae.util.errors import UserError

ARGS = {"n0": 16, "n": 128, "alpha": 0.01, "batch_size": 50, "progress": False}


class Sign(nn.Module):
    """Class 1 where the mean pixel exceeds 0.5, else class 0."""

    def __init__(self):
        super().__init__()
        self.offset = nn.Parameter(torch.tensor(-0.5))

    def forward(self, x):
        z = x.mean(dim=(1, 2, 3), keepdim=False)[:, None] + self.offset
        return torch.cat((torch.zeros_like(z), z), dim=1)


def make_dataset(size=12):
    """Images at mean pixel 0.05 .. 0.95; labels by side, except idx 10, which is labelled wrongly."""
    data = []
    for i in range(size):
        level = 0.05 + 0.9 * i / (size - 1)
        label = int(level > 0.5)
        data.append((torch.full((1, 2, 4), level), 1 - label if i == 10 else label))
    return data


class Interrupted(Exception):
    pass


class Counting:
    """A data set wrapper counting reads, interrupting after `limit` of them."""

    def __init__(self, data, limit=None):
        self.data, self.limit, self.reads = data, limit, 0

    def __len__(self):
        return len(self.data)

    def __getitem__(self, idx):
        if self.reads == self.limit:
            raise Interrupted
        self.reads += 1
        return self.data[idx]


def smooth():
    return Smooth(Sign(), 2, 0.25, seed=7)


def work_rows(out) -> int:
    return len(work_path(out).read_text().splitlines()) - 2  # below the parameters and the header


INDICES = [5, 2, 9, 0, 11, 10, 3, 7]


def test_certify_examples_writes_sorted_rows(tmp_path):
    data = make_dataset()
    out = tmp_path / "certify.tsv"
    rows = certify_examples(smooth(), data, INDICES, out_path=out, **ARGS)
    assert out.read_text().splitlines()[0] == HEADER
    assert read_certify_tsv(out) == rows
    assert [row.idx for row in rows] == sorted(INDICES)
    assert not work_path(out).exists()
    for row in rows:
        image, label = data[row.idx]
        assert (row.predict, row.radius) == smooth().certify(image, 16, 128, 0.01, 50, index=row.idx)
        assert row.label == label and row.correct == int(row.predict == label)
    # A confident prediction against the label is still certified (no early abstention), and is wrong.
    wrong = next(row for row in rows if row.idx == 10)
    assert wrong.predict == 1 - wrong.label and wrong.radius > 0 and wrong.correct == 0


@pytest.mark.parametrize("method", ["mixture", "union"])
def test_adaptive_rows_are_the_adaptive_certificates(tmp_path, method):
    data, radii = make_dataset(), [0.0, 0.1, 0.2]
    args = ARGS | {"n": 2000, "method": method, "radii": radii}
    rows = certify_examples(smooth(), data, INDICES, out_path=tmp_path / "adaptive.tsv", **args)
    for row in rows:
        certificate = smooth().certify_adaptive(data[row.idx][0], 16, 2000, 0.01, 50, radii=radii, method=method,
                                                index=row.idx)
        assert (row.predict, row.radius, row.samples, row.votes) == certificate
    assert len({row.samples for row in rows}) > 1 and max(row.samples for row in rows) <= 2000
    with pytest.raises(Interrupted):
        certify_examples(smooth(), Counting(data, limit=2), INDICES, out_path=tmp_path / "cut.tsv", **args)
    with pytest.raises(UserError, match="work file of a run with other parameters"):  # the radii are its settings
        certify_examples(smooth(), data, INDICES, out_path=tmp_path / "cut.tsv", **(args | {"radii": [0.0]}))


def test_shards_merge_to_the_single_run(tmp_path):
    data = make_dataset()
    certify_examples(smooth(), data, INDICES, out_path=tmp_path / "all.tsv", **ARGS)
    shards = [tmp_path / f"shard{i}.tsv" for i in range(3)]
    for i, path in enumerate(shards):
        certify_examples(smooth(), data, INDICES, out_path=path, shard=(i, 3), **(ARGS | {"batch_size": 7}))
    assert [row.idx for row in read_certify_tsv(shards[1])] == sorted(INDICES[1::3])
    merge_shards(shards, tmp_path / "merged.tsv", INDICES)
    assert (tmp_path / "merged.tsv").read_text() == (tmp_path / "all.tsv").read_text()


def test_resume_after_interruption(tmp_path):
    data = make_dataset()
    certify_examples(smooth(), data, INDICES, out_path=tmp_path / "full.tsv", **ARGS)
    out = tmp_path / "resumed.tsv"
    with pytest.raises(Interrupted):
        certify_examples(smooth(), Counting(data, limit=6), INDICES, out_path=out, **ARGS)
    assert not out.exists()
    finished = work_rows(out)
    assert finished >= 1
    with open(work_path(out), "a") as fh:
        fh.write("11\t1\t1\t0.3")  # a row torn by the interruption
    resumed = Counting(data)
    certify_examples(smooth(), resumed, INDICES, out_path=out, **ARGS)
    assert resumed.reads == len(INDICES) - finished  # the rows certified before are not certified again
    assert out.read_text() == (tmp_path / "full.tsv").read_text()
    assert not work_path(out).exists()


def test_resume_refuses_work_file_of_other_parameters(tmp_path):
    out = tmp_path / "certify.tsv"
    with pytest.raises(Interrupted):
        certify_examples(smooth(), Counting(make_dataset(), limit=6), INDICES, out_path=out, **ARGS)
    with pytest.raises(UserError, match="certify.tsv.partial:1: .*other parameters"):
        certify_examples(smooth(), make_dataset(), INDICES, out_path=out, **(ARGS | {"n": 200}))
    with pytest.raises(UserError, match="certify.tsv.partial: idx 5 is not in shard"):
        certify_examples(smooth(), make_dataset(), INDICES, out_path=out, shard=(1, 2), **ARGS)


def test_progress_bar_goes_to_stderr(tmp_path, capsys):
    certify_examples(smooth(), make_dataset(), [0, 1], out_path=tmp_path / "c.tsv", **(ARGS | {"progress": True}))
    captured = capsys.readouterr()
    assert captured.out == "" and "certify c.tsv" in captured.err


def row(idx, label=1, predict=1, radius=0.25):
    return CertifyRow(idx, label, predict, radius, int(predict == label), 500, 480)


@pytest.mark.parametrize(
    "text, where",
    [
        ("", ":1: expected header"),
        ("idx\tlabel\tpredict\tradius\tcorrect\tsamples\n", ":1: expected header"),
        (HEADER + "\n0\t1\t1\t0.25\t1\t500\n", ":2: expected 7"),
        (HEADER + "\n0\t1\t1\t0.25\t1\t500\t480\n1\t1\tone\t0.25\t1\t500\t480\n", ":3: malformed"),
        (HEADER + "\n0\t1\t1\t0.25\t0\t500\t480\n", ":2: inconsistent"),
        (HEADER + "\n0\t1\t-1\t0.25\t0\t500\t480\n", ":2: inconsistent"),
        (HEADER + "\n0\t1\t1\t0.25\t1\t500\t501\n", ":2: inconsistent"),  # more votes than samples
        (HEADER + "\n3\t1\t1\t0.25\t1\t500\t480\n3\t1\t1\t0.25\t1\t500\t480\n", ":3: idx 3 after 3"),
    ],
)
def test_malformed_tsv_names_file_and_line(tmp_path, text, where):
    path = tmp_path / "bad.tsv"
    path.write_text(text)
    with pytest.raises(UserError, match="bad.tsv" + where):
        read_certify_tsv(path)


def test_tsv_round_trip_keeps_full_precision(tmp_path):
    rows = [row(0, radius=0.1 + 0.2), row(4, predict=-1, radius=0.0)]
    write_certify_tsv(tmp_path / "c.tsv", rows)
    assert read_certify_tsv(tmp_path / "c.tsv") == rows
    with pytest.raises(UserError, match="missing.tsv does not exist"):
        read_certify_tsv(tmp_path / "missing.tsv")


def test_merge_checks_every_idx_once(tmp_path):
    a, b = tmp_path / "a.tsv", tmp_path / "b.tsv"
    write_certify_tsv(a, [row(0), row(2)])
    write_certify_tsv(b, [row(1), row(2)])
    with pytest.raises(UserError, match=r"idx 2 appears in both .*a\.tsv and .*b\.tsv"):
        merge_shards([a, b], tmp_path / "m.tsv", range(3))
    write_certify_tsv(b, [row(1)])
    with pytest.raises(UserError, match=r"1 idx missing from the shard files .*a\.tsv, .*b\.tsv: 3"):
        merge_shards([a, b], tmp_path / "m.tsv", range(4))
    with pytest.raises(UserError, match=r"a\.tsv: idx 2 is not among the expected"):
        merge_shards([a, b], tmp_path / "m.tsv", range(2))
    assert not (tmp_path / "m.tsv").exists()
    assert merge_shards([b, a], tmp_path / "m.tsv", range(3)) == [row(0), row(1), row(2)]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"shard": (3, 3)}, "shard must be"),
        ({"shard": (0, 0)}, "shard must be"),
        ({"indices": [1, 2, 1]}, "idx 1 appears more than once"),
        ({"indices": [12]}, "idx 12 is outside the dataset"),
        ({"indices": [1.0]}, "indices must be integers"),
        ({"n0": 0}, "^n0 "),
        ({"alpha": 2}, "^alpha "),
    ],
)
def test_bad_arguments(tmp_path, kwargs, message):
    args = {"indices": [0, 1], **ARGS, **kwargs}
    out = tmp_path / "c.tsv"
    with pytest.raises(UserError, match=message):
        certify_examples(smooth(), make_dataset(), out_path=out, **args)
    assert not work_path(out).exists()
