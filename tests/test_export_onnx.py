"""ONNX export (src/export.py, dalg.tools.onnx_export): one graph with dynamic batch/height/width that matches
PyTorch (onnxruntime) on sizes it was not traced at, non-square ones and maps smaller than a window."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from dalg import create_model  # noqa: E402
from dalg.tools.onnx_export import (  # noqa: E402
    DescriptorGraph,
    check_parity,
    export_onnx,
    onnx_session,
    read_metadata,
)
from dalg.train_pipeline import build_module  # noqa: E402
from tests.conftest import CONF, REPO, compose_train  # noqa: E402

# dalg_tiny cut to two ViT blocks (local tap after the first): the same window attention (window 4, shifted second
# block), fusion and head, at a fraction of the export time
SMALL = {"backbone.depth": 2, "backbone.local_block": 0}
# (H, W) never traced: non-square, padded along one or both axes, a side shorter than the window (3 tokens: no
# shift along it), one window, one token, sides that are not multiples of the patch
UNSEEN = [(96, 96), (48, 176), (160, 64), (16, 16), (64, 64), (100, 75), (320, 240)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    net = create_model("dalg_tiny", **SMALL).eval()
    graph = DescriptorGraph(net, net.input_config.mean, net.input_config.std)
    path = tmp_path_factory.mktemp("onnx") / "small.onnx"
    export_onnx(graph, path, example_size=(224, 160), metadata={"note": "test"})
    return graph, path


def test_onnx_matches_pytorch_on_unseen_sizes_and_batches(exported):
    graph, path = exported
    rows = check_parity(path, graph, UNSEEN, batch=3)  # batch 3 was not traced either (2 was)
    assert [tuple(r["size"]) for r in rows] == UNSEEN
    assert min(r["min_cosine"] for r in rows) >= 0.9999
    one = check_parity(path, graph, [(128, 192)], batch=1)
    assert one[0]["min_cosine"] >= 0.9999
    session = onnx_session(path)
    (inp,) = session.get_inputs()
    assert inp.name == "images" and all(
        isinstance(d, str) for d in (inp.shape[0], inp.shape[2], inp.shape[3])
    )
    out = session.run(
        ["descriptors"], {"images": np.random.default_rng(0).random((2, 3, 80, 144), np.float32)}
    )
    assert out[0].shape == (2, net_dim(graph))
    np.testing.assert_allclose(np.linalg.norm(out[0], axis=1), 1.0, atol=1e-5)
    assert read_metadata(path) == {"note": "test"}


def net_dim(graph: DescriptorGraph) -> int:
    return int(graph.net.embed_dim)


def test_parity_check_fails_when_the_networks_differ(exported):
    graph, path = exported
    other = DescriptorGraph(
        create_model("dalg_tiny", **SMALL).eval(), graph.mean.flatten(), graph.std.flatten()
    )
    with pytest.raises(ValueError, match=r"small\.onnx: ONNX and PyTorch descriptors differ .* at 96x96"):
        check_parity(path, other, [(96, 96)])


def _export_module():
    spec = importlib.util.spec_from_file_location("dalg_export_entry", REPO / "src" / "export.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow  # a second export (~20 s on 2 loaded cores); the parity test above covers the graph itself
def test_export_cli_writes_a_checked_model_with_metadata(tmp_path, capsys):
    module = build_module(
        compose_train(["model=dalg_tiny"] + [f"model.{k}={v}" for k, v in SMALL.items()], tmp_path), 5
    )
    trainer = pl.Trainer(
        logger=False, enable_checkpointing=False, accelerator="cpu", enable_model_summary=False
    )
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "small.ckpt")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            config_name="export",
            overrides=[f"ckpt_path={tmp_path / 'small.ckpt'}", f"output={tmp_path / 'out' / 'm.onnx'}"],
        )
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
        cfg.check.sizes = [[96, 64], [100, 75]]
    out = _export_module().export(cfg)
    assert out == tmp_path / "out" / "m.onnx" and out.exists()
    assert not list(out.parent.glob(".*unchecked"))
    meta = read_metadata(out)
    assert (
        meta["output"]["dim"] == 512
        and meta["input"]["range"] == "[0, 1]"
        and len(meta["checkpoint_sha256"]) == 64
    )
    printed = capsys.readouterr().out
    assert "ONNX model:" in printed and "2 x 100 x 75" in printed

    # the file computes the checkpoint's descriptor of a [0, 1] image: normalisation inside the graph
    x = torch.rand(1, 3, 96, 128)
    net = module.net.eval()
    with torch.no_grad():
        ref = net(
            (x - torch.tensor(meta["input"]["mean"]).view(1, 3, 1, 1))
            / torch.tensor(meta["input"]["std"]).view(1, 3, 1, 1)
        )
    got = onnx_session(out).run(["descriptors"], {"images": x.numpy()})[0]
    assert float((got * ref.numpy()).sum()) >= 0.9999

    with open_dict(cfg):
        cfg.format = "tflite"
    with pytest.raises(ValueError, match="format='tflite' is not supported"):
        _export_module().export(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dalg_tiny", "dolg_tiny"])
def test_full_tiny_models_export(tmp_path, name):
    """The whole dalg_tiny and the CNN path (DOLG: ResNet, multi-atrous block, orthogonal fusion)."""
    torch.manual_seed(0)
    net = create_model(name).eval()
    graph = DescriptorGraph(net, net.input_config.mean, net.input_config.std)
    path = export_onnx(graph, tmp_path / f"{name}.onnx")
    rows = check_parity(path, graph, UNSEEN, batch=2)
    assert min(r["min_cosine"] for r in rows) >= 0.9999
