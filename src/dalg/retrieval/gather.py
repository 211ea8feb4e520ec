"""Descriptor collection for the evaluation engine: what ``validation_step`` returns, kept per evaluation set,
then gathered from every process and put in dataset order.

``validation_step`` returns ``{"descriptors", "index"}`` (the index into the set: queries first, then the
database). :class:`DescriptorBuffer` keeps them per dataloader; :func:`gather_by_index` concatenates every
process's share (``torch.distributed``), drops the repeats a padding sampler adds and refuses a set with a missing
image (:func:`assemble_by_index`).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
import torch.distributed as dist


def assemble_by_index(
    index: np.ndarray | torch.Tensor, desc: np.ndarray | torch.Tensor, n: int
) -> np.ndarray:
    """Descriptors in dataset order ``0..n-1`` from (index, descriptor) pairs gathered from all processes.

    Repeated indices (a ``DistributedSampler`` pads with repeats) keep their first occurrence; an index
    outside ``[0, n)`` or any missing index raises, naming them.
    """
    index = index.cpu().numpy() if isinstance(index, torch.Tensor) else np.asarray(index)
    desc = desc.cpu().numpy() if isinstance(desc, torch.Tensor) else np.asarray(desc)
    index = index.astype(np.int64).reshape(-1)
    if desc.ndim != 2 or desc.shape[0] != index.shape[0]:
        raise ValueError(f"{index.shape[0]} indices but descriptors of shape {desc.shape}")
    bad = (index < 0) | (index >= n)
    if bad.any():
        raise ValueError(f"dataset indices outside [0, {n}): {np.unique(index[bad])[:5].tolist()}")
    uniq, first = np.unique(index, return_index=True)
    if uniq.size != n:
        missing = np.setdiff1d(np.arange(n), uniq)
        raise RuntimeError(
            f"descriptors missing for {missing.size} of {n} images (first indices {missing[:5].tolist()})"
        )
    return np.ascontiguousarray(desc[first], dtype=np.float32)  # np.unique sorts: row i is index i


def _all_gather_rows(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Concatenate a 1-D or 2-D tensor from every process in rank order; row counts may differ, and a process
    with no rows may hold a placeholder width (the widest one is used)."""
    world = dist.get_world_size()
    t = t.to(device)
    shape = torch.tensor([t.shape[0], t.shape[1] if t.ndim == 2 else 0], device=device, dtype=torch.long)
    shapes = [torch.zeros_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape)
    most = int(max(s[0].item() for s in shapes))
    width = int(max(s[1].item() for s in shapes))
    padded = torch.zeros((most, width) if t.ndim == 2 else (most,), dtype=t.dtype, device=device)
    if t.shape[0]:
        padded[: t.shape[0]] = t
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s[0].item())] for p, s in zip(parts, shapes)]).cpu()


def gather_by_index(
    index: torch.Tensor, desc: torch.Tensor, n: int, device: torch.device | str = "cpu"
) -> np.ndarray:
    """All descriptors of a set, in dataset order ``0..n-1``, from every process.

    Under ``torch.distributed`` each process contributes what it extracted; repeated indices (the padding of
    ``DistributedSampler``) collapse to one, and a missing index raises. ``device`` is where the collective
    runs (the module's device: NCCL needs CUDA tensors, gloo takes CPU ones).
    """
    index = index.reshape(-1).long()
    desc = desc.float()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        index = _all_gather_rows(index, device)
        desc = _all_gather_rows(desc, device)
    return assemble_by_index(index, desc, n)


class DescriptorBuffer:
    """The ``{"index", "descriptors"}`` that ``validation_step`` returns, kept on the CPU per dataloader (= per
    evaluation set). Outputs that are not descriptors (``None``: the classification hold-out) are skipped."""

    def __init__(self) -> None:
        self._chunks: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)

    def add(self, outputs, dataloader_idx: int = 0) -> None:
        if not outputs:
            return
        self._chunks[dataloader_idx].append(
            (outputs["index"].detach().cpu(), outputs["descriptors"].detach().cpu())
        )

    def has(self, dataloader_idx: int) -> bool:
        return bool(self._chunks.get(dataloader_idx))

    def tensors(self, dataloader_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(index, descriptors)`` of one dataloader; empty ``(0,)`` / ``(0, D)`` tensors when it gave none."""
        chunks = self._chunks.get(dataloader_idx, [])
        if not chunks:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, 1)
        return torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])

    def clear(self) -> None:
        self._chunks.clear()
