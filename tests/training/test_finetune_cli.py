"""``bcosify finetune``: one process and two (torchrun, gloo on CPU), ImageFolder and Fashion-MNIST data, and its
one-line errors."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from torch import nn

import bcosify
from bcosify.cli import main
from bcosify.nn import SyncUncenteredBatchNorm2d, sync_batchnorm
from bcosify.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD
from bcosify.training import load_recipe
from bcosify.training.data import DataConfig, build_datasets, build_loaders, default_workers

HERE = pathlib.Path(__file__).resolve().parent
# A one-block ViT: LayerNorm normalises each image on its own, so 2 processes x 16 images compute exactly what
# 1 process x 32 images computes. A BatchNorm model would not: each process normalises its own 16 images with
# their own batch statistics (the default, as in the papers), which changes the function, not only the rounding.
TINY_VIT = ["--model", "timm:vit_tiny_patch16_224", "--weights", "none", "--model-kwargs",
            '{"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 16, "num_heads": 2}']
FASHION = ["fashion-mnist", *TINY_VIT, "--limit", "128", "--epochs", "2", "--lr", "1e-2", "--no-progress"]


DDP = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(HERE / "rank_folder_entry.py")]


def _run(args, cwd, timeout=300, fails=False, **env):
    """Run ``python ARGS`` in ``cwd`` (``env``: extra variables, e.g. rank_folder_entry.py's faults)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **env,
           "PYTHONPATH": os.pathsep.join([str(HERE.parent.parent), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd,
                            timeout=timeout)
    assert (result.returncode != 0) == fails, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> pathlib.Path:
    """The reference: one process, 2 epochs of 4 updates of 32 images (its output folder)."""
    cwd = tmp_path_factory.mktemp("single")
    _run(["-m", "bcosify", "finetune", *FASHION, "--batch-size", "32", "--out", "run"], cwd)
    return cwd / "run"


def _metrics(out: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(out: pathlib.Path, checkpoint: str | None = None) -> dict[str, torch.Tensor]:
    if checkpoint is None:
        return load_file(str(out / "model" / "model.safetensors"))
    state = load_file(str(out / "checkpoints" / checkpoint / "state.safetensors"))
    return {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}


def _same_run(out: pathlib.Path, reference: pathlib.Path) -> None:
    """``out`` ends with the weights (to float rounding) and the per-epoch metrics of ``reference``."""
    one, two = _weights(reference), _weights(out)
    moved = max((one[k] - _weights(reference, "step-00000004")[k]).abs().max() for k in one)
    assert moved > 1e-3  # the second epoch changed the weights: the comparison below can fail
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6, msg=key)
    lines = _metrics(out)
    assert [r["epoch"] for r in lines] == [1, 2]
    for a, b in zip(lines, _metrics(reference)):  # accuracies and losses summed over both processes' shares
        assert a["val_accuracy"] == b["val_accuracy"] and a["accuracy"] == b["accuracy"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_two_processes_equal_one_with_the_same_global_batch(tmp_path, single):
    # one process: updates of 32 images; two processes: each accumulates 2 micro-batches of 8 per update (DDP
    # averages the gradients of the last one only), the same 32 images of the shuffled data set
    ddp = _run([*DDP, str(tmp_path / "ddp"), "finetune", *FASHION, "--batch-size", "8", "--grad-accum", "2",
                "--out", "run"], tmp_path)
    _same_run(tmp_path / "ddp" / "rank0" / "run", single)
    # rank 0 alone writes (checkpoints, metrics, model) and reports
    assert not (tmp_path / "ddp" / "rank1" / "run").exists()
    assert sorted(p.name for p in (tmp_path / "ddp" / "rank0" / "run").iterdir()) == ["checkpoints", "metrics.jsonl",
                                                                                       "model"]
    assert ddp.stdout.count("fine-tuned timm:vit_tiny_patch16_224 for 2 epochs") == 1
    assert bcosify.load(tmp_path / "ddp" / "rank0" / "run" / "model").class_names[0] == "T-shirt/top"


def test_resume_after_both_processes_are_killed_with_any_world_size(tmp_path, single, capsys):
    args = ["finetune", *FASHION, "--checkpoint-every", "1", "--out", "run"]
    # rank 0 dies (SIGKILL) after its 6th checkpoint (update 6 of 8, mid epoch 2); torchrun stops rank 1
    killed = _run([*DDP, str(tmp_path / "ddp"), *args, "--batch-size", "16"], tmp_path, fails=True,
                  KILL_AFTER_CHECKPOINTS="6")
    run = tmp_path / "ddp" / "rank0" / "run"
    assert (run / "checkpoints" / "latest").exists(), killed.stdout + killed.stderr  # (it failed before the kill)
    assert (run / "checkpoints" / "latest").read_text() == "step-00000006" and not (run / "model").exists()
    assert len(_metrics(run)) == 1
    shutil.copytree(run, tmp_path / "alone" / "run")
    # the same 2 processes resume; so does 1 process with the same global batch of 32 (16 x 2 accumulated)
    _run([*DDP, str(tmp_path / "ddp"), *args, "--batch-size", "16", "--resume"], tmp_path)
    _run(["-m", "bcosify", *args, "--batch-size", "16", "--grad-accum", "2", "--resume"], tmp_path / "alone")
    _same_run(run, single)
    _same_run(tmp_path / "alone" / "run", single)
    # another global batch, or another model, is refused in one line
    message = _error(capsys, *FASHION, "--batch-size", "8", "--resume", "--out", str(run))
    assert "global batch of 32, this run has 8" in message
    other = ["--model", "timm:test_resnet", "--weights", "none"]
    message = _error(capsys, "fashion-mnist", *other, "--limit", "128", "--resume", "--no-progress", "--out", str(run))
    assert "another model" in message


def test_resume_continues_every_process_s_own_random_streams(tmp_path):
    # stochastic depth and dropout draw from each process's generator: 2 processes resumed after a kill end where
    # the uninterrupted 2 processes end only if each one gets its own generator states back
    noisy = ["--model-kwargs", '{"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 16, "num_heads": 2, '
                               '"drop_path_rate": 0.5, "proj_drop_rate": 0.2}']
    args = ["finetune", *FASHION, *noisy, "--batch-size", "16", "--checkpoint-every", "1", "--out", "run"]
    _run([*DDP, str(tmp_path / "whole"), *args], tmp_path)
    _run([*DDP, str(tmp_path / "killed"), *args], tmp_path, fails=True, KILL_AFTER_CHECKPOINTS="6")
    state = load_file(str(tmp_path / "killed" / "rank0" / "run" / "checkpoints" / "step-00000006" / "state.safetensors"))
    assert not torch.equal(state["rng.0.torch"], state["rng.1.torch"])  # seeded per process
    _run([*DDP, str(tmp_path / "killed"), *args, "--resume"], tmp_path)
    whole, resumed = _weights(tmp_path / "whole" / "rank0" / "run"), _weights(tmp_path / "killed" / "rank0" / "run")
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key], rtol=1e-5, atol=1e-6, msg=key)


def test_a_nan_loss_in_one_process_stops_all_with_one_line_each(tmp_path):
    # rank 1's second loss is NaN; rank 0's is finite: without a shared check rank 0 would wait in
    # DDP's gradient all-reduce until torchrun kills it, and say nothing
    result = _run([*DDP, str(tmp_path), "finetune", *FASHION, "--batch-size", "16", "--out", "run"], tmp_path,
                  timeout=180, fails=True, POISON="1:2")
    message = ("bcosify finetune: error: loss became nan on rank 1 at update 2 (epoch 1, batch 2); last good "
               "checkpoint: none yet\n")
    # each process says it once (the two processes share stderr: counted, not split into lines)
    assert result.stderr.count(message) == 2 and result.stderr.count("bcosify finetune: error: ") == 2, result.stderr
    assert not (tmp_path / "rank0" / "run" / "model").exists()


def test_sync_bn_two_processes_equal_one_with_a_batchnorm_model(tmp_path):
    # per-process statistics would differ (16 images each instead of 32: tests/training/test_sync_bn.py); with
    # --sync-bn both processes normalise with the statistics of the global batch of 32
    # the fashion-mnist recipe with zero padding: its black padding makes one BatchNorm's variance small enough
    # that the summation order alone moves its weight by 2e-4 (measured), too close to what is tested here
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**vars(load_recipe("fashion-mnist")), "convert": {
        "mean": list(FASHION_MNIST_MEAN), "std": list(FASHION_MNIST_STD)}}))
    args = [str(recipe), "--model", "timm:test_resnet", "--weights", "none", "--limit", "64", "--epochs", "2",
            "--lr", "1e-2", "--no-progress"]
    _run(["-m", "bcosify", "finetune", *args, "--batch-size", "32", "--out", "single"], tmp_path)
    _run(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(HERE / "rank_folder_entry.py"),
          str(tmp_path / "ddp"), "finetune", *args, "--batch-size", "16", "--sync-bn", "--out", "run"], tmp_path)
    one, two = _weights(tmp_path / "single"), _weights(tmp_path / "ddp" / "rank0" / "run")
    assert sum(k.endswith("running_var") for k in one) == 15
    before = _weights(tmp_path / "single", "step-00000002")  # after epoch 1
    assert max((one[k] - before[k]).abs().max() for k in one if k.endswith("weight")) > 2e-3
    # the statistics are summed in another order (and as sum x^2 - n mean^2): Adam turns rounding-sized gradient
    # differences into weight differences of a few 1e-5 (1% of one update), per-process statistics into ~1e-3
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-4, msg=key)
    model = bcosify.load(tmp_path / "ddp" / "rank0" / "run" / "model")
    assert not any(isinstance(m, SyncUncenteredBatchNorm2d) for m in model.modules())


