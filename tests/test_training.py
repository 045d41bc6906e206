"""Training loops: resume equivalence, determinism, schedules, consistency loss and mixup semantics."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Subset, TensorDataset

from dmae.data import load_split, read_meta
from dmae.models.autoencoder import DenoisingMAE
from dmae.models.classifier import Classifier
from dmae.train.finetune import FinetuneStep, finetune, noisy_inputs
from dmae.train.loop import Schedule, Step, train
from dmae.train.losses import consistency_loss
from dmae.train.mixup import mix, soft_targets
from dmae.train.optim import layer_id, lr_at, param_groups, set_lr
from dmae.train.pretrain import pretrain
from dmae.util.errors import UserError
from dmae.util.state import load_state
from tests.conftest import settings


class Interrupt(Exception):
    pass


def _interrupt_after(epoch):
    def hook(row):
        if row["epoch"] == epoch:
            raise Interrupt
    return hook


def _autoencoder(digits_dir):
    torch.manual_seed(0)
    return DenoisingMAE(settings("model").config(read_meta(digits_dir)))


def test_pretrain_resume_equals_uninterrupted(digits_dir, tmp_path):
    train = Subset(load_split(digits_dir, "train"), range(96))
    cfg = settings("pretrain", epochs=3, batch_size=32, accum_steps=2, warmup_epochs=1)
    straight = _autoencoder(digits_dir)
    hist = pretrain(straight, train, cfg, device=torch.device("cpu"), state_path=tmp_path / "a.pt", progress=False)

    resumed = _autoencoder(digits_dir)
    with pytest.raises(Interrupt):
        pretrain(resumed, train, cfg, device=torch.device("cpu"), state_path=tmp_path / "b.pt", progress=False,
                 on_epoch=_interrupt_after(2))
    fresh = _autoencoder(digits_dir)  # a new process: weights come only from the saved state
    hist2 = pretrain(fresh, train, cfg, device=torch.device("cpu"), state_path=tmp_path / "b.pt", progress=False)
    assert hist == hist2
    for (k, a), b in zip(straight.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k


PAPER_AUGMENT = {"crop_scale": (0.08, 1.0), "crop_ratio": (0.75, 4 / 3), "hflip": 0.5,
                 "rand_augment": "rand-m9-mstd0.5-inc1", "erase_prob": 0.25, "erase_mode": "pixel", "erase_count": 1}


def test_finetune_resume_equals_uninterrupted(digits_dir, tmp_path):
    """With the paper's augmentation, mixup, cutmix and drop path: the same weights, byte for byte."""
    meta = read_meta(digits_dir)
    train = Subset(load_split(digits_dir, "train", augment=PAPER_AUGMENT), range(64))
    val = Subset(load_split(digits_dir, "val"), range(32))
    cfg = settings("finetune", epochs=2, batch_size=32, warmup_epochs=0, mixup=0.8, cutmix=1.0)

    def model():
        torch.manual_seed(0)
        return Classifier(settings("model").config(meta), meta["num_classes"], drop_path=0.1)

    inputs, cpu = noisy_inputs(cfg, 0.5), torch.device("cpu")
    a = model()
    hist = finetune(a, train, val, inputs, cfg, device=cpu, state_path=tmp_path / "a.pt", progress=False)
    with pytest.raises(Interrupt):
        finetune(model(), train, val, inputs, cfg, device=cpu, state_path=tmp_path / "b.pt", progress=False,
                 on_epoch=_interrupt_after(1))
    b = model()
    hist2 = finetune(b, train, val, inputs, cfg, device=cpu, state_path=tmp_path / "b.pt", progress=False)
    assert hist == hist2
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_finetune_runs_the_epochs_of_its_sigma(digits_dir, tmp_path):
    meta = read_meta(digits_dir)
    train = Subset(load_split(digits_dir, "train"), range(32))
    cfg = settings("finetune", epochs={0.5: 1, 1.0: 2}, batch_size=32, warmup_epochs=0)
    model = Classifier(settings("model").config(meta), meta["num_classes"])
    hist = finetune(model, train, train, noisy_inputs(cfg, 1.0), cfg, device=torch.device("cpu"),
                    state_path=tmp_path / "s.pt", progress=False)
    assert [row["epoch"] for row in hist] == [1, 2]


