"""Run configs: resume identity, JSON round trips, option checks."""

from __future__ import annotations

import json

import pytest

from pipeline.errors import DistilleryError
from pipeline.options import OptionError
from pipeline.train.config import RunSettings, StudentSpec, TrainConfig, TrainError
from pipeline.train.optim import OptimConfig


def test_config_round_trips_through_json_and_identity_ignores_only_where_and_on_what() -> None:
    optim = OptimConfig(lr=0.1, clip_grad=1.0)
    cfg = TrainConfig(cache="c", student="s", methods=("ce", "kd"), out="o", settings=RunSettings(optim=optim))
    assert TrainConfig(**json.loads(json.dumps(cfg.to_dict()))) == cfg
    moved = TrainConfig(cache="c", student="s", methods=("ce", "kd"), out="elsewhere",
                        settings=RunSettings(optim=optim, device="cuda", resume=True, on_bad_image="skip"))
    assert moved.identity() == cfg.identity()
    other = TrainConfig(cache="c", student="s", methods=("ce", "kd"), out="o", settings=RunSettings(workers=2))
    assert other.identity() != cfg.identity()


@pytest.mark.parametrize("bad, message", [({"epochs": 0}, "--epochs must be >= 1 and <= 100000, not 0"),
                                          ({"epochs": -3}, "--epochs must be >= 1 and <= 100000, not -3"),
                                          ({"batch_size": 0}, "--batch-size must be >= 1 and <= 65536, not 0"),
                                          ({"seed": -1}, "--seed must be >= 0 and <= 4294967295, not -1"),
                                          ({"input_size": 4}, "--input-size must be >= 8 and <= 1024, not 4"),
                                          ({"input_size": 0}, "--input-size must be >= 8 and <= 1024, not 0"),
                                          ({"input_size": -5}, "--input-size must be >= 8 and <= 1024, not -5"),
                                          ({"workers": -1}, "--workers must be >= 0 and <= 64, not -1"),
                                          ({"eval_every": 0}, "--eval-every must be >= 1, not 0"),
                                          ({"on_bad_image": "ignore"},
                                           "--on-bad-image must be one of fail, skip, not 'ignore'")])
def test_bad_settings_are_one_line_errors(bad, message) -> None:
    with pytest.raises(DistilleryError) as info:
        RunSettings(**bad)
    assert str(info.value) == message


@pytest.mark.parametrize("bad, message", [({"lr": float("nan")}, "--lr must be > 0 and <= 10, not nan"),
                                          ({"lr": float("inf")}, "--lr must be > 0 and <= 10, not inf"),
                                          ({"lr": -0.1}, "--lr must be > 0 and <= 10, not -0.1"),
                                          ({"lr": 0.0}, "--lr must be > 0 and <= 10, not 0.0"),
                                          ({"weight_decay": -1.0}, "--weight-decay must be >= 0 and <= 10, not -1.0"),
                                          ({"warmup_epochs": float("nan")}, "--warmup-epochs must be >= 0 and <= 100000, not nan"),
                                          ({"clip_grad": 0.0}, "--clip-grad must be > 0 and <= 10000, not 0.0"),
                                          ({"momentum": 1.0}, "--momentum must be >= 0 and < 1, not 1.0")])
def test_bad_optimiser_settings_are_one_line_errors(bad, message) -> None:
    with pytest.raises(OptionError) as info:
        OptimConfig(**bad)
    assert str(info.value) == message


def test_a_student_needs_a_method() -> None:
    with pytest.raises(TrainError, match="has no --method"):
        StudentSpec(student="resnet18", methods=())