def _image_folder(root: pathlib.Path, classes: dict[str, list[str]], n: int = 8) -> pathlib.Path:
    g = torch.Generator().manual_seed(0)
    for split, names in classes.items():
        for name in names:
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = (torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def test_image_folder_run_from_a_spec(tmp_path):
    data = _image_folder(tmp_path / "data", {"train": ["cat", "dog"], "val": ["cat", "dog"]})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: tiny\nmodel: timm:resnet10t\ndata: {dataset: image-folder, size: 32, batch_size: 8, "
                      "auto_augment: rand-m9-mstd0.5}\nconvert: {b: 2.0}\nfinetune: {epochs: 1, lr: 1.0e-3}\n")
    result = _run(["-m", "bcosify", "finetune", str(recipe), "--data", str(data), "--weights", "none",
                   "--out", "out", "--no-progress"], tmp_path)
    assert "validation accuracy" in result.stdout
    record = json.loads((tmp_path / "out" / "metrics.jsonl").read_text())
    assert record["epoch"] == 1 and record["updates"] == 2 and 0 <= record["val_accuracy"] <= 1
    model = bcosify.load(tmp_path / "out" / "model")
    assert model.class_names == ("cat", "dog") and model.num_classes == 2


def test_training_transform_keeps_images_in_unit_range(tmp_path):
    data = _image_folder(tmp_path, {"train": ["a", "b"], "val": ["a", "b"]}, n=2)
    for channels in (1, 3):
        config = DataConfig(root=str(data / "train"), val_root=str(data / "val"), size=24, channels=channels,
                            auto_augment="rand-m9-mstd0.5")
        train, val, classes = build_datasets(config)
        assert classes == ("a", "b")
        for x, _ in (train[0], train[3], val[0]):
            assert x.shape == (channels, 24, 24) and x.min() >= 0 and x.max() <= 1 and x.max() > 0.5


class _Draws(torch.utils.data.Dataset):
    """Images that are random draws of the loader worker's generator (what a random augmentation sees)."""

    def __len__(self):
        return 8

    def __getitem__(self, index):
        return torch.rand(1, 2, 2), 0


def test_each_process_augments_differently_and_reproducibly():
    def first_batch(rank):
        torch.manual_seed(0)  # as finetune seeds every process alike
        train, _ = build_loaders(_Draws(), _Draws(), 4, workers=1, seed=3, rank=rank, world_size=2)
        return next(iter(train))[0]

    zero = first_batch(0)
    assert torch.equal(zero, first_batch(0))  # reproducible
    assert not torch.equal(zero, first_batch(1))  # the two processes' workers draw differently


def test_loader_workers_default_to_the_cores_of_each_gpu_process(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert default_workers(cuda=False) == 0  # on CPU the training itself uses the cores
    for processes, workers in (("1", 8), ("4", 3), ("8", 1), ("32", 1)):
        monkeypatch.setenv("LOCAL_WORLD_SIZE", processes)
        assert default_workers(cuda=True) == workers


def test_sync_batchnorm_conversion_leaves_a_converted_model_alone():
    original = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(4, 2))
    bmodel = bcosify.convert(original, mean=0.5, std=0.25)
    before = {name: type(m) for name, m in bmodel.named_modules()}
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(bmodel)
    assert {name: type(m) for name, m in synced.named_modules()} == before
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in synced.modules())
    # nor with kept biases, nor while --sync-bn has switched the layers to the synchronised uncentred one
    kept = bcosify.convert(original, mean=0.5, std=0.25, keep_bias=True)
    with sync_batchnorm(kept):
        types = {name: type(m) for name, m in kept.named_modules()}
        assert SyncUncenteredBatchNorm2d in types.values()
        assert {name: type(m) for name, m in nn.SyncBatchNorm.convert_sync_batchnorm(kept).named_modules()} == types
    # the check can fail: the same call does put a (centred, biased) SyncBatchNorm into the original (in place),
    # and converting that is refused
    assert isinstance(nn.SyncBatchNorm.convert_sync_batchnorm(original)[1], nn.SyncBatchNorm)
    with pytest.raises(bcosify.ConversionError, match="SyncBatchNorm"):
        bcosify.convert(original, mean=0.5, std=0.25)
    # a BatchNorm1d becomes uncentred too, and convert_sync_batchnorm leaves it alone as well
    head_bn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.BatchNorm1d(4), nn.Linear(4, 2))
    converted = bcosify.convert(head_bn, mean=0.5, std=0.25)
    types = {name: type(m) for name, m in converted.named_modules()}
    assert {name: type(m) for name, m in nn.SyncBatchNorm.convert_sync_batchnorm(converted).named_modules()} == types
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in converted.modules())