def test_without_held_out_images_the_metrics_are_nan_and_the_log_says_so(digits_dir, tmp_path, capsys):
    meta = read_meta(digits_dir)
    train, val = Subset(load_split(digits_dir, "train"), range(32)), Subset(load_split(digits_dir, "val"), [])
    cfg = settings("finetune", epochs=1, batch_size=32, warmup_epochs=0)
    model = Classifier(settings("model").config(meta), meta["num_classes"])
    (row,) = finetune(model, train, val, noisy_inputs(cfg, 0.5), cfg, device=torch.device("cpu"),
                      state_path=tmp_path / "s.pt", progress=False)
    assert math.isnan(row["val_clean_acc"]) and math.isnan(row["val_noisy_acc"]) and math.isfinite(row["train_loss"])
    assert "no held-out split (data.val_fraction 0): the val_* metrics are NaN" in capsys.readouterr().err


def mae_lars_step(p, grad, buffer, lr, weight_decay, momentum=0.9, trust=0.001):
    """facebookresearch/mae util/lars.py, written out: weight decay and the trust ratio for parameters of more
    than one dimension, then momentum."""
    d = grad.clone()
    if p.ndim > 1:
        d = d + weight_decay * p
        if p.norm() > 0 and d.norm() > 0:
            d = d * (trust * p.norm() / d.norm())
    buffer = momentum * buffer + d
    return p - lr * buffer, buffer


def test_the_linear_probe_steps_with_maes_lars(digits_dir):
    """BatchNorm1d without affine + Linear on the frozen encoder; timm's Lars steps it as MAE's LARS does (at the
    probe's weight decay 0, where the two formulas agree), the encoder untouched."""
    from timm.optim import Lars

    meta = read_meta(digits_dir)
    model = Classifier(settings("model").config(meta), meta["num_classes"], "linear_probe")
    model.load_encoder({k.removeprefix("vit."): v for k, v in model.state_dict().items()
                        if not k.startswith("vit.head")}, source="itself")
    head = model.vit.head
    assert isinstance(head[0], torch.nn.BatchNorm1d) and not head[0].affine
    cfg = settings("finetune", mode="linear_probe", weight_decay=0.0, layer_decay=1.0, base_lr=0.1)
    step = FinetuneStep(cfg, noisy_inputs(cfg, 0.5), model, [], torch.device("cpu"))
    optimizer = step.optimizer(model)
    assert isinstance(optimizer, Lars)
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in head.parameters()}
    encoder = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("vit.head")}
    expected = {name: (p.detach().clone(), torch.zeros_like(p)) for name, p in head.named_parameters()}
    torch.manual_seed(0)
    x = torch.rand(8, 1, 16, 16)
    for _ in range(2):  # the second step uses the momentum buffer
        set_lr(optimizer, 0.4)
        model.train()
        F.cross_entropy(model(x), torch.arange(8)).backward()
        for name, p in head.named_parameters():
            expected[name] = mae_lars_step(*expected[name][:1], p.grad, expected[name][1], lr=0.4, weight_decay=0.0)
        optimizer.step()
        optimizer.zero_grad()
        for name, p in head.named_parameters():
            assert torch.allclose(p, expected[name][0], rtol=1e-5, atol=1e-7), name
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in encoder.items())


def test_in_memory_batches_equal_the_data_loader_ones(digits_dir):
    """An un-augmented tensor split is sliced a micro-batch at a time instead of read item by item through a
    DataLoader: the same bytes, in the same order, for every accumulation step."""
    from dmae.train.batches import epoch_batches

    train_set = load_split(digits_dir, "train")

    class ItemByItem(torch.utils.data.Dataset):  # what any other data set goes through
        def __len__(self):
            return len(train_set)

        def __getitem__(self, i):
            return train_set[i]

    for accum in (1, 4):
        sliced = list(epoch_batches(train_set, 128, accum, seed=3, epoch=2, workers=0))
        loaded = list(epoch_batches(ItemByItem(), 128, accum, seed=3, epoch=2, workers=0))
        assert len(sliced) == len(loaded) == len(train_set) // 128 * accum
        for a, b in zip(sliced, loaded):
            assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
            assert (a.step, a.positions, a.last) == (b.step, b.positions, b.last)


def test_consistency_loss_hand_computed():
    logits = torch.tensor([[[2.0, 0.0]], [[0.0, 0.0]]])  # m=2 copies of one example, 2 classes
    targets = torch.tensor([[1.0, 0.0]])
    p1 = [math.exp(2) / (math.exp(2) + 1), 1 / (math.exp(2) + 1)]
    p2 = [0.5, 0.5]
    avg = [(a + b) / 2 for a, b in zip(p1, p2)]
    ce = (-math.log(p1[0]) - math.log(p2[0])) / 2
    kl = sum(sum(a * math.log(a / p[k]) for k, a in enumerate(avg)) for p in (p1, p2)) / 2
    ent = -sum(a * math.log(a) for a in avg)
    out = consistency_loss(logits, targets, lam=2.0, eta=0.5)
    assert out["ce"].item() == pytest.approx(ce, rel=1e-6)
    assert out["kl"].item() == pytest.approx(kl, rel=1e-6)
    assert out["entropy"].item() == pytest.approx(ent, rel=1e-6)
    assert out["loss"].item() == pytest.approx(ce + 2.0 * kl + 0.5 * ent, rel=1e-6)


