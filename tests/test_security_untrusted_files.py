"""No code runs from a file: the repository-wide rule and every entry point that reads one.

Rule: no ``pickle.load``/``loads``/``Unpickler``, no ``torch.load`` (or Lightning load) without
``weights_only=True``, no ``np.load(allow_pickle=True)``, no unsafe YAML load, anywhere in src/, benchmarks/,
experiments/ or tests/ (writing pickles, as test helpers do, is fine). Plain-data pickles (gnd files) go through
``dalg.utils.safe_pickle``, checkpoints through ``dalg.lit.checkpoint_read``.

Entry points: each is fed a file whose unpickling would create a marker file; the test asserts the marker does
not exist afterwards and that the error names the file.
"""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dalg.data.revisited import load_ground_truth
from dalg.lit.checkpoint_read import CheckpointError, read_checkpoint
from dalg.lit.module import RetrievalModule
from dalg.utils.safe_pickle import UnsafePickleError, loads_plain_pickle
from tests.conftest import REPO, compose_train, tiny_data_overrides
from tests.conftest import compose_config as _compose
from tests.conftest import load_entry as _entry

SCANNED = ("src", "benchmarks", "experiments", "tests")
DELIBERATE = "# deliberate: our own bytes"  # allowed in this file only (the payload's liveness test)


# ------------------------------------------------------------------------------------------ the source scan
def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def _kwarg_is(call: ast.Call, name: str, value: object) -> bool:
    return any(
        k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value for k in call.keywords
    )


def _has_kwarg(call: ast.Call, name: str) -> bool:
    return any(k.arg == name for k in call.keywords)


def unsafe_loads(source: str, filename: str = "<src>") -> list[str]:
    """``file:line: call`` for every call that could run code from a file (see the module docstring)."""
    tree = ast.parse(source, filename)
    aliases: dict[str, str] = {}  # local name -> qualified name, from the imports
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        if name is None:
            continue
        head, _, rest = name.partition(".")
        qual = aliases.get(head, head) + (f".{rest}" if rest else "")
        qual = qual.replace("numpy.", "np.", 1) if qual.startswith("numpy.") else qual
        bad = None
        if qual in (
            "pickle.load",
            "pickle.loads",
            "pickle.Unpickler",
            "_pickle.load",
            "_pickle.loads",
            "dill.load",
            "dill.loads",
            "cloudpickle.load",
            "cloudpickle.loads",
            "joblib.load",
            "yaml.unsafe_load",
            "yaml.full_load",
            "torch.serialization.add_safe_globals",
            "torch.serialization.safe_globals",
        ):
            bad = qual
        elif qual in (
            "torch.load",
            "torch.serialization.load",
            "lightning_fabric.utilities.cloud_io._load",
            "torch.hub.load_state_dict_from_url",
        ) and not _kwarg_is(node, "weights_only", True):
            bad = f"{qual} without weights_only=True"
        elif name.endswith(".load_from_checkpoint") and not _kwarg_is(node, "weights_only", True):
            bad = f"{name} without weights_only=True"
        elif (
            name.split(".")[-1] in ("fit", "validate", "test", "predict")
            and _has_kwarg(node, "ckpt_path")
            and not _kwarg_is(node, "weights_only", True)
        ):
            bad = f"{name}(ckpt_path=...) without weights_only=True"
        elif (
            qual == "np.load"
            and _has_kwarg(node, "allow_pickle")
            and not _kwarg_is(node, "allow_pickle", False)
        ):
            bad = "np.load with allow_pickle"
        elif qual == "yaml.load" and not any(
            k.arg == "Loader" and "Safe" in (_dotted(k.value) or "") for k in node.keywords
        ):
            bad = "yaml.load without a SafeLoader"
        line = source.splitlines()[node.lineno - 1]
        if bad and not (line.rstrip().endswith(DELIBERATE) and Path(filename).name == Path(__file__).name):
            found.append(f"{filename}:{node.lineno}: {bad}")
    return found


