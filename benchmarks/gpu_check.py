"""GPU readiness check (`make gpu-check`): the GPU paths no CPU test can run, in one unattended script.

Sub-checks (random weights, ``pretrained=false``: nothing is downloaded), each timed; a failing one is recorded
with its error and traceback and the next one still runs:

  train_bf16   bf16-mixed training steps through Lightning of dalg_cross and dolg_r50 at 512 px, per-GPU batch 8,
               with the full GLDv2-clean margin head (81,313 classes) and each recipe's optimiser: step time,
               images/s, peak GPU memory; the loss must stay finite and the weights must move
  ddp_nccl     the user's command ``python src/train.py trainer=ddp trainer.devices=1`` (one DDP process, NCCL)
               on a tiny generated set: exit status, the backend Lightning reports, the steps in metrics.json
  compile      ``torch.compile`` on CUDA through dalg.inference (inference.compile=true) of dalg_cross:
               compile time, descriptors equal to eager (cosine), speed-up
  faiss_gpu    FAISS-GPU exact search equal to FAISS-CPU search on the same descriptors (ties aside)
  extraction   descriptor extraction images/s of DALG (dalg_cross, 1 scale) and DOLG-R50 (5 scales) on the GPU,
               float32 and the automatic inference options (bf16 on GPUs that have it)

Writes ``experiments/gpu/results.{json,md}``; exits 0 when every check passed, 1 when one failed. Without CUDA it
says why, runs nothing, writes nothing and exits 2. ``--budget-s`` (default 480 s) skips the checks that would
start after it; ``--checks`` picks some. ``--allow-cpu --out DIR`` runs the same code on the CPU with tiny models
(a dry run for tests of this script; it is labelled as such and never written to experiments/gpu).

    python benchmarks/gpu_check.py                      # on a CUDA machine (after `make install-gpu` for FAISS)
    python benchmarks/gpu_check.py --checks train_bf16,extraction
"""

from __future__ import annotations

import argparse
import datetime
import gc
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

EXIT_OK, EXIT_FAILED, EXIT_NO_CUDA = 0, 1, 2
GLDV2_CLEAN_CLASSES = 81_313
DOLG_SCALES = (0.3535, 0.5, 0.7071, 1.0, 1.4142)


class CheckFailed(AssertionError):
    """A sub-check ran but its result is wrong (mismatch, non-finite loss, ...)."""


class CheckTimeout(TimeoutError):
    """A sub-check ran past its own limit (raised in the main thread by SIGALRM)."""


def cuda_unavailable_reason() -> str | None:
    """Why this machine cannot run the check, or None when a CUDA device is usable."""
    try:
        import torch
    except ImportError as e:  # pragma: no cover - the project needs torch
        return f"torch cannot be imported ({e})"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build (no CUDA support)"
    if not torch.cuda.is_available():
        return (
            f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})"
        )
    return None


@dataclass
class Profile:
    """What the checks run: the GPU sizes, or tiny ones for a CPU dry run."""

    device: str = "cuda"
    dalg: str = "dalg_cross"
    dolg: str = "dolg_r50"
    train_size: int = 512
    batch_size: int = 8  # per GPU, the recipes' value
    head_classes: int = GLDV2_CLEAN_CLASSES
    warmup_steps: int = 3
    timed_steps: int = 10
    ddp_trainer: list[str] = field(default_factory=lambda: ["trainer=ddp", "trainer.devices=1"])
    ddp_backend: str = "nccl"
    test_size: int = 512
    extraction_images: int = 32
    extraction_rounds: int = 3
    compile_images: int = 4
    faiss_db: int = 200_000
    faiss_queries: int = 500
    faiss_k: int = 100

    @classmethod
    def cpu_dry_run(cls) -> Profile:
        return cls(
            device="cpu",
            dalg="dalg_tiny",
            dolg="dolg_tiny",
            train_size=64,
            batch_size=4,
            head_classes=1000,
            warmup_steps=1,
            timed_steps=2,
            ddp_trainer=["trainer=ddp_cpu", "trainer.devices=1"],
            ddp_backend="gloo",
            test_size=96,
            extraction_images=6,
            extraction_rounds=1,
            compile_images=2,
            faiss_db=5_000,
            faiss_queries=20,
            faiss_k=10,
        )


