"""bcosify.finetune: losses, b schedules, checkpoints and resume, divergence, and evaluation."""

from __future__ import annotations

import copy
import functools
import math
import time

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bcosify
from bcosify.training import TrainingDivergedError, compute_loss, evaluate, latest_checkpoint


def _data(n=96, seed=0):
    """Two-class images: class 1 has a reddish patch, class 0 a bluish one, anywhere in the image."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    x = torch.rand(n, 3, 16, 16, generator=g) * 0.4
    for i in range(n):
        r, c = torch.randint(0, 10, (2,), generator=g).tolist()
        x[i, 0 if labels[i] == 1 else 2, r:r + 6, c:c + 6] += 0.6
    return TensorDataset(x.clamp(0, 1), labels)


@functools.lru_cache(maxsize=1)
def _pretrained() -> nn.Module:
    """The "existing checkpoint": a small CNN trained on the task (as users convert pretrained models)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(5):
        for x, y in _loader():
            nn.functional.cross_entropy(model((x - 0.5) / 0.25), y).backward()
            opt.step(), opt.zero_grad()
    return model.eval()


def _original() -> nn.Module:
    return copy.deepcopy(_pretrained())


def _loader(seed=0, shuffle=True, batch_size=16):
    return DataLoader(_data(seed=seed), batch_size=batch_size, shuffle=shuffle)


def _model():
    return bcosify.convert(_original(), mean=0.5, std=0.25)


@pytest.mark.parametrize("loss", ["bce", "bce_uniform", "ce", "distill"])
def test_every_loss_learns(loss):
    model = _model()
    teacher = _original() if loss == "distill" else None
    history = bcosify.finetune(model, _loader(), val=_loader(seed=1, shuffle=False), teacher=teacher, epochs=4,
                               lr=1e-2, loss=loss, progress=False)
    losses = [e["loss"] for e in history.epochs]
    assert losses[-1] < losses[0]
    assert history.epochs[-1]["val_accuracy"] >= 0.9
    assert not model.training and model.b == 2.0


def test_distill_needs_no_labels():
    model = _model()
    images_only = DataLoader(_data().tensors[0], batch_size=16)
    history = bcosify.finetune(model, images_only, teacher=_original(), loss="distill", epochs=1, progress=False)
    assert history.epochs[0]["accuracy"] is None and history.epochs[0]["loss"] > 0
    with pytest.raises(ValueError, match="needs labels"):
        bcosify.finetune(_model(), images_only, loss="bce", epochs=1, progress=False)


@torch.no_grad()
def _feature_distance(model, original, x) -> float:
    """Mean cosine distance of the pooled penultimate features (the classifier's input) of both models."""
    found = []
    hooks = [model.network[-1].register_forward_pre_hook(lambda m, i: found.append(i[0])),
             original[-1].register_forward_pre_hook(lambda m, i: found.append(i[0]))]
    model.eval()(x), original((x - 0.5) / 0.25)
    for h in hooks:
        h.remove()
    return (1 - nn.functional.cosine_similarity(*found, dim=1)).mean().item()


@pytest.mark.parametrize("options", [{}, {"align_logits": 1.0}])
def test_align_brings_the_features_to_the_originals(options):
    model, original = _model(), _original()
    x = _data(seed=1).tensors[0]
    before = _feature_distance(model, original, x)
    history = bcosify.finetune(model, _loader(), val=_loader(seed=1, shuffle=False), teacher=original, epochs=4,
                               lr=1e-2, loss="align", progress=False, **options)
    losses = [e["loss"] for e in history.epochs]
    assert losses[-1] < 0.5 * losses[0]
    after = _feature_distance(model, original, x)  # on other images than the training ones
    assert after < 0.5 * before, (before, after)
    assert history.epochs[-1]["val_accuracy"] >= 0.9
    assert not any(m._forward_pre_hooks for m in [*model.modules(), *original.modules()])  # taps removed


def test_align_uses_no_labels():
    runs = []
    for labels in (_data().tensors[1], torch.zeros(96, dtype=torch.long), None):
        x = _data().tensors[0]
        data = TensorDataset(x, labels) if labels is not None else TensorDataset(x)
        model = _model()
        bcosify.finetune(model, DataLoader(data, batch_size=16, shuffle=True), teacher=_original(), loss="align",
                         epochs=1, lr=1e-2, progress=False)
        runs.append(model.state_dict())
    assert any(not torch.equal(runs[0][k], _model().state_dict()[k]) for k in runs[0])  # (training moved them)
    for other in runs[1:]:
        for key, value in runs[0].items():
            torch.testing.assert_close(other[key], value, rtol=0, atol=0, msg=key)