def test_the_scan_finds_every_kind_of_unsafe_load():
    snippet = """
import pickle, torch, yaml
import numpy as np
from pickle import loads as pl
from torch import load
pickle.load(f)
pl(b"")
torch.load(p)
torch.load(p, weights_only=False)
load(p, map_location="cpu")
np.load(p, allow_pickle=True)
yaml.load(s)
Module.load_from_checkpoint(p)
trainer.fit(m, ckpt_path=p)
torch.serialization.add_safe_globals([X])
"""
    lines = [int(hit.split(":")[1]) for hit in unsafe_loads(snippet)]
    assert lines == list(range(6, 16)), unsafe_loads(snippet)  # every call after the imports
    safe = """
import pickle, torch, yaml
import numpy as np
pickle.dump(x, f)
torch.load(p, map_location="cpu", weights_only=True)
np.load(p, mmap_mode="r")
np.load(p, allow_pickle=False)
yaml.load(s, Loader=yaml.SafeLoader)
Module.load_from_checkpoint(p, weights_only=True)
trainer.fit(m, ckpt_path=p, weights_only=True)
trainer.fit(m)
"""
    assert unsafe_loads(safe) == []


def test_no_unsafe_load_anywhere_in_the_repository():
    files = [p for d in SCANNED for p in sorted((REPO / d).rglob("*.py")) if ".venv" not in p.parts]
    assert len(files) > 50  # the scan did look at the tree
    found = [
        hit for p in files for hit in unsafe_loads(p.read_text(encoding="utf-8"), str(p.relative_to(REPO)))
    ]
    assert found == [], "calls that could run code from a file:\n" + "\n".join(found)


# -------------------------------------------------------------------------------------- hostile payloads
class _Payload:
    """Unpickling this creates ``marker``: proof that code from the file ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def _hostile_checkpoint(path: Path, marker: Path) -> Path:
    """A file shaped like a training checkpoint with the payload inside its hyper-parameters."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"global_step": 3, "state_dict": {}, "hyper_parameters": {"model_cfg": _Payload(marker)}}, path
    )
    return path


def _hostile_gnd(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump({"imlist": ["a"], "qimlist": ["q"], "gnd": [{"easy": [0], "x": _Payload(marker)}]}, f)
    return path


def _image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((32, 40, 3), 90, np.uint8)).save(path)
    return path


