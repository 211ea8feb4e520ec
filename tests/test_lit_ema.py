"""EMA of weights: the update rule, validation on averaged weights, and its checkpoint state."""

from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from dalg.lit.ema import EMAWeights


class _Module(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(3, 2)


def _trainer(step=10, fn="fit"):
    return SimpleNamespace(global_step=step, state=SimpleNamespace(fn=fn))


def test_update_rule_and_swap():
    torch.manual_seed(0)
    m = _Module()
    ema = EMAWeights(decay=0.9)
    ema.on_fit_start(_trainer(), m)
    w0 = m.net.weight.detach().clone()
    with torch.no_grad():
        m.net.weight.add_(1.0)
    ema.on_train_batch_end(_trainer(step=11), m, None, None, 0)
    expected = 0.9 * w0 + 0.1 * (w0 + 1.0)
    assert torch.allclose(ema.shadow["weight"], expected)
    ema.on_validation_epoch_start(_trainer(), m)
    assert torch.allclose(m.net.weight, expected)
    ckpt = {"state_dict": {}}
    ema.on_save_checkpoint(_trainer(), m, ckpt)  # saved mid-validation: raw weights go in the checkpoint
    assert torch.allclose(ckpt["state_dict"]["net.weight"], w0 + 1.0)
    ema.on_validation_epoch_end(_trainer(), m)
    assert torch.allclose(m.net.weight, w0 + 1.0)


def test_state_roundtrip_and_apply_at_end():
    m = _Module()
    ema = EMAWeights(decay=0.5)
    ema.on_fit_start(_trainer(), m)
    with torch.no_grad():
        m.net.weight.mul_(3.0)
    ema.on_train_batch_end(_trainer(step=11), m, None, None, 0)
    restored = EMAWeights(decay=0.5)
    restored.load_state_dict(ema.state_dict())
    restored.on_fit_start(_trainer(), m)
    assert torch.equal(restored.shadow["weight"], ema.shadow["weight"])
    restored.on_fit_end(_trainer(), m)
    assert torch.equal(m.net.weight, ema.shadow["weight"])


def test_bad_decay_is_refused():
    with pytest.raises(ValueError, match="decay"):
        EMAWeights(decay=1.0)


def test_accumulation_micro_batches_do_not_update_the_average():
    # one optimiser step moved w from 0 to 1; the 4 micro-batches of the next accumulation window see w = 1 but
    # only the last of them ends with a step: one update, 0.5 (updating per micro-batch gave 1 - 0.5**4 = 0.9375)
    m = _Module()
    with torch.no_grad():
        m.net.weight.zero_()
    ema = EMAWeights(decay=0.5)
    ema.on_fit_start(_trainer(step=0), m)
    with torch.no_grad():
        m.net.weight.fill_(1.0)
    for step in (1, 1, 1, 1):  # global_step after each micro-batch: the step happened before this window
        ema.on_train_batch_end(_trainer(step=step), m, None, None, 0)
    assert torch.allclose(ema.shadow["weight"], torch.full_like(m.net.weight, 0.5))


class _Climb(pl.LightningModule):
    """One weight w = 0; loss -w per micro-batch: every optimiser step (SGD, lr 1) adds exactly 1 to w."""

    def __init__(self):
        super().__init__()
        self.net = nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            self.net.weight.zero_()

    def training_step(self, batch, batch_idx):
        return -self.net.weight.sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(8, 1), batch_size=1)


def test_ema_per_optimiser_step_under_accumulate_grad_batches_4(tmp_path):
    module = _Climb()
    ema = EMAWeights(decay=0.5, apply_at_end=False)
    trainer = pl.Trainer(
        accumulate_grad_batches=4,
        max_epochs=1,
        callbacks=[ema],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module)
    assert trainer.global_step == 2 and module.net.weight.item() == pytest.approx(2.0)
    # two updates: 0.5 * 0 + 0.5 * 1 = 0.5, then 0.5 * 0.5 + 0.5 * 2 = 1.25 (per micro-batch: 1.46875)
    assert ema.shadow["weight"].item() == pytest.approx(1.25)