def _error(capsys, *args) -> str:
    assert main(["finetune", *args]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bcosify finetune: error: "), err
    return err[0]


def test_bad_inputs_are_one_line_errors(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "out")
    empty = tmp_path / "empty"
    (empty / "train" / "cat").mkdir(parents=True)
    (empty / "val" / "cat").mkdir(parents=True)
    assert "Found no valid file" in _error(capsys, "resnet-imagenet", "--data", str(empty), "--out", out)
    differ = _image_folder(tmp_path / "differ", {"train": ["cat", "dog"], "val": ["cat", "cow"]}, n=1)
    message = _error(capsys, "resnet-imagenet", "--data", str(differ), "--out", out)
    assert "differ: only in train ['dog'], only in val ['cow']" in message
    assert "must hold train/ and val/" in _error(capsys, "resnet-imagenet", "--data", str(tmp_path), "--out", out)
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("name: bad\nmodel: timm:resnet18\ndata: {dataset: image-folder, batch: 8}\n")
    assert "unknown data options ['batch']" in _error(capsys, str(recipe), "--out", out)
    monkeypatch.setenv("WORLD_SIZE", "3")  # as torchrun --nproc-per-node=3 sets it; fails before joining a group
    assert "global batch 128 is not divisible by the world size 3" in _error(capsys, "fashion-mnist", "--out", out)
    assert not (tmp_path / "out").exists()


def _logit_rms(model_dir: pathlib.Path, x: torch.Tensor) -> float:
    model = bcosify.load(model_dir).eval()
    with torch.no_grad():
        return model.network(model.encode(x)).pow(2).mean().sqrt().item()


def test_calibrate_data_calibrates_before_fine_tuning(tmp_path, one_thread):
    from bcosify.data import unlabelled_images

    data = _image_folder(tmp_path / "data", {"train": ["cat", "dog"], "val": ["cat", "dog"]}, n=4)
    plain = tmp_path / "plain"  # a plain folder of images, no class sub-folders
    plain.mkdir()
    for i, path in enumerate(sorted((data / "train").rglob("*.png"))):
        (plain / f"{i}.png").write_bytes(path.read_bytes())
    recipe = tmp_path / "recipe.yaml"  # lr so small that fine-tuning leaves the scale as it finds it
    recipe.write_text("name: tiny\nmodel: timm:resnet10t\ndata: {dataset: image-folder, size: 32, batch_size: 8, "
                      "augment: false}\nconvert: {b: 2.0}\nfinetune: {epochs: 1, lr: 1.0e-12, agc_clip: null}\n")
    common = ["finetune", str(recipe), "--data", str(data), "--weights", "none", "--no-progress"]
    assert main([*common, "--calibrate-data", str(plain), "--out", str(tmp_path / "calibrated")]) == 0
    assert main([*common, "--out", str(tmp_path / "uncalibrated")]) == 0
    x = unlabelled_images(data / "val", 32)
    assert 0.1 < _logit_rms(tmp_path / "calibrated" / "model", x) < 10
    assert _logit_rms(tmp_path / "uncalibrated" / "model", x) < 1e-3
    # a recipe's calibrate section: its first training images, without --calibrate-data
    recipe.write_text(recipe.read_text() + "calibrate: {images: 8}\n")
    assert main([*common, "--out", str(tmp_path / "recipe")]) == 0
    assert 0.1 < _logit_rms(tmp_path / "recipe" / "model", x) < 10


def test_calibrate_data_needs_the_original(tmp_path, capsys):
    data = _image_folder(tmp_path / "data", {"train": ["cat", "dog"], "val": ["cat", "dog"]}, n=1)
    saved = tmp_path / "saved"
    bcosify.save(bcosify.convert("timm:resnet10t", weights=None, num_classes=2), saved)
    message = _error(capsys, "resnet-imagenet", "--model", str(saved), "--data", str(data), "--calibrate-data",
                     str(data), "--out", str(tmp_path / "out"))
    assert "--calibrate-data matches the converted model to the original" in message
    message = _error(capsys, "resnet-imagenet", "--model", "timm:resnet10t", "--weights", "none", "--data", str(data),
                     "--calibrate-data", str(tmp_path / "missing"), "--out", str(tmp_path / "out"))
    assert "not found" in message


def test_align_under_ddp(tmp_path):
    """loss='align' leaves the classifier out of the loss: DDP must still get a gradient for it (zeros)."""
    recipe = tmp_path / "align.yaml"
    recipe.write_text("name: align\nmodel: timm:resnet18\nmodel_kwargs: {in_chans: 1, num_classes: 10}\n"
                      "data: {dataset: fashion-mnist, size: 32, channels: 1, batch_size: 16}\n"
                      "convert: {b: 2.0, mean: [0.2860], std: [0.3530]}\nfinetune: {epochs: 1, loss: align}\n")
    result = _run(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                   str(HERE / "rank_folder_entry.py"), str(tmp_path / "ddp"), "finetune", str(recipe), *TINY_VIT,
                   "--limit", "64", "--batch-size", "8", "--no-progress", "--out", "run"], tmp_path)
    assert result.stdout.count("fine-tuned timm:vit_tiny_patch16_224 for 1 epochs") == 1
    record = json.loads((tmp_path / "ddp" / "rank0" / "run" / "metrics.jsonl").read_text())
    assert 0 < record["loss"] < 2 and record["updates"] == 4