def test_payload_is_live(tmp_path):
    """The payload does run under a plain unpickler: the tests below would see it."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_Payload(marker)))  # deliberate: our own bytes
    assert marker.exists()


def test_train_ckpt_path_refuses_hostile_checkpoint(tiny_synthetic, tmp_path):
    from dalg.train_pipeline import train

    marker = tmp_path / "ran"
    ckpt = _hostile_checkpoint(tmp_path / "evil.ckpt", marker)
    cfg = compose_train(tiny_data_overrides(tiny_synthetic) + [f"ckpt_path={ckpt}"], tmp_path / "run")
    with pytest.raises(CheckpointError, match="evil.ckpt was refused"):
        train(cfg)
    assert not marker.exists()


def test_train_resume_auto_refuses_planted_last_ckpt(tiny_synthetic, tmp_path):
    from dalg.train_pipeline import train

    marker = tmp_path / "ran"
    out = tmp_path / "run"
    planted = _hostile_checkpoint(out / "checkpoints" / "last.ckpt", marker)
    cfg = compose_train(tiny_data_overrides(tiny_synthetic) + ["resume=auto"], out)
    with pytest.raises(CheckpointError, match=f"{planted}.* was refused"):
        train(cfg)
    assert not marker.exists()


def test_eval_refuses_hostile_checkpoint(tiny_synthetic, tmp_path):
    marker = tmp_path / "ran"
    ckpt = _hostile_checkpoint(tmp_path / "evil.ckpt", marker)
    cfg = _compose(
        "eval",
        [
            f"ckpt_path={ckpt}",
            "data=synthetic",
            f"data.root={tiny_synthetic}",
            "~data.eval_sets.landmarks_mini",
            "num_workers=0",
            "trainer.accelerator=cpu",
        ],
        tmp_path / "out",
    )
    with pytest.raises(CheckpointError, match="evil.ckpt was refused"):
        _entry("eval").evaluate(cfg)
    assert not marker.exists()


def test_extract_refuses_hostile_checkpoint(tmp_path):
    marker = tmp_path / "ran"
    ckpt = _hostile_checkpoint(tmp_path / "evil.ckpt", marker)
    _image(tmp_path / "imgs" / "a.jpg")
    cfg = _compose(
        "extract",
        [
            f"ckpt_path={ckpt}",
            f"images={tmp_path / 'imgs'}",
            f"output={tmp_path / 'f'}",
            "num_workers=0",
            "trainer.accelerator=cpu",
        ],
        tmp_path / "out",
    )
    with pytest.raises(CheckpointError, match="evil.ckpt was refused"):
        _entry("extract").extract(cfg)
    assert not marker.exists()


def test_visualize_attention_refuses_hostile_checkpoint_without_retry(tmp_path):
    from dalg.tools.attention_maps import main

    marker = tmp_path / "ran"
    ckpt = _hostile_checkpoint(tmp_path / "evil.ckpt", marker)
    with pytest.raises(CheckpointError, match="evil.ckpt was refused"):
        main(
            [
                "--image",
                str(_image(tmp_path / "a.png")),
                "--ckpt",
                str(ckpt),
                "--out",
                str(tmp_path / "o.png"),
            ]
        )
    assert not marker.exists() and not (tmp_path / "o.png").exists()


def test_revisited_loader_refuses_hostile_gnd(tmp_path):
    marker = tmp_path / "ran"
    gnd = _hostile_gnd(tmp_path / "gnd_evil.pkl", marker)
    with pytest.raises(ValueError, match=f"{gnd}.* was refused"):
        load_ground_truth(tmp_path, "evil")
    assert not marker.exists()


@pytest.mark.parametrize("mmap", [True, False])
def test_feature_store_with_pickled_objects_is_refused(tmp_path, mmap):
    """A distractor store (eval.py distractors=) whose array holds pickled objects."""
    from dalg.retrieval.features import load_features, save_features

    marker = tmp_path / "ran"
    arr = save_features(tmp_path / "store", np.eye(2, dtype=np.float32), ["a", "b"], dtype="float32")
    hostile = np.empty((2, 2), dtype=object)
    hostile[0, 0] = _Payload(marker)
    np.save(arr, hostile, allow_pickle=True)  # writing: the reader must not unpickle it
    with pytest.raises(ValueError, match=f"feature store {arr} cannot be read"):
        load_features(arr, mmap=mmap)
    assert not marker.exists()


# ----------------------------------------------------------------------------- what must still load
@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("arrays", [False, True], ids=["lists", "numpy"])
def test_official_format_gnd_loads(tmp_path, protocol, arrays):
    """The official files: dict of imlist, qimlist and per-query dicts of bbx/easy/hard/junk (lists or arrays)."""
    as_ = (lambda v, dt: np.asarray(v, dt)) if arrays else (lambda v, dt: list(v))
    gnd = [
        {
            "bbx": as_([1.5, 2.0, 30.0, 40.0], np.float64),
            "easy": as_([0, 2], np.int64),
            "hard": as_([1], np.int64),
            "junk": as_([], np.int64),
        },
        {"bbx": None, "easy": as_([1], np.int64), "hard": as_([], np.int64), "junk": as_([2], np.int64)},
    ]
    raw = {"imlist": ["d0", "d1", "d2"], "qimlist": ["q0", "q1"], "gnd": gnd}
    (tmp_path / "gnd_off.pkl").write_bytes(pickle.dumps(raw, protocol=protocol))
    gt = load_ground_truth(tmp_path, "off")
    assert gt.imlist == ["d0", "d1", "d2"] and gt.qimlist == ["q0", "q1"]
    assert gt.gnd[0] == {"bbx": [1.5, 2.0, 30.0, 40.0], "easy": [0, 2], "hard": [1], "junk": []}
    assert gt.gnd[1] == {"bbx": None, "easy": [1], "hard": [], "junk": [2]}
    assert all(type(j) is int for j in gt.gnd[0]["easy"])


def test_plain_data_unpickler_refuses_any_other_global():
    for obj in (Path("x"), object, np.load, pickle.loads):
        with pytest.raises(UnsafePickleError):
            loads_plain_pickle(pickle.dumps(obj))
    data = {"a": np.arange(3.0), "b": np.float32(2), "c": {1, 2}, "d": (b"x", "y")}
    out = loads_plain_pickle(pickle.dumps(data))
    assert (
        np.array_equal(out["a"], data["a"])
        and out["b"] == 2
        and out["c"] == {1, 2}
        and out["d"] == (b"x", "y")
    )


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is empty"),
        (b"\x80\x04\x95garbage", "not a readable pickle"),
        (pickle.dumps({"imlist": list("abcdefgh"), "qimlist": [], "gnd": []})[:-7], "not a readable pickle"),
        (b"imlist,qimlist\n", "not a readable pickle"),
        (pickle.dumps(["a list"]), "expected a dict"),
    ],
)
def test_damaged_gnd_file_errors_name_the_path(tmp_path, content, message):
    (tmp_path / "gnd_bad.pkl").write_bytes(content)
    with pytest.raises(ValueError, match=message) as err:
        load_ground_truth(tmp_path, "bad")
    assert str(tmp_path / "gnd_bad.pkl") in str(err.value)


# ------------------------------------------------------------------------ damaged checkpoints name the file
@pytest.fixture(scope="module")
def real_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint as training writes it (Lightning's save of RetrievalModule with plain hyper-parameters)."""
    import pytorch_lightning as pl

    from dalg.train_pipeline import build_module

    out = tmp_path_factory.mktemp("ckpt")
    module = build_module(compose_train(["model=dalg_tiny"], out), num_classes=5)
    trainer = pl.Trainer(
        logger=False, enable_checkpointing=False, accelerator="cpu", enable_model_summary=False
    )
    trainer.strategy.connect(module)
    trainer.save_checkpoint(out / "tiny.ckpt")
    return out / "tiny.ckpt"


