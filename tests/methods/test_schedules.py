import math

import pytest

from pipeline.methods import TrainingProgress
from pipeline.methods.schedules import cosine_decay


def every_step(epochs: int, steps: int):
    return [TrainingProgress(epoch=e, step=s, steps_per_epoch=steps, total_epochs=epochs)
            for e in range(epochs) for s in range(steps)]


@pytest.mark.parametrize("start", [0.0, 3.0, 5.5])
def test_constant_then_half_cosine_to_zero(start):
    epochs, steps = 10, 4
    factors = [cosine_decay(p, start) for p in every_step(epochs, steps)]
    times = [p.epoch_float for p in every_step(epochs, steps)]
    assert all(f == 1.0 for f, t in zip(factors, times) if t <= start)
    assert all(a >= b for a, b in zip(factors, factors[1:]))
    # Halfway through the decay window the factor is one half; one step before the end it is nearly 0.
    mid = start + (epochs - start) / 2
    assert [f for f, t in zip(factors, times) if t == mid] == [pytest.approx(0.5)]
    remaining = (epochs - times[-1]) / (epochs - start)
    assert factors[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * (1 - remaining))))
    assert factors[-1] < 0.01


def test_start_at_or_after_the_end_keeps_the_weight():
    assert {cosine_decay(p, 10.0) for p in every_step(10, 3)} == {1.0}
    assert {cosine_decay(p, 25.0) for p in every_step(10, 3)} == {1.0}


def test_negative_start_is_an_error():
    with pytest.raises(ValueError, match="start_epoch"):
        cosine_decay(every_step(1, 1)[0], -1.0)
