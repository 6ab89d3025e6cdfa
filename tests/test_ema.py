import pytest
import torch
from torch import nn

from training.ema import EMA, batch_scaled_decay


def test_batch_scaled_decay_keeps_the_horizon_in_images():
    assert batch_scaled_decay(0.999, 32, 192) == pytest.approx(0.99983, abs=1e-5)
    assert batch_scaled_decay(0.999, 192, 192) == 0.999
    # same number of images -> same total shrink factor
    assert batch_scaled_decay(0.999, 32, 192) ** 6 == pytest.approx(0.999, rel=1e-12)


def test_warmup_then_constant():
    model = nn.Linear(2, 2)
    ema = EMA(model, decay=0.999)
    assert ema.current_decay() == pytest.approx(0.1)
    ema.updates = 10_000
    assert ema.current_decay() == 0.999
    assert EMA(model, 0.9, warmup=False).current_decay() == 0.9


def test_update_follows_the_formula_in_fp32_shadow():
    model = nn.Linear(3, 1).to(torch.bfloat16)
    ema = EMA(model, decay=0.9, warmup=False)
    start = {k: v.clone() for k, v in ema.shadow.items()}
    assert all(v.dtype == torch.float32 for v in ema.shadow.values())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for name, p in model.named_parameters():
        expected = 0.9 * start[name] + 0.1 * p.float()
        assert torch.allclose(ema.shadow[name], expected, atol=1e-6)


def test_state_dict_round_trip_and_copy_to():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    ema = EMA(model, decay=0.99)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()(torch.randn(4, 3))
        ema.update(model)
    restored = EMA(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)), decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 3 and restored.decay == 0.99
    target = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    restored.copy_to(target)
    for name, p in target.named_parameters():
        assert torch.equal(p, ema.shadow[name])
    assert torch.equal(target[1].running_mean, model[1].running_mean)


def test_mismatched_state_is_refused():
    ema = EMA(nn.Linear(2, 2), 0.9)
    with pytest.raises(ValueError, match="does not match"):
        ema.load_state_dict(EMA(nn.Linear(2, 3, bias=False), 0.9).state_dict())
