"""Pretrained backbone weights: read from the local cache without a request, or a fast, clear failure offline."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest
import torch

import dalg.models.pretrained as pretrained
from dalg.models.backbones import ResNetBackbone
from dalg.models.pretrained import PretrainedWeightsUnavailable, locate_pretrained


@pytest.fixture
def empty_caches(tmp_path, monkeypatch) -> Path:
    """Empty Hugging Face and torch hub caches, the network allowed (tests that need it offline say so)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    torch_hub = tmp_path / "torch_hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(torch_hub))
    return cache


def _fill_hub_cache(cache: Path, repo: str, filename: str, state_dict: dict) -> Path:
    """A Hugging Face cache entry as hf_hub_download leaves it: refs/main -> snapshots/<commit>/<file>."""
    from safetensors.torch import save_file

    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(snapshot / filename))
    return snapshot / filename


def test_offline_without_cache_fails_fast_naming_both_fixes(empty_caches, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    with pytest.raises(PretrainedWeightsUnavailable) as err:
        locate_pretrained("vit_small_patch16_224")
    assert time.monotonic() - started < 2.0
    msg = str(err.value)
    assert "model.backbone.checkpoint=" in msg and "model.backbone.pretrained=false" in msg
    assert "timm/vit_small_patch16_224.augreg_in21k_ft_in1k" in msg and "HF_HUB_OFFLINE" in msg


def test_silent_hub_fails_within_the_metadata_timeout(empty_caches, monkeypatch) -> None:
    """A firewall that drops packets: the request gives up after HF_HUB_ETAG_TIMEOUT, it does not hang."""
    from huggingface_hub import constants

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)  # accepts connections (backlog) and never answers
    port = server.getsockname()[1]
    monkeypatch.setattr(
        constants,
        "HUGGINGFACE_CO_URL_TEMPLATE",
        f"http://127.0.0.1:{port}/{{repo_id}}/resolve/{{revision}}/{{filename}}",
    )
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 1)
    started = time.monotonic()
    try:
        with pytest.raises(
            PretrainedWeightsUnavailable, match=r"cannot be downloaded \(.*(?i:timeout|timed out)"
        ):
            locate_pretrained("resnet50.tv_in1k")
    finally:
        server.close()
    assert time.monotonic() - started < 8.0


def test_a_hub_that_answers_counts_as_reachable(empty_caches, monkeypatch) -> None:
    """An HTTP answer (here 404) means timm can ask for the file itself: no overlay, no error."""
    from huggingface_hub import constants

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]

    def answer_404() -> None:
        try:
            conn, _ = server.accept()
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            conn.close()
        except OSError:
            pass

    thread = threading.Thread(target=answer_404, daemon=True)
    thread.start()
    monkeypatch.setattr(
        constants,
        "HUGGINGFACE_CO_URL_TEMPLATE",
        f"http://127.0.0.1:{port}/{{repo_id}}/resolve/{{revision}}/{{filename}}",
    )
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 5)
    try:
        assert locate_pretrained("resnet50.tv_in1k") == {}
    finally:
        server.close()
        thread.join(timeout=5)


def test_cached_weights_load_from_their_file_offline(empty_caches, monkeypatch) -> None:
    """Weights in the local Hugging Face cache are used offline, read from that file (no hub request)."""
    import timm
    from timm.models import get_pretrained_cfg

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    ref = timm.create_model("resnet26")  # timm's layout, classifier included, as the hub ships it
    repo = get_pretrained_cfg("resnet26").hf_hub_id
    path = _fill_hub_cache(empty_caches, repo, "model.safetensors", ref.state_dict())
    assert locate_pretrained("resnet26") == {"file": str(path)}
    monkeypatch.setattr(
        pretrained, "_unreachable", lambda cfg: pytest.fail("asked the hub despite the cache")
    )
    bb = ResNetBackbone("resnet26", pretrained=True)
    for key in ("conv1.weight", "layer3.0.conv2.weight", "layer4.1.bn3.running_var"):
        torch.testing.assert_close(bb.cnn.state_dict()[key], ref.state_dict()[key], rtol=0, atol=0)


def test_without_weight_source_keeps_the_architecture() -> None:
    cfg = {
        "embed_dim": 512,
        "backbone": {
            "name": "vit_small_patch16_224",
            "pretrained": True,
            "checkpoint": "a.pt",
            "local_block": 7,
        },
    }
    out = pretrained.without_weight_source(cfg)
    assert out["backbone"] == {
        "name": "vit_small_patch16_224",
        "pretrained": False,
        "checkpoint": None,
        "local_block": 7,
    }
    assert cfg["backbone"]["pretrained"] is True and out["embed_dim"] == 512  # the input is left as it was