def test_align_with_a_classifier_before_pooling_and_its_errors():
    model = bcosify.convert(_original(), mean=0.5, std=0.25, gap_reorder=True)  # the classifier: a 1x1 conv
    history = bcosify.finetune(model, _loader(), teacher=_original(), loss="align", epochs=1, progress=False)
    assert 0 < history.epochs[0]["loss"] < 2
    with pytest.raises(ValueError, match="teacher"):
        bcosify.finetune(_model(), _loader(), epochs=1, loss="align", progress=False)
    new_head = bcosify.convert(_original(), mean=0.5, std=0.25, num_classes=3)
    with pytest.raises(ValueError, match="align_logits > 0 needs the original's logits"):
        bcosify.finetune(new_head, _loader(), teacher=_original(), loss="align", align_logits=1.0, epochs=1,
                         progress=False)
    with pytest.raises(ValueError, match="align_logits"):
        bcosify.FinetuneConfig(align_logits=-1.0)


def test_align_loss_is_a_cosine_distance():
    from bcosify.training import compute_loss

    f = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    logits = torch.zeros(2, 3)
    assert compute_loss("align", logits, None, features=f, teacher_features=3 * f).item() == pytest.approx(0, abs=1e-7)
    orthogonal = torch.tensor([[0.0, 2.0], [-1.0, 1.0]])
    assert compute_loss("align", logits, None, features=f, teacher_features=orthogonal).item() == pytest.approx(1)
    assert compute_loss("align", logits, None, features=f, teacher_features=-f).item() == pytest.approx(2)
    with pytest.raises(ValueError, match="differ in shape"):
        compute_loss("align", logits, None, features=f, teacher_features=f[:, :1])
    logits.requires_grad_(True)  # the logits stay in the graph (DDP needs a gradient for every parameter)
    compute_loss("align", logits, None, features=f, teacher_features=orthogonal).backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_b_schedules():
    model = _model()
    model.set_b(1.0)
    fixed = bcosify.finetune(model, _loader(), epochs=2, b=2.0, progress=False)
    assert [e["b"] for e in fixed.epochs] == [2.0, 2.0]
    ramped = _model()
    steps_per_epoch = len(_loader())  # 6 updates per epoch
    history = bcosify.finetune(ramped, _loader(), epochs=2, b=2.5, b_schedule="linear", b_ramp_steps=24,
                               progress=False)
    # b is set before each update: after 12 updates the last one used 1 + 1.5 * 11/24
    assert history.epochs[0]["b"] == pytest.approx(1 + 1.5 * (steps_per_epoch - 1) / 24)
    assert history.epochs[1]["b"] == pytest.approx(1 + 1.5 * (2 * steps_per_epoch - 1) / 24)
    assert all(m.b == ramped.b for m in ramped.modules() if hasattr(m, "b") and isinstance(m.b, float))


def test_temperature_option_of_a_dau_model(tmp_path):
    """``temperature`` sets the logit temperature before training; the model keeps it, saved and reloaded; b and its
    schedule are refused for DAU layers (they have no exponent), with a clear error and before any update."""
    torch.manual_seed(0)
    model = bcosify.convert(_original(), unit="dau", rank=2, mean=0.5, std=0.25)
    x = _data(n=4).tensors[0]
    with torch.no_grad():
        before = model(x) - model.logit_bias
    history = bcosify.finetune(model, _loader(), epochs=1, lr=1e-3, temperature=8.0, progress=False)
    assert model.config.temperature == 8.0 and model.bias.temperature == 8.0
    assert history.epochs[0]["temperature"] == 8.0
    with torch.no_grad():
        model.set_temperature(1.0)
        unscaled = model(x) - model.logit_bias
        model.set_temperature(8.0)
        assert torch.allclose(model(x) - model.logit_bias, unscaled / 8, atol=1e-6)
    assert not torch.allclose(unscaled, before), "the model was trained"
    bcosify.save(model, tmp_path / "m")
    assert bcosify.load(tmp_path / "m", model=_original()).config.temperature == 8.0
    for options, message in (({"b_schedule": "linear"}, "unit='dau'"), ({"b": 2.5}, "unit='dau'"),
                             ({"temperature": 0.0}, "temperature must be a finite number > 0")):
        with pytest.raises(ValueError, match=message):
            bcosify.finetune(model, _loader(), epochs=1, progress=False, **options)
    assert model.config.temperature == 8.0


