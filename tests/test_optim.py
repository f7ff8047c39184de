"""optim.lr_factor: the learning-rate schedule as a table of hand-computed values."""

import math

import pytest

from qlora_kit.config import TrainConfig
from qlora_kit.train.optim import lr_factor

# steps=10, warmup_steps=2: warmup multiplies by (step + 1) / 3, then progress = (step - 2) / 8 decays to 0.
TABLE = [
    ("cosine", 0, 1 / 3), ("cosine", 1, 2 / 3), ("cosine", 2, 1.0), ("cosine", 4, (1 + math.cos(math.pi / 4)) / 2),
    ("cosine", 6, 0.5), ("cosine", 10, 0.0), ("cosine", 12, 0.0),  # past the end: stays at 0
    ("linear", 0, 1 / 3), ("linear", 2, 1.0), ("linear", 4, 0.75), ("linear", 6, 0.5), ("linear", 10, 0.0),
    ("linear", 12, 0.0),
    ("constant", 0, 1 / 3), ("constant", 1, 2 / 3), ("constant", 2, 1.0), ("constant", 9, 1.0),
]


@pytest.mark.parametrize("schedule,step,expected", TABLE)
def test_lr_factor_table(schedule, step, expected):
    cfg = TrainConfig(steps=10, warmup_steps=2, schedule=schedule)
    assert lr_factor(step, cfg) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_no_warmup_starts_at_the_peak(schedule):
    assert lr_factor(0, TrainConfig(steps=5, warmup_steps=0, schedule=schedule)) == 1.0