# ------------------------------------------------------------------------------------------------ helpers
def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _recipe(experiment: str, model: str, extra: list[str] | None = None):
    """The train config of ``experiment`` with ``model`` and random weights (nothing downloaded)."""
    from hydra import compose, initialize_config_dir

    import dalg.utils.config  # noqa: F401  (registers ${repo_root:})

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(
            config_name="train",
            overrides=[
                f"experiment={experiment}",
                f"model={model}",
                "model.backbone.pretrained=false",
                *(extra or []),
            ],
        )


def _build_net(model: str, device: str):
    import torch

    from dalg.tools.model_table import build_model

    torch.manual_seed(0)
    return build_model(model, device=device).eval()  # random weights


def _test_images(n: int, size: int, seed: int = 0) -> list:
    """``n`` normalised random images at four aspect ratios, longer side ``size``, sides multiples of 32."""
    import torch

    g = torch.Generator().manual_seed(seed)
    short = max(32, (size * 3 // 4) // 32 * 32)
    shapes = [(size, short), (short, size), (size, size), (short, short)]
    return [torch.randn(3, *shapes[i % len(shapes)], generator=g) for i in range(n)]


# ------------------------------------------------------------------------------------------------ checks
def check_train_bf16(p: Profile) -> dict[str, Any]:
    import pytorch_lightning as pl
    import torch
    from torch.utils.data import DataLoader, Dataset

    from dalg.train_pipeline import build_module

    class RandomImages(Dataset):
        def __len__(self) -> int:
            return p.batch_size * (p.warmup_steps + p.timed_steps)

        def __getitem__(self, i: int):
            g = torch.Generator().manual_seed(i)
            return torch.randn(3, p.train_size, p.train_size, generator=g), i * 7919 % p.head_classes

    class StepTimer(pl.Callback):
        def __init__(self) -> None:
            self.seconds: list[float] = []
            self.losses: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            _sync(p.device)
            self._t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            _sync(p.device)  # after the optimiser step: Lightning calls this hook once the step is done
            self.seconds.append(time.perf_counter() - self._t0)
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.losses.append(float(loss))

    out: dict[str, Any] = {}
    for experiment, model in (("dalg_gldv2", p.dalg), ("dolg_r50_gldv2", p.dolg)):
        cfg = _recipe(experiment, model)
        module = build_module(cfg, p.head_classes)
        before = module.net.head.weight.detach().clone()
        timer = StepTimer()
        trainer = pl.Trainer(
            accelerator="gpu" if p.device.startswith("cuda") else "cpu",
            devices=1,
            precision="bf16-mixed",
            max_steps=p.warmup_steps + p.timed_steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            callbacks=[timer],
        )
        loader = DataLoader(
            RandomImages(),
            batch_size=p.batch_size,
            shuffle=False,
            drop_last=True,
            num_workers=2,
            pin_memory=p.device.startswith("cuda"),
        )
        trainer.fit(module, train_dataloaders=loader)
        timed = timer.seconds[p.warmup_steps :]
        moved = float((module.net.head.weight.detach().cpu().float() - before.cpu().float()).abs().max())
        row = {
            "experiment": experiment,
            "optimizer": str(cfg.optim.optimizer._target_),
            "head": list(module.net.head.weight.shape),
            "batch_size": p.batch_size,
            "train_size": p.train_size,
            "steps": len(timer.seconds),
            "step_seconds_median": _median(timed),
            "images_per_s": p.batch_size / _median(timed),
            "first_step_seconds": timer.seconds[0],
            "losses": [round(x, 4) for x in timer.losses],
            "head_weight_max_change": moved,
        }
        if p.device.startswith("cuda"):
            row["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out[model] = row
        del trainer, module, loader
        _free(p.device)
        if len(timer.seconds) != p.warmup_steps + p.timed_steps:
            raise CheckFailed(
                f"{model}: {len(timer.seconds)} steps ran, expected {p.warmup_steps + p.timed_steps}"
            )
        if not all(math.isfinite(x) for x in timer.losses):
            raise CheckFailed(f"{model}: non-finite loss under bf16-mixed: {timer.losses}")
        if not moved > 0:
            raise CheckFailed(
                f"{model}: the margin head's weights did not change in {len(timer.seconds)} steps"
            )
    return out


def check_ddp(p: Profile) -> dict[str, Any]:
    import json

    from dalg.data.synthetic import TINY_SYNTHETIC

    with tempfile.TemporaryDirectory(prefix="gpu-check-ddp-") as tmp:
        cmd = [
            sys.executable,
            str(REPO / "src" / "train.py"),
            *p.ddp_trainer,
            "model=dalg_tiny",
            f"data.root={tmp}/synthetic",
            "data.num_workers=2",
            "data.batch_size=8",
            "data.train_size=64",
            "data.eval_sets.synthetic_heldout.test_size=64",
            "~data.eval_sets.landmarks_mini",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=4",
            "validate_before_fit=false",
            "logger=csv",
            "callbacks.rich_progress_bar=null",
            "trainer.enable_progress_bar=false",
            f"paths.log_dir={tmp}",
            "run_name=ddp",
            *[f"data.generator.{k}={v}" for k, v in TINY_SYNTHETIC.items()],
        ]
        env = {**os.environ, "WANDB_MODE": "offline"}
        t0 = time.perf_counter()
        res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        seconds = time.perf_counter() - t0
        log = res.stdout + res.stderr
        out = {
            "command": " ".join(cmd[1:]),
            "returncode": res.returncode,
            "seconds": seconds,
            "log_tail": log[-1500:],
        }
        if res.returncode != 0:
            raise CheckFailed(f"src/train.py exited {res.returncode}: {log[-2000:]}")
        backend = next(
            (
                line.split("=", 1)[1].strip()
                for line in log.splitlines()
                if line.startswith("distributed_backend=")
            ),
            None,
        )
        out["backend"] = backend
        metrics = json.loads((Path(tmp) / "train" / "runs" / "ddp" / "metrics.json").read_text())
        out["global_step"] = metrics.get("global_step")
        out["metrics"] = {k: v for k, v in metrics.get("metrics", {}).items() if "mAP" in k}
    if backend != p.ddp_backend:
        raise CheckFailed(f"Lightning reported distributed_backend={backend}, expected {p.ddp_backend}")
    if not out["global_step"]:
        raise CheckFailed(f"metrics.json reports global_step={out['global_step']}: no training step ran")
    return out


def check_compile(p: Profile) -> dict[str, Any]:
    import torch

    from dalg.inference import InferenceOptions, extract_images, optimize_for_inference

    net = _build_net(p.dalg, p.device)
    g = torch.Generator().manual_seed(2)  # one shape, so one graph to compile
    images = list(
        torch.randn(p.compile_images, 3, p.test_size, p.test_size * 3 // 4 // 32 * 32, generator=g).to(
            p.device
        )
    )
    eager = optimize_for_inference(net, InferenceOptions(bf16=False, compile=False))
    compiled = optimize_for_inference(net, InferenceOptions(bf16=False, compile=True))
    ref = extract_images(eager, images, max_batch=len(images))
    _sync(p.device)
    t0 = time.perf_counter()
    got = extract_images(compiled, images, max_batch=len(images))  # first call: compiles this shape
    _sync(p.device)
    compile_s = time.perf_counter() - t0

    def timed(m) -> float:
        _sync(p.device)
        t = time.perf_counter()
        extract_images(m, images, max_batch=len(images))
        _sync(p.device)
        return time.perf_counter() - t

    eager_s = _median([timed(eager) for _ in range(3)])
    compiled_s = _median([timed(compiled) for _ in range(3)])
    cos = float((ref.float() * got.float()).sum(1).min())
    out = {
        "model": p.dalg,
        "batch_shape": [len(images), *images[0].shape],
        "compile_seconds": compile_s,
        "eager_seconds": eager_s,
        "compiled_seconds": compiled_s,
        "speedup": eager_s / compiled_s,
        "min_cosine_to_eager": cos,
        "torch": torch.__version__,
    }
    del net, eager, compiled
    _free(p.device)
    if not cos >= 0.9999:
        raise CheckFailed(f"compiled descriptors differ from eager: min cosine {cos:.6f} < 0.9999")
    return out


def check_faiss_gpu(p: Profile) -> dict[str, Any]:
    import numpy as np

    from dalg.retrieval.index import faiss_gpu_count, search

    n_gpu = faiss_gpu_count()
    if n_gpu == 0:
        raise CheckFailed(
            "FAISS sees no GPU (faiss-cpu is installed, or no CUDA device): run `make install-gpu`"
        )
    rng = np.random.default_rng(0)
    db = rng.standard_normal((p.faiss_db, 512)).astype(np.float32)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    q = db[rng.choice(p.faiss_db, p.faiss_queries, replace=False)] + 0.05 * rng.standard_normal(
        (p.faiss_queries, 512)
    ).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    t0 = time.perf_counter()
    s_cpu, i_cpu = search(q, db, p.faiss_k, use_gpu=False)
    cpu_s = time.perf_counter() - t0
    search(q[:2], db, p.faiss_k, use_gpu=True)  # GPU resources and the first transfer are not search time
    t0 = time.perf_counter()
    s_gpu, i_gpu = search(q, db, p.faiss_k, use_gpu=True)
    gpu_s = time.perf_counter() - t0
    differ = np.argwhere(i_cpu != i_gpu)
    # a different id at a rank is fine only if its exact score equals the CPU's score at that rank (a tie)
    exact = np.array([float(db[i_gpu[a, b]] @ q[a]) for a, b in differ]) if len(differ) else np.zeros(0)
    tie_gap = float(np.abs(exact - s_cpu[differ[:, 0], differ[:, 1]]).max()) if len(differ) else 0.0
    out = {
        "faiss_gpus": n_gpu,
        "database": p.faiss_db,
        "queries": p.faiss_queries,
        "k": p.faiss_k,
        "max_score_difference": float(np.abs(s_cpu - s_gpu).max()),
        "ids_identical": float((i_cpu == i_gpu).mean()),
        "differing_ids": int(len(differ)),
        "max_tie_gap": tie_gap,
        "cpu_seconds": cpu_s,
        "gpu_seconds": gpu_s,
    }
    if out["max_score_difference"] > 1e-4 or tie_gap > 1e-4:
        raise CheckFailed(
            f"FAISS-GPU differs from CPU: max score difference {out['max_score_difference']:.2e}, "
            f"{len(differ)} differing ids, largest score gap among them {tie_gap:.2e}"
        )
    return out


def check_extraction(p: Profile) -> dict[str, Any]:
    from dalg.inference import InferenceOptions, extract_images, optimize_for_inference

    images = [im.to(p.device) for im in _test_images(p.extraction_images, p.test_size, seed=1)]
    rows = []
    for model, scales in ((p.dalg, (1.0,)), (p.dolg, DOLG_SCALES)):
        net = _build_net(model, p.device)
        for label, options in (("fp32", InferenceOptions(bf16=False)), ("auto", InferenceOptions())):
            ext = optimize_for_inference(net, options)
            extract_images(ext, images, scales, max_batch=16)  # warm-up: cuDNN algorithm choice, allocations
            times = []
            for _ in range(p.extraction_rounds):
                _sync(p.device)
                t0 = time.perf_counter()
                extract_images(ext, images, scales, max_batch=16)
                _sync(p.device)
                times.append(time.perf_counter() - t0)
            rows.append(
                {
                    "model": model,
                    "scales": list(scales),
                    "options": label,
                    "resolved": ext.options.label(),
                    "images_per_s": len(images) / _median(times),
                    "round_seconds": times,
                }
            )
            del ext
        del net
        _free(p.device)
    by = {(r["model"], r["options"]): r["images_per_s"] for r in rows}
    return {
        "images": len(images),
        "test_size": p.test_size,
        "rows": rows,
        "dalg_over_dolg": {o: by[(p.dalg, o)] / by[(p.dolg, o)] for o in ("fp32", "auto")},
    }


CHECKS: dict[str, Callable[[Profile], dict[str, Any]]] = {
    "train_bf16": check_train_bf16,
    "ddp_nccl": check_ddp,
    "compile": check_compile,
    "faiss_gpu": check_faiss_gpu,
    "extraction": check_extraction,
}


# ------------------------------------------------------------------------------------------------ runner
def _alarm(seconds: float) -> None:
    if hasattr(signal, "SIGALRM") and seconds > 0:
        signal.setitimer(signal.ITIMER_REAL, seconds)


def _on_alarm(signum, frame) -> None:
    raise CheckTimeout("ran past its time limit (a hung CUDA/NCCL call or a far too slow step)")


def run_checks(
    checks: dict[str, Callable[[Profile], dict[str, Any]]],
    profile: Profile,
    budget_s: float,
    log: Callable[[str], object] = print,
    check_timeout_s: float = 0.0,
    on_result: Callable[[list[dict[str, Any]]], object] | None = None,
) -> list[dict[str, Any]]:
    """Run every check; one failing (or raising anything) is recorded and the others still run. Checks that
    would start after ``budget_s`` seconds are recorded as skipped; ``check_timeout_s`` > 0 interrupts a check
    that runs longer (SIGALRM, so only between Python bytecodes); ``on_result`` gets the rows after each check
    (the report is written as it grows, so a run that dies still leaves what it found)."""
    start = time.perf_counter()
    results: list[dict[str, Any]] = []
    use_alarm = (
        check_timeout_s > 0
        and hasattr(signal, "SIGALRM")
        and threading.current_thread() is threading.main_thread()
    )  # signals reach the main thread only
    previous = signal.signal(signal.SIGALRM, _on_alarm) if use_alarm else None
    for name, fn in checks.items():
        elapsed = time.perf_counter() - start
        if elapsed > budget_s:
            results.append(
                {
                    "name": name,
                    "status": "skipped",
                    "error": f"time budget of {budget_s:.0f} s spent ({elapsed:.0f} s)",
                    "seconds": 0.0,
                    "figures": {},
                }
            )
            log(f"[{name}] skipped: time budget spent")
            continue
        log(f"[{name}] running ...")
        t0 = time.perf_counter()
        row: dict[str, Any] = {"name": name}
        try:
            if use_alarm:
                _alarm(check_timeout_s)
            row.update(status="ok", figures=fn(profile), error=None)
        except Exception as e:  # noqa: BLE001 - recorded; the next check still runs
            row.update(
                status="failed",
                figures={},
                error=f"{type(e).__name__}: {e}"[:4000],
                traceback=traceback.format_exc()[-4000:],
            )
        finally:
            if use_alarm:
                signal.setitimer(signal.ITIMER_REAL, 0)
            try:
                _free(profile.device)
            except Exception:  # noqa: BLE001 - a broken CUDA context is already recorded by the check itself
                pass
        row["seconds"] = round(time.perf_counter() - t0, 2)
        results.append(row)
        log(
            f"[{name}] {row['status']} in {row['seconds']:.1f} s"
            + (f": {row['error'][:300]}" if row["error"] else "")
        )
        if on_result is not None:
            on_result(results)
    if use_alarm:
        signal.signal(signal.SIGALRM, previous)
    return results


def environment(profile: Profile) -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "device": profile.device,
        "cpu_count": os.cpu_count(),
    }
    if profile.device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_count"] = torch.cuda.device_count()
        env["bf16_supported"] = torch.cuda.is_bf16_supported()
        env["cudnn"] = torch.backends.cudnn.version()
    try:
        import faiss

        env["faiss"] = faiss.__version__
    except ImportError:
        env["faiss"] = None
    return env


def _fmt(name: str, f: dict[str, Any]) -> str:
    if not f:
        return ""
    if name == "train_bf16":
        return "; ".join(
            f"{m}: {r['step_seconds_median']:.3f} s/step, {r['images_per_s']:.1f} img/s"
            + (f", {r['peak_gpu_memory_gib']:.1f} GiB" if "peak_gpu_memory_gib" in r else "")
            for m, r in f.items()
        )
    if name == "ddp_nccl":
        return f"backend {f.get('backend')}, {f.get('global_step')} steps"
    if name == "compile":
        return (
            f"compile {f['compile_seconds']:.1f} s, speed-up {f['speedup']:.2f}x, "
            f"cos >= {f['min_cosine_to_eager']:.6f}"
        )
    if name == "faiss_gpu":
        return (
            f"max score diff {f['max_score_difference']:.1e}, ids identical {100 * f['ids_identical']:.2f}%, "
            f"CPU {f['cpu_seconds']:.2f} s, GPU {f['gpu_seconds']:.2f} s"
        )
    if name == "extraction":
        return ", ".join(f"DALG/DOLG {k} {v:.2f}x" for k, v in f["dalg_over_dolg"].items())
    return ""


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    title = "# GPU readiness check (`make gpu-check`)"
    if report["dry_run"]:
        title += "\n\n**CPU dry run with tiny models: not a GPU result.**"
    if not report.get("complete", True):
        title += "\n\n**Incomplete: the run stopped before its last check (this is what it had found).**"
    lines = [
        title,
        "",
        f"{report['started']}, {env.get('gpu', env['device'])}, torch {env['torch']} "
        f"(CUDA {env['cuda']}), FAISS {env['faiss']}; {report['total_seconds']:.0f} s in all.",
        "",
        "| check | status | seconds | figures |",
        "|---|---|---|---|",
    ]
    for r in report["checks"]:
        figures = _fmt(r["name"], r["figures"]) or (r["error"] or "")[:200].replace("|", "/").replace(
            "\n", " "
        )
        lines.append(f"| {r['name']} | {r['status']} | {r['seconds']:.1f} | {figures} |")
    ext = next((r for r in report["checks"] if r["name"] == "extraction" and r["figures"]), None)
    if ext:
        lines += [
            "",
            f"Extraction, {ext['figures']['images']} images, longer side {ext['figures']['test_size']}:",
            "",
            "| model | scales | options | images/s |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {r['model']} | {len(r['scales'])} | {r['resolved']} | {r['images_per_s']:.1f} |"
            for r in ext["figures"]["rows"]
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--checks", default=",".join(CHECKS), help=f"comma-separated subset of {', '.join(CHECKS)}"
    )
    ap.add_argument("--budget-s", type=float, default=480.0, help="no check starts after this many seconds")
    ap.add_argument("--check-timeout-s", type=float, default=300.0, help="one check's limit (0: none)")
    ap.add_argument("--out", type=Path, default=None, help="default: experiments/gpu")
    ap.add_argument(
        "--allow-cpu", action="store_true", help="dry run on the CPU with tiny models (needs --out)"
    )
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.checks.split(",") if n.strip()]
    unknown = sorted(set(names) - set(CHECKS))
    if unknown:
        ap.error(f"unknown checks {unknown}; known: {', '.join(CHECKS)}")

    reason = cuda_unavailable_reason()
    if reason is not None and not args.allow_cpu:
        print(
            f"gpu_check: cannot run: {reason}. Nothing was run and no results were written.", file=sys.stderr
        )
        return EXIT_NO_CUDA
    if args.allow_cpu and args.out is None:
        ap.error("--allow-cpu writes a dry run: give --out (experiments/gpu holds GPU results only)")
    profile = Profile() if reason is None else Profile.cpu_dry_run()
    out = args.out or REPO / "experiments" / "gpu"

    from dalg.utils.atomic import write_json_atomic, write_text_atomic

    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    base = {
        "started": started,
        "dry_run": reason is not None,
        "command": " ".join(["benchmarks/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
        "environment": environment(profile),
        "profile": profile.__dict__,
        "checks_asked": names,
    }

    def write(results: list[dict[str, Any]], complete: bool) -> dict[str, Any]:
        report = {
            **base,
            "complete": complete,
            "checks": results,
            "all_ok": complete and all(r["status"] == "ok" for r in results),
            "total_seconds": round(time.perf_counter() - t0, 1),
        }
        write_json_atomic(report, out / "results.json")
        write_text_atomic(markdown(report), out / "results.md")
        return report

    results = run_checks(
        {n: CHECKS[n] for n in names},
        profile,
        args.budget_s,
        log=lambda s: print(s, file=sys.stderr, flush=True),
        check_timeout_s=args.check_timeout_s,
        on_result=lambda rows: write(rows, complete=False),
    )
    report = write(results, complete=True)
    print(markdown(report))
    print(f"wrote {out / 'results.json'} and results.md")
    return EXIT_OK if report["all_ok"] else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
