"""The alternating schedule: each step trains one level only, and the other gets no gradient."""

import pytest
import torch

from xmoe.exit import BankConfig, ExitBank, phase_at
from xmoe.exit.report import accuracy_at, pareto


def test_phase_schedule():
    # warmup 3, then blocks of 2 steps: gm, gm, im, im, gm, ...
    phases = [phase_at(s, 3, 2) for s in range(10)]
    assert phases == ["warmup"] * 3 + ["gm", "gm", "im", "im", "gm", "gm", "im"]


def grads(module):
    return [p.grad is not None and bool(p.grad.abs().sum() > 0) for p in module.parameters()]


def test_each_phase_trains_only_its_level():
    torch.manual_seed(0)
    bank = ExitBank(BankConfig(d=8, num_classes=3, num_exits=3, lambdas=(0.1, 1.0), warmup=1,
                               alternate_every=1))  # fmt: skip
    h, y = torch.randn(32, 3, 8), torch.randint(0, 3, (32,))
    costs = torch.tensor([1 / 3, 2 / 3, 1.0])
    for step, phase in [(0, "warmup"), (1, "gm"), (2, "im")]:
        bank.zero_grad(set_to_none=True)
        loss, values = bank.loss(h, y, costs, step)
        loss.backward()
        member = bank.members[0]
        ims, gates = any(grads(member.ims)), any(grads(member.gates))
        base = any(grads(bank.baseline))
        if phase == "gm":
            assert gates and not ims and not base
        else:
            assert ims and base and not gates
        assert set(values) >= {"im_loss", "gm_loss", "oracle_exit"}


def test_accuracy_at_on_the_pareto_front():
    rows = [{"cost": 0.2, "accuracy": 0.5}, {"cost": 0.6, "accuracy": 0.7},
            {"cost": 0.8, "accuracy": 0.6}, {"cost": 1.0, "accuracy": 0.65}]  # fmt: skip
    assert [r["cost"] for r in pareto(rows)] == [0.2, 0.6]  # 0.8 and 1.0 are dominated
    assert accuracy_at(rows, 0.4) == pytest.approx(0.6)  # halfway between 0.5 and 0.7
    assert accuracy_at(rows, 0.9) == 0.7  # beyond the front: its best
    assert accuracy_at(rows, 0.1) is None