def test_own_checkpoints_load_with_weights_only(real_checkpoint):
    ckpt = read_checkpoint(real_checkpoint)
    assert isinstance(ckpt["hyper_parameters"]["model_cfg"], dict)
    module = RetrievalModule.for_evaluation(real_checkpoint)
    reference = torch.load(real_checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.equal(v, reference[k]) for k, v in module.state_dict().items())
    assert not module.training


@pytest.mark.parametrize(
    "kind, message",
    [
        ("empty", "is empty"),
        ("random", "is not a PyTorch checkpoint"),
        ("truncated", "cannot be read"),
        ("state_dict", "is a plain state dict"),
        ("no_model_cfg", "model_cfg"),
        ("wrong_weights", "does not match"),
    ],
)
def test_damaged_checkpoint_errors_name_the_file(real_checkpoint, tmp_path, kind, message):
    path = tmp_path / f"{kind}.ckpt"
    data = real_checkpoint.read_bytes()
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "random":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:
        ckpt = torch.load(real_checkpoint, map_location="cpu", weights_only=True)
        if kind == "state_dict":
            ckpt = ckpt["state_dict"]
        elif kind == "no_model_cfg":
            del ckpt["hyper_parameters"]["model_cfg"]
        else:
            ckpt["state_dict"]["net.unexpected"] = torch.zeros(1)
        torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match=message) as err:
        RetrievalModule.for_evaluation(path)
    assert str(path) in str(err.value)