def test_mixup_and_cutmix_mix_every_copy_the_same_way():
    x = torch.rand(1, 4, 1, 8, 8).expand(3, -1, -1, -1, -1).clone()  # 3 identical copies of 4 images
    targets = soft_targets(torch.tensor([0, 1, 2, 3]), 4, 0.0)
    for mixup, cutmix in [(0.8, 0.0), (0.0, 1.0)]:
        out, t = mix(x, targets, mixup, cutmix, np.random.default_rng(0))
        assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
        assert torch.allclose(t.sum(1), torch.ones(4))
        lam = t[0, 0].item()  # image 0 is mixed with image 3 (reversed batch)
        assert t[0, 3].item() == pytest.approx(1 - lam)
        if cutmix:  # the target weight is the share of pixels kept
            kept = (out[0, 0] == x[0, 0]).float().mean().item()
            assert kept == pytest.approx(lam, abs=1 / 64 + 1e-6)


def test_label_smoothing_targets():
    t = soft_targets(torch.tensor([1]), 4, 0.1)
    assert torch.allclose(t, torch.tensor([[0.025, 0.925, 0.025, 0.025]]))
    assert F.cross_entropy(torch.zeros(1, 4), torch.tensor([1]), label_smoothing=0.1).item() == pytest.approx(
        -(t * torch.log_softmax(torch.zeros(1, 4), -1)).sum().item())


def test_schedule_and_layer_decay():
    assert lr_at(0, 100, 10, 1.0, 0.0) == 0.0
    assert lr_at(5, 100, 10, 1.0, 0.0) == pytest.approx(0.5)
    assert lr_at(10, 100, 10, 1.0, 0.0) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, 1.0, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway down the cosine
    assert lr_at(100, 100, 10, 1.0, 0.1) == pytest.approx(0.1)
    assert layer_id("vit.pos_embed", 12) == 0 and layer_id("vit.blocks.3.attn.qkv.weight", 12) == 4
    assert layer_id("vit.head.weight", 12) == 13
    model = Classifier(settings("model").config({"channels": 1, "mean": [0.3], "std": [0.3]}), 10)
    groups = param_groups(model, 0.05, layer_decay=0.5, num_layers=6)
    by_name = {id(p): g for g in groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert by_name[id(params["vit.head.weight"])]["lr_scale"] == 1.0
    assert by_name[id(params["vit.blocks.5.mlp.fc1.weight"])]["lr_scale"] == 0.5
    assert by_name[id(params["vit.patch_embed.proj.weight"])]["lr_scale"] == 0.5**7
    assert by_name[id(params["vit.blocks.0.norm1.weight"])]["weight_decay"] == 0.0  # norms: no decay
    assert by_name[id(params["vit.cls_token"])]["weight_decay"] == 0.0
    assert by_name[id(params["vit.blocks.0.attn.qkv.weight"])]["weight_decay"] == 0.05


class _NanAt(Step):
    """A linear model's squared error, made nan at one (epoch, step)."""

    name, seed, order_seed = "toy", (0,), 0

    def __init__(self, epoch: int, step: int):
        self.at = (epoch, step)

    def optimizer(self, model):
        return torch.optim.SGD(model.parameters(), lr=0.1)

    def loss(self, model, batch):
        loss = (model(batch.x.flatten(1)).squeeze(1) - batch.y.float()).pow(2).mean()
        return loss * float("nan") if (batch.epoch, batch.step) == self.at else loss


def test_the_loop_stops_on_a_non_finite_loss_naming_epoch_and_step(tmp_path):
    data = TensorDataset(torch.rand(64, 1, 2, 2), torch.arange(64) % 3)
    schedule = Schedule("toy", epochs=3, batch_size=16, accum_steps=2, peak_lr=0.1, min_lr=0.0, warmup_epochs=0,
                        precision="fp32")
    model = torch.nn.Linear(4, 1)
    with pytest.raises(UserError, match=r"toy: the loss is nan at epoch 2, step 3; training stopped"):
        train(model, data, _NanAt(1, 2), schedule, device=torch.device("cpu"), state_path=tmp_path / "s.pt",
              progress=False)
    assert load_state(tmp_path / "s.pt")["epoch"] == 1  # the last good epoch's checkpoint is kept
