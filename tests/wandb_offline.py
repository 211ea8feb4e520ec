"""Read an offline W&B run (``wandb/offline-run-*/run-<id>.wandb``) with wandb's own record format.

The file is W&B's append-only log (the LevelDB log layout: a 7-byte header ``:W&B`` + magic + version, then
32 KiB blocks of records with a 7-byte header: checksum, length, type FULL/FIRST/MIDDLE/LAST), each record a
``wandb_internal_pb2.Record``. wandb 0.31 no longer ships a Python reader, and offline runs write no
``wandb-summary.json`` or ``config.yaml``, so the tests read the records themselves.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B run file")
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # block trailer: zero padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            continue
        buf += data[pos : pos + length]
        pos += length
        if kind in (_FULL, _LAST):
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


@dataclass
class OfflineRun:
    name: str = ""
    group: str = ""
    tags: list[str] = field(default_factory=list)
    job_type: str = ""
    config: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)  # top-level key -> value (nested dicts merged)
    history: list[dict] = field(default_factory=list)  # one dict per committed step
    metrics: list = field(default_factory=list)  # define_metric records
    artifacts: list = field(default_factory=list)


def read_run(run_dir: Path) -> OfflineRun:
    (path,) = Path(run_dir).glob("run-*.wandb")
    run = OfflineRun()
    for r in records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run.name, run.group, run.job_type = r.run.display_name, r.run.run_group, r.run.job_type
            run.tags = list(r.run.tags)
            run.config.update({_key(i): json.loads(i.value_json) for i in r.run.config.update})
        elif kind == "config":
            run.config.update({_key(i): json.loads(i.value_json) for i in r.config.update})
        elif kind == "history":
            run.history.append({_key(i): json.loads(i.value_json) for i in r.history.item})
        elif kind == "summary":
            for i in r.summary.update:
                keys = list(i.nested_key) or [i.key]
                node = run.summary
                for k in keys[:-1]:
                    node = node.setdefault(k, {})
                node[keys[-1]] = json.loads(i.value_json)
        elif kind == "metric":
            run.metrics.append(r.metric)
        elif kind == "artifact":
            run.artifacts.append(r.artifact)
    return run


def read_finished_run(run_dir: Path, timeout: float = 60.0) -> OfflineRun:
    """``read_run`` once the file holds the run's exit record: wandb's service process may still be writing after
    ``finish()`` returns in this process."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        (path,) = Path(run_dir).glob("run-*.wandb")
        if any(r.WhichOneof("record_type") == "exit" for r in records(path)) or time.monotonic() > deadline:
            return read_run(run_dir)
        time.sleep(0.5)