def test_finetune_a_dau_model_from_a_spec(tmp_path, one_thread, capsys):
    """``--unit dau --rank R``: the spec is converted to DAU layers (the recipe's B-cos options left out, said on
    stderr), fine-tuned (the dynamic part moves) and saved with its unit; the saved model explains its logits
    exactly."""
    data = _image_folder(tmp_path / "data", {"train": ["cat", "dog"], "val": ["cat", "dog"]}, n=4)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: tiny\nmodel: timm:resnet10t\ndata: {dataset: image-folder, size: 32, batch_size: 8, "
                      "augment: false}\nconvert: {b: 2.0, padding_mode: constant, center_grid: auto}\n"
                      "finetune: {epochs: 1, lr: 1.0e-3, agc_clip: null}\n")
    assert main(["finetune", str(recipe), "--data", str(data), "--weights", "none", "--no-progress", "--unit", "dau",
                 "--rank", "2", "--temperature", "4", "--out", str(tmp_path / "run")]) == 0
    assert "--unit dau: not using the recipe's bcos options b, padding_mode, center_grid" in capsys.readouterr().err
    bmodel = bcosify.load(tmp_path / "run" / "model")
    assert bmodel.config.unit == "dau" and bmodel.config.rank == 2 and bmodel.config.temperature == 4.0
    dynamic = [p for name, p in bmodel.named_parameters() if name.endswith(".weight_b")]
    assert dynamic and any(bool(p.any()) for p in dynamic), "the dynamic part was not trained"
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    e = bcosify.explain(bmodel.double(), x)
    assert e.completeness_error.max() < 1e-6


