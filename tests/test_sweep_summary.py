"""Sweep job folder names (dalg.sweeps.job_names), the sweep summary (dalg.sweeps.summary) and its Hydra callback."""

from __future__ import annotations

import csv
import json

import pytest
import yaml
from omegaconf import OmegaConf

from dalg.sweeps import job_names
from dalg.sweeps.hydra_callback import SweepSummaryCallback
from dalg.sweeps.summary import load_jobs, main, markdown, varying_keys, write_summary


def test_tag_is_short_safe_and_names_the_varying_values():
    over = ["model/fusion=cross_attention", "trainer.max_epochs=2", "data.root=/data/x", "a=[1,2]", "~data.x"]
    # data.root and ~deletions left out
    assert job_names.tag(over) == "fusion-cross_attention_max_epochs-2_a-1-2"
    assert job_names.tag(over, ["model/fusion"]) == "fusion-cross_attention"
    long = job_names.tag([f"optim.optimizer.lr_{i}=0.000123456789" for i in range(9)])
    assert len(long) <= job_names.MAX_TAG and not any(c in long for c in "=,/ ")


def test_sweep_keys_from_command_line_and_sweeper_params():
    over = ["model/fusion=cross_attention,orthogonal", "seed=range(1,3)", "trainer.max_epochs=2"]
    assert job_names.sweep_keys(over, {"optim.optimizer.lr": "interval(1e-4, 1e-3)"}) == [
        "model/fusion",
        "seed",
        "optim.optimizer.lr",
    ]


def test_job_tag_resolver_uses_the_recorded_varying_keys(monkeypatch):
    cfg = OmegaConf.create({"o": ["model/fusion=orthogonal", "trainer.max_epochs=2"], "d": "${job_tag:${o}}"})
    monkeypatch.delenv(job_names.ENV_VARYING, raising=False)
    assert cfg.d == "_fusion-orthogonal_max_epochs-2"
    job_names.set_varying_keys(["model/fusion"])
    assert cfg.d == "_fusion-orthogonal"
    monkeypatch.setenv(job_names.ENV_VARYING, '"not a list"')
    with pytest.raises(ValueError, match=job_names.ENV_VARYING):
        job_names.varying_keys()


def _metrics(m: float, sets=("synthetic_heldout", "roxford5k")) -> dict[str, float]:
    return {f"val/{s}/mAP_{k}": m + i + (k == "M") for i, s in enumerate(sets) for k in ("E", "M", "H")}


def _job(folder, overrides, best=None, last=None, csv_rows=None, steps=8):
    """A job folder as src/train.py writes it; without ``best``, an old-format metrics.json (final values only)."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (folder / "config.yaml").write_text(yaml.safe_dump({"optimized_metric": "val/synthetic_heldout/mAP_M"}))
    final = {"metrics": {**last, "train/loss": 1.0}, "global_step": steps, "elapsed_s": 10.0}
    if best is not None:
        final.update(
            monitor="val/synthetic_heldout/mAP_M",
            best={"step": 4, "epoch": 0, "value": best["val/synthetic_heldout/mAP_M"], "metrics": best},
            last={"step": steps, "epoch": 1, "metrics": last},
        )
    (folder / "metrics.json").write_text(json.dumps(final))
    if csv_rows:
        (folder / "csv").mkdir()
        keys = sorted({k for r in csv_rows for k in r})
        with open(folder / "csv" / "metrics.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(csv_rows)


def test_summary_best_and_last_every_set_nested_and_old_folders(tmp_path):
    root = tmp_path / "fus"
    _job(
        root / "0_fusion-cross_attention",
        ["model/fusion=cross_attention", "seed=1"],
        _metrics(50),
        _metrics(40),
    )
    # an old sweep folder, nested one level deeper, jobs named by number, metrics.json with final values only:
    # best comes from its metrics.csv (the step-0 row of the untrained model is not a candidate)
    old_rows = [
        {"step": 0, **_metrics(90)},
        {"step": 4, **_metrics(30)},
        {"step": 8, **_metrics(20)},
        {"step": 8, "train/loss": 2.0},
    ]
    _job(root / "old" / "1", ["model/fusion=orthogonal", "seed=1"], last=_metrics(20), csv_rows=old_rows)
    (root / "2").mkdir()  # unfinished: no config, no metrics
    jobs = load_jobs(root)
    assert [j.job for j in jobs] == ["fus/0_fusion-cross_attention", "fus/old/1"]
    assert varying_keys(jobs) == ["model/fusion"]
    assert jobs[1].best["val/synthetic_heldout/mAP_M"] == 31 and jobs[1].best_step == 4
    assert jobs[1].last["val/roxford5k/mAP_H"] == 21
    md = markdown(jobs)
    assert (
        "| job | model/fusion | best step / steps | synthetic_heldout mAP_M | synthetic_heldout mAP_H |" in md
    )
    assert (
        "| 0_fusion-cross_attention | cross_attention | 4 / 8 | 51.00 / 41.00 | 50.00 / 40.00 | 52.00 / 42.00 |"
        in md
    )
    assert "| 1 | orthogonal | 4 / 8 | 31.00 / 21.00 |" in md

    made = write_summary(root)
    assert set(made) == {"md", "csv", "json", "png"}
    assert made["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(open(made["csv"])))
    assert rows[0]["roxford5k/mAP_M/best"] == "52.0" and rows[0]["roxford5k/mAP_M/last"] == "42.0"
    data = json.loads(made["json"].read_text())
    assert data["varying"] == ["model/fusion"] and len(data["jobs"]) == 2


def test_summary_cli(tmp_path, capsys):
    _job(tmp_path / "s" / "0_a-1", ["a=1"], _metrics(10), _metrics(10))
    assert main([str(tmp_path / "s"), "--out", str(tmp_path / "out"), "--metrics", "mAP_E"]) == 0
    assert "| 0_a-1 |" in capsys.readouterr().out and (tmp_path / "out" / "summary.md").is_file()
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 1
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing")])


def test_bad_metrics_json_is_named(tmp_path):
    job = tmp_path / "s" / "0"
    _job(job, ["a=1"], _metrics(10), _metrics(10))
    (job / "metrics.json").write_text("{not json")
    with pytest.raises(ValueError, match="0/metrics.json"):
        load_jobs(tmp_path / "s")


def test_hydra_callback_records_varying_keys_and_writes_the_summary(tmp_path, monkeypatch):
    monkeypatch.delenv(job_names.ENV_VARYING, raising=False)
    cfg = OmegaConf.create(
        {"hydra": {"sweep": {"dir": str(tmp_path / "fus")}, "overrides": {"task": ["a=1,2", "b=3"]}}}
    )
    cb = SweepSummaryCallback()
    cb.on_multirun_start(cfg)
    assert job_names.varying_keys() == ["a"]
    _job(tmp_path / "fus" / "0_a-1", ["a=1", "b=3"], _metrics(10), _metrics(9))
    _job(tmp_path / "fus" / "1_a-2", ["a=2", "b=3"], _metrics(20), _metrics(19))
    cb.on_multirun_end(cfg)
    assert job_names.varying_keys() is None
    md = (tmp_path / "fus" / "summary.md").read_text()
    assert "| 1_a-2 | 2 | 4 / 8 | 21.00 / 20.00 |" in md
