"""Hub weights without a network: a quick, clear error when nothing is cached, and the cache used when it is."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import timm
import torch
from huggingface_hub import constants

import bcosify
from bcosify.cli import main
from bcosify.weights import HubUnavailableError, build_model

TIMM_RESNET18_HUB_ID = "timm/resnet18.a1_in1k"


def _closed_port() -> int:
    """A local TCP port nobody listens on."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        return free.getsockname()[1]


def _populate_cache(cache, repo_id: str, model: torch.nn.Module) -> None:
    """Put ``model`` (timm's ``config.json`` + ``model.safetensors``) into a Hugging Face cache as ``repo_id``."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    timm.models.save_for_hf(model, str(repo / "snapshots" / commit), safe_serialization=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """Empty caches; the Hugging Face endpoint is a closed local port and every other host refuses connections."""
    real_connect = socket.create_connection
    probed = []

    def connect(address, *args, **kwargs):
        probed.append(address[0])
        if address[0] != "127.0.0.1":
            raise ConnectionRefusedError(f"no network in this test ({address[0]})")
        return real_connect(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", connect)
    endpoint = f"https://127.0.0.1:{_closed_port()}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "torch"))
    return probed


def _fails_quickly(spec: str) -> str:
    """The message of the HubUnavailableError that ``build_model(spec)`` raises, checked to come within 10 s."""
    start = time.perf_counter()
    with pytest.raises(HubUnavailableError) as caught:
        build_model(spec)
    assert time.perf_counter() - start < 10
    message = str(caught.value)
    assert "\n" not in message and spec in message
    assert "weights=" in message and "--weights none" in message
    return message


def test_timm_hub_weights_without_network(no_network):
    message = _fails_quickly("timm:resnet18")
    assert "127.0.0.1" in message and "not reachable" in message
    assert no_network == ["127.0.0.1"]  # probed the endpoint once
    assert constants.HF_HUB_OFFLINE is False  # the offline mode of the cache lookup is undone


def test_torchvision_hub_weights_without_network(no_network):
    message = _fails_quickly("torchvision:resnet18")
    assert "download.pytorch.org" in message
    assert no_network == ["download.pytorch.org"]


def test_hf_hub_offline_mode_fails_without_probing(no_network, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert "HF_HUB_OFFLINE" in _fails_quickly("timm:resnet18")
    assert "HF_HUB_OFFLINE" in _fails_quickly("hf-hub:nobody/nothing")
    assert no_network == []


def test_cli_convert_without_network(no_network, capsys, tmp_path):
    assert main(["convert", "timm:resnet18", "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("bcosify convert: error: cannot download the pretrained weights of 'timm:resnet18'")
    assert "--weights none" in err[0]
    assert not (tmp_path / "out").exists()


def test_unknown_spec_source_names_hf_hub():
    with pytest.raises(ValueError, match="hf-hub:ORG/NAME"):
        build_model("keras:resnet18")


def test_cached_timm_weights_load_offline(no_network, tmp_path):
    assert timm.models.get_pretrained_cfg("resnet18").hf_hub_id == TIMM_RESNET18_HUB_ID
    torch.manual_seed(0)
    cached = timm.create_model("resnet18")
    _populate_cache(tmp_path / "hf", TIMM_RESNET18_HUB_ID, cached)
    start = time.perf_counter()
    model = build_model("timm:resnet18", model_kwargs={})
    assert time.perf_counter() - start < 5
    assert torch.equal(model.conv1.weight, cached.conv1.weight) and torch.equal(model.fc.bias, cached.fc.bias)
    assert no_network == []  # loaded from the cache, nothing probed
    assert constants.HF_HUB_OFFLINE is False


HF_HUB_SCRIPT = """
    import pathlib, sys, time
    import timm, torch
    import bcosify
    from bcosify.weights import HubUnavailableError, build_model
    sys.path.insert(0, {tests!r})
    from test_hub import _populate_cache

    torch.manual_seed(0)
    cached = timm.create_model("resnet18", num_classes=10)
    _populate_cache(pathlib.Path({cache!r}), "someorg/tiny-resnet", cached)

    model = build_model("hf-hub:someorg/tiny-resnet")
    assert torch.equal(model.conv1.weight, cached.conv1.weight) and torch.equal(model.fc.weight, cached.fc.weight)
    assert model.fc.out_features == 10
    assert build_model("hf-hub:someorg/tiny-resnet", weights=None).fc.out_features == 10  # config from the cache
    bmodel = bcosify.convert("hf-hub:someorg/tiny-resnet")
    assert bmodel.config.spec == "hf-hub:someorg/tiny-resnet", bmodel.config.spec

    start = time.perf_counter()
    try:
        build_model("hf-hub:someorg/not-cached")
    except HubUnavailableError as error:
        assert "HF_HUB_OFFLINE" in str(error) and time.perf_counter() - start < 5, (error, time.perf_counter() - start)
    else:
        raise AssertionError("an uncached hf-hub spec loaded offline")
    print("ok")
"""


def test_hf_hub_spec_from_the_cache_offline(tmp_path):
    tests = os.path.dirname(os.path.abspath(__file__))
    script = textwrap.dedent(HF_HUB_SCRIPT).format(tests=tests, cache=str(tmp_path / "hf"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(bcosify.__file__)))
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")
