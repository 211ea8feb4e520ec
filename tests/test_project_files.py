"""The repository as a project (issue 14 item 9): licence, citation, changelog, no unused dependency, and the
`make install-gpu` / `make sweep-summary` commands (read as make would run them: `make -n`)."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

from .conftest import REPO

TOML = (
    REPO / "pyproject.toml"
).read_text()  # read with re: tomllib is Python >= 3.11, the project supports 3.10
VERSION = re.search(r'^version = "([^"]+)"', TOML, re.M).group(1)
DEPENDENCIES = re.findall(r'^    "([^"]+)",$', TOML.split("dependencies = [", 1)[1].split("]", 1)[0], re.M)


def _pin(name: str) -> str:
    (spec,) = [d for d in DEPENDENCIES if re.match(rf"{name}==", d)]
    return spec.split("==", 1)[1]


def test_license_is_the_mit_text_pyproject_names():
    assert re.search(r'^license = "MIT"$', TOML, re.M)
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("MIT License") and "Permission is hereby granted, free of charge" in text


def test_citation_cites_this_repository_dalg_and_dolg():
    cff = yaml.safe_load((REPO / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["license"] == "MIT"
    assert cff["version"] == VERSION
    refs = {r["title"].split(":")[0]: r for r in cff["references"]}
    assert set(refs) == {"DALG", "DOLG"}
    assert refs["DALG"]["year"] == 2022 and "2207.00287" in refs["DALG"]["url"]
    assert [a["family-names"] for a in refs["DALG"]["authors"]][0] == "Song"
    assert refs["DOLG"]["year"] == 2021 and "ICCV" in refs["DOLG"]["collection-title"]
    assert [a["family-names"] for a in refs["DOLG"]["authors"]][0] == "Yang"


def test_changelog_has_an_entry_for_the_current_version():
    text = (REPO / "CHANGELOG.md").read_text()
    assert f"## [{VERSION}]" in text and "## [Unreleased]" in text


def test_fvcore_is_neither_a_dependency_nor_imported():
    assert "torch==2" in " ".join(DEPENDENCIES) and not any("fvcore" in d for d in DEPENDENCIES)
    for folder in ("src", "tests", "experiments", "benchmarks"):
        for path in (REPO / folder).rglob("*.py"):
            assert not re.search(r"^\s*(import|from)\s+fvcore", path.read_text(), re.M), path


def _make_dry_run(*args: str) -> str:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    res = subprocess.run(["make", "-n", *args], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_install_gpu_gets_the_cuda_build_of_the_pinned_torch():
    out = _make_dry_run("install-gpu")
    torch_v, vision_v = _pin("torch"), _pin("torchvision")
    assert f"torch=={torch_v} torchvision=={vision_v}" in out
    assert "--force-reinstall" in out and "--index-url https://download.pytorch.org/whl/cu128" in out
    assert "torch.version.cuda" in out  # fails when a CPU build is left
    assert "--index-url https://download.pytorch.org/whl/cu126" in _make_dry_run(
        "install-gpu", "TORCH_CUDA=cu126"
    )


def test_sweep_summary_target():
    out = _make_dry_run("sweep-summary", "DIR=logs/train/multiruns/fus")
    assert "-m dalg.sweeps.summary logs/train/multiruns/fus" in out
