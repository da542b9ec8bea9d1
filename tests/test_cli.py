"""The ``bcosify`` command line: through :func:`bcosify.cli.main` (what ``python -m bcosify`` calls), and run as
users run it, in a subprocess, where start-up, exit codes and tracebacks are what is tested."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import bcosify
from bcosify.cli import main
from bcosify.demo import efficientnet_lite0_checkpoint_path


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``python -m bcosify.cli ARGS`` in a subprocess."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, "-m", "bcosify.cli", *args], capture_output=True, text=True, env=env,
                            timeout=600)
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.fixture
def cli(capsys):
    """``bcosify ARGS`` in this process: its exit status, stdout and stderr."""
    def call(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        capsys.readouterr()
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse's usage errors
            code = e.code
        out, err = capsys.readouterr()
        if check:
            assert code == 0, err
        return subprocess.CompletedProcess(args, code, out, err)
    return call


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "r18"
    result = run("convert", "timm:resnet18", "--weights", "none", "--num-classes", "3", "--b", "1.5",
                 "--model-kwargs", '{"drop_rate": 0.1}', "--padding-mode", "constant", "--padding-value", "0",
                 "--center-grid", "--out", str(out))
    assert "saved to" in result.stdout
    return out


def test_convert_then_info(converted, cli):
    config = json.loads((converted / "config.json").read_text())
    assert config["config"]["b"] == 1.5 and config["config"]["num_classes"] == 3
    assert config["config"]["model_kwargs"] == {"drop_rate": 0.1}
    assert (config["config"]["padding_mode"], config["config"]["padding_value"]) == ("constant", [0.0, 0.0, 0.0])
    assert config["config"]["center_grid"]
    info = cli("info", str(converted)).stdout
    assert "timm:resnet18" in info and "BcosConv2d" in info and "first layer" in info
    as_json = json.loads(cli("info", str(converted), "--json").stdout)
    assert as_json["config"] == config["config"]
    loaded = bcosify.load(converted)
    assert loaded.num_classes == 3 and loaded.constants == ["conv1.padding_value"]
    assert loaded.network.layer4[0].conv1.grid_shift == 1


def test_convert_to_dau_layers(tmp_path, cli):
    out = tmp_path / "r18-dau"
    cli("convert", "timm:resnet18", "--weights", "none", "--num-classes", "3", "--unit", "dau", "--rank", "2",
        "--squash", "l2", "--temperature", "10", "--out", str(out))
    config = json.loads((out / "config.json").read_text())["config"]
    assert (config["unit"], config["rank"], config["squash"], config["temperature"]) == ("dau", 2, "l2", 10.0)
    bmodel = bcosify.load(out)
    assert type(bmodel.network.fc).__name__ == "DauLinear" and bmodel.network.fc.rank == 2


def test_convert_real_checkpoint_with_positional_key_map(tmp_path, cli):
    out = tmp_path / "lite0"
    cli("convert", "timm:efficientnet_lite0", "--weights", str(efficientnet_lite0_checkpoint_path()),
        "--key-map", "positional", "--b", "1", "--keep-bias", "--out", str(out))
    loaded = bcosify.load(out)
    assert loaded.config.keep_bias and loaded.b == 1.0


def test_export_onnx_from_cli(converted, tmp_path, cli):
    path = tmp_path / "model.onnx"
    assert "wrote" in cli("export", str(converted), "--onnx", str(path), "--size", "32").stdout
    assert path.stat().st_size > 1000


@pytest.mark.parametrize("args, message", [
    (("info", "/no/such/folder"), "no saved model folder"),
    (("convert", "timm:no_such_net", "--weights", "none", "--out", "/tmp/x"), "unknown timm model"),
    (("convert", "resnet18", "--weights", "none", "--out", "/tmp/x"), "unknown model spec"),
    (("convert", "timm:resnet18", "--weights", "/no/such.pth", "--out", "/tmp/x"), "checkpoint file not found"),
    (("convert", "timm:resnet18", "--weights", "none", "--b", "0.5", "--out", "/tmp/x"), "b must be"),
    (("export", "/no/such/folder", "--onnx", "/tmp/x.onnx"), "no saved model folder"),
    (("convert", "timm:resnet18", "--weights", "none", "--rank", "4", "--out", "/tmp/x"),
     "rank applies to unit='dau' only"),
    (("convert", "timm:resnet18", "--weights", "none", "--unit", "dau", "--rank", "0", "--out", "/tmp/x"),
     "rank must be an integer >= 1"),
])
def test_bad_input_gives_one_line_error_and_nonzero_exit(args, message, cli):
    result = cli(*args, check=False)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_errors_in_a_subprocess_one_line_or_a_traceback_with_debug():
    result = run("info", "/no/such/folder", check=False)
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [
        "bcosify info: error: no saved model folder at '/no/such/folder'"], result.stderr
    result = run("--debug", "info", "/no/such/folder", check=False)
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_usage_error_exit_code(cli):
    result = cli("convert", check=False)
    assert result.returncode == 2 and "required" in result.stderr


def _plain_image_folder(root, n: int = 6):
    """Image files straight in ``root`` (no class sub-folders), and one in a nested folder."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "nested").mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / f"{i}.png")
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / "nested" / "x.jpg")
    (root / "notes.txt").write_text("not an image")
    return root


def test_convert_calibrates_on_a_plain_image_folder(tmp_path, cli):
    import torch

    from bcosify.data import unlabelled_images

    data = _plain_image_folder(tmp_path / "images")
    common = ("convert", "timm:resnet18", "--weights", "none", "--num-classes", "3")
    result = cli(*common, "--calibrate-data", str(data), "--size", "32", "--out", str(tmp_path / "calibrated"))
    assert f"calibrated on 7 images from {data}" in result.stdout
    cli(*common, "--out", str(tmp_path / "plain"))
    x = unlabelled_images(data, 32)
    with torch.no_grad():
        calibrated = bcosify.load(tmp_path / "calibrated").eval()
        plain = bcosify.load(tmp_path / "plain").eval()
        # a new classifier has no counterpart in the original: unit RMS over the logits
        assert 0.5 < calibrated.network(calibrated.encode(x)).pow(2).mean().sqrt() < 2
        assert plain.network(plain.encode(x)).abs().max() < 1e-4  # (uncalibrated: the scale shrinks)
    limited = cli(*common, "--calibrate-data", str(data), "--calibrate-images", "2", "--size", "32", "--out",
                  str(tmp_path / "two"))
    assert "calibrated on 2 images" in limited.stdout


@pytest.mark.parametrize("extra, message", [
    (("--calibrate-data", "/no/such/folder"), "image folder '/no/such/folder' not found"),
    (("--calibrate-data", "EMPTY"), "no image files"),
    (("--calibrate-data", "EMPTY", "--calibrate-images", "0"), "--calibrate-images must be a positive integer"),
])
def test_convert_calibration_data_errors(tmp_path, extra, message, cli):
    (tmp_path / "empty" / "class").mkdir(parents=True)
    extra = tuple(str(tmp_path / "empty") if e == "EMPTY" else e for e in extra)
    result = cli("convert", "timm:resnet18", "--weights", "none", *extra, "--out", str(tmp_path / "m"), check=False)
    assert result.returncode == 1 and message in result.stderr, result.stderr
    assert not (tmp_path / "m").exists()