def _plain_folder(root: pathlib.Path, n: int = 16) -> pathlib.Path:
    """``n`` small PNGs directly in ``root``: no class sub-folders."""
    root.mkdir(parents=True)
    g = torch.Generator().manual_seed(1)
    for i in range(n):
        Image.fromarray((torch.rand(36, 40, 3, generator=g) * 255).to(torch.uint8).numpy()).save(root / f"{i}.png")
    return root


def test_plain_image_folders_train_label_free_and_refuse_labelled_losses(tmp_path, capsys, one_thread):
    plain = _plain_folder(tmp_path / "plain")
    tree = tmp_path / "tree"  # train/: plain images; val/: class folders, to measure accuracy
    shutil.copytree(plain, tree / "train")
    _image_folder(tree, {"val": ["a", "b", "c"]}, n=2)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: tiny\nmodel: timm:resnet10t\ndata: {dataset: image-folder, size: 32, batch_size: 8}\n"
                      "convert: {b: 2.0}\nfinetune: {epochs: 1, lr: 1.0e-3, loss: align}\n")
    vit = [*TINY_VIT[:-1], TINY_VIT[-1][:-1] + ', "num_classes": 3}']
    common = ["finetune", str(recipe), *vit, "--no-progress"]
    assert main([*common, "--data", str(plain), "--out", str(tmp_path / "align")]) == 0
    record = json.loads((tmp_path / "align" / "metrics.jsonl").read_text())
    assert record["updates"] == 2 and "val_accuracy" not in record and 0 <= record["loss"] < 2
    assert bcosify.load(tmp_path / "align" / "model").num_classes == 3
    assert main([*common, "--data", str(tree), "--loss", "distill", "--out", str(tmp_path / "distill")]) == 0
    record = json.loads((tmp_path / "distill" / "metrics.jsonl").read_text())
    assert record["updates"] == 2 and 0 <= record["val_accuracy"] <= 1
    assert bcosify.load(tmp_path / "distill" / "model").class_names == ("a", "b", "c")
    capsys.readouterr()
    for loss in ("bce", "ce"):  # labelled losses are refused before any model is built
        message = _error(capsys, *common[1:], "--data", str(plain), "--loss", loss, "--out", str(tmp_path / "x"))
        assert f"loss {loss!r} needs labels" in message and "plain folder of images" in message
    shutil.copytree(plain, tree / "plain-val")
    config = DataConfig(root=str(plain), val_root=str(tree / "plain-val"), size=32)
    with pytest.raises(bcosify.data.DataError, match="has no class sub-folders"):
        build_datasets(config)
    train, val, classes = build_datasets(config.replace(val_root=None))
    assert len(train) == 16 and val is None and classes is None and train[0].shape == (3, 32, 32)
    assert not (tmp_path / "x").exists()
