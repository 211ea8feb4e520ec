"""EMA of weights: the update rule, validation on averaged weights, and its checkpoint state."""

from types import SimpleNamespace

import pytest
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
    ema.on_train_batch_end(_trainer(), m, None, None, 0)
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
    ema.on_train_batch_end(_trainer(), m, None, None, 0)
    restored = EMAWeights(decay=0.5)
    restored.load_state_dict(ema.state_dict())
    restored.on_fit_start(_trainer(), m)
    assert torch.equal(restored.shadow["weight"], ema.shadow["weight"])
    restored.on_fit_end(_trainer(), m)
    assert torch.equal(m.net.weight, ema.shadow["weight"])


def test_bad_decay_is_refused():
    with pytest.raises(ValueError, match="decay"):
        EMAWeights(decay=1.0)