def test_history_has_the_promised_fields():
    history = bcosify.finetune(_model(), _loader(), epochs=1, progress=False, schedule="cosine", warmup_steps=2)
    record = history.epochs[0]
    assert set(record) >= {"epoch", "loss", "accuracy", "lr", "b", "seconds", "updates", "images_per_second",
                           "data_share"}
    assert 0 <= record["data_share"] < 1
    assert record["updates"] == 6 and history.last("epoch") == 1


def test_progress_counts_images(capsys):
    bcosify.finetune(_model(), _loader(), epochs=1, progress=True)
    captured = capsys.readouterr()
    assert "96/96 [" in captured.err and "img/s" in captured.err  # the bar counts images (16 per step)
    summary = captured.out.strip().splitlines()[-1]
    assert summary.startswith("epoch 1/1  loss") and " img/s  data " in summary


def test_data_share_is_the_time_spent_waiting_for_batches():
    class Slow:
        def __len__(self):
            return 3

        def __iter__(self):
            for i, batch in enumerate(_loader()):
                if i < 3:
                    time.sleep(0.5)
                    yield batch

    record = bcosify.finetune(_model(), Slow(), epochs=1, progress=False).epochs[0]
    assert record["data_share"] > 0.3  # 1.5 s of sleep next to 3 steps of a tiny model

class _Interrupt(Exception):
    pass


class _StopAfter:
    """A DataLoader that raises after ``n`` batches of the ``epoch``-th pass (simulates a killed run)."""

    def __init__(self, loader, epoch, n):
        self.loader, self.epoch, self.n, self.passes = loader, epoch, n, 0

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        self.passes += 1
        for i, batch in enumerate(self.loader):
            if self.passes == self.epoch and i == self.n:
                raise _Interrupt
            yield batch


@pytest.mark.parametrize("mixed", [False, True], ids=["plain", "mixup"])
def test_killed_and_resumed_run_matches_uninterrupted(tmp_path, mixed):
    options = dict(epochs=3, lr=5e-3, grad_accum=2, progress=False, seed=7, checkpoint_every=1)
    if mixed:  # timm's Mixup draws from numpy: its state is part of the checkpoint
        options.update(mixup_alpha=0.8, cutmix_alpha=1.0)
    full = _model()
    bcosify.finetune(full, _loader(), checkpoint_dir=str(tmp_path / "a"), **options)

    killed = _model()
    with pytest.raises(_Interrupt):
        bcosify.finetune(killed, _StopAfter(_loader(), epoch=2, n=3), checkpoint_dir=str(tmp_path / "b"), **options)
    assert latest_checkpoint(tmp_path / "b").name == "step-00000004"  # 3 updates in epoch 1, 1 in epoch 2
    resumed = _model()  # a fresh process: nothing but the checkpoint folder survives
    history = bcosify.finetune(resumed, _loader(), checkpoint_dir=str(tmp_path / "b"), resume=True, **options)
    assert [e["epoch"] for e in history.epochs] == [1, 2, 3]
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    assert not list((tmp_path / "b").glob(".*.tmp"))


def test_nan_loss_stops_with_step_and_checkpoint(tmp_path):
    model = _model()

    class Poison:
        def __len__(self):
            return 6

        def __iter__(self):
            for i, batch in enumerate(_loader()):
                if i == 3:
                    with torch.no_grad():
                        model.network[8].weight.fill_(float("nan"))
                yield batch

    with pytest.raises(TrainingDivergedError, match=r"at update 4 \(epoch 1, batch 4\).*step-00000003"):
        bcosify.finetune(model, Poison(), epochs=1, checkpoint_dir=str(tmp_path), checkpoint_every=1,
                         progress=False)


def test_bad_options():
    with pytest.raises(TypeError, match="unknown finetune options"):
        bcosify.finetune(_model(), _loader(), epochs=1, frobnicate=1)
    with pytest.raises(ValueError, match="loss must be one of"):
        bcosify.finetune(_model(), _loader(), epochs=1, loss="hinge")
    with pytest.raises(ValueError, match="teacher"):
        bcosify.finetune(_model(), _loader(), epochs=1, loss="distill")
    with pytest.raises(ValueError, match="checkpoint_dir"):
        bcosify.finetune(_model(), _loader(), epochs=1, resume=True)
    with pytest.raises(TypeError, match="BcosModel"):
        bcosify.finetune(_original(), _loader(), epochs=1)


def test_evaluate_original_and_converted():
    original, loader = _original(), _loader(seed=1, shuffle=False)
    with pytest.raises(ValueError, match="mean and std"):
        evaluate(original, loader)
    a = evaluate(original, loader, mean=(0.5,) * 3, std=(0.25,) * 3)
    b = evaluate(bcosify.convert(original, mean=0.5, std=0.25, b=1, keep_bias=True), loader)
    assert a == b and a >= 0.9  # the pretrained original knows the task


def test_train_original_shuffles_each_epoch_anew():
    """The shared loaders shard with a DistributedSampler: without ``set_epoch`` every epoch repeats one order
    (the demo's original ResNet-18 fell from 86.7% to 72.2% test accuracy)."""
    from bcosify.training import train_original
    from bcosify.training.data import build_loaders

    data = TensorDataset(torch.rand(16, 1, 4, 4), torch.arange(16) % 2)
    train, _ = build_loaders(data, data, batch_size=4)
    seen: list[torch.Tensor] = []

    class Recorder(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(16, 2)

        def forward(self, x):
            seen.append(x.detach().clone())
            return self.linear(x.flatten(1))

    train_original(Recorder(), train, mean=[0.0], std=[1.0], epochs=2, device="cpu", progress=False)
    first, second = torch.cat(seen[:4]), torch.cat(seen[4:])
    assert len(seen) == 8 and not torch.equal(first, second)
    assert torch.equal(first.sort(0).values, second.sort(0).values)  # the same images, another order


@pytest.mark.parametrize("loss", ["bce", "ce"])
def test_mixup_cutmix_and_label_smoothing_train_on_soft_targets(monkeypatch, loss):
    import bcosify.training.loop as loop

    seen = []

    def recording(kind, logits, labels, *args, **kwargs):
        seen.append(labels)
        return compute_loss(kind, logits, labels, *args, **kwargs)

    monkeypatch.setattr(loop, "compute_loss", recording)
    batches = [(x.clone(), y) for x, y in _loader(shuffle=False)]  # not a DataLoader: mixing must copy
    kept = [x.clone() for x, _ in batches]
    history = bcosify.finetune(_model(), batches, epochs=1, lr=1e-3, loss=loss, mixup_alpha=0.8, cutmix_alpha=1.0,
                               label_smoothing=0.1, progress=False)
    assert math.isfinite(history.epochs[0]["loss"]) and len(seen) == len(batches)
    targets = torch.cat(seen)
    assert targets.dtype == torch.float32 and targets.shape == (96, 2)
    torch.testing.assert_close(targets.sum(1), torch.ones(96))
    assert targets.min() >= 0.05 - 1e-6 and targets.max() <= 0.95 + 1e-6  # smoothing 0.1 over 2 classes
    mixed = ((targets > 0.05 + 1e-3) & (targets < 0.95 - 1e-3)).any(1)
    assert mixed.float().mean() > 0.1  # images mixed with one of the other class (about half the pairs)
    assert all(torch.equal(a, b) for (a, _), b in zip(batches, kept))

    seen.clear()  # label smoothing alone: every target is the smoothed one-hot row
    bcosify.finetune(_model(), _loader(shuffle=False), epochs=1, loss=loss, label_smoothing=0.2, progress=False)
    labels = torch.cat([y for _, y in _loader(shuffle=False)])
    torch.testing.assert_close(torch.cat(seen), torch.nn.functional.one_hot(labels, 2) * 0.8 + 0.1)


def test_mixup_needs_an_even_batch_and_labels():
    with pytest.raises(ValueError, match="batch per process must be even, got 15"):
        bcosify.finetune(_model(), _loader(batch_size=15), epochs=1, mixup_alpha=0.2, progress=False)
    with pytest.raises(ValueError, match="loss=.distill. uses none"):
        bcosify.finetune(_model(), _loader(), teacher=_original(), loss="distill", cutmix_alpha=1.0, epochs=1)
