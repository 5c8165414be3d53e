import pytest
import torch

from pipeline.methods import (
    LOGITS,
    POOLED,
    TARGETS,
    CacheInfo,
    Method,
    MethodError,
    StudentInfo,
    StudentOutputs,
    TrainingProgress,
    MethodSpec,
    create_method,
    list_methods,
    register_method,
)

FULL = CacheInfo(num_classes=10, pooled_dim=16, available=frozenset({LOGITS, POOLED}))
NO_LOGITS = CacheInfo(num_classes=10, pooled_dim=16, available=frozenset({POOLED}))


def test_builtin_methods_registered():
    assert {"ce", "kd", "dkd", "fitnet", "wkd_l", "wkd_f"} <= set(list_methods())


def test_method_names_are_the_method_modules_each_registering_its_own_name():
    """`METHOD_NAMES` (what the CLI lists without importing torch) is every method module, and each registers the
    method of its name when the registry imports it."""
    from pathlib import Path

    from pipeline.methods import METHOD_NAMES, method_class

    package = Path(__file__).resolve().parents[2] / "pipeline" / "methods"
    helpers = {"__init__", "base", "registry", "schedules", "spec"}
    assert sorted(METHOD_NAMES) == sorted(p.stem for p in package.glob("*.py") if p.stem not in helpers)
    assert all(method_class(name).__module__ == f"pipeline.methods.{name}" for name in METHOD_NAMES)
    assert list_methods() == sorted(list_methods())


def test_spec_options_parsed_by_default_type():
    kd = create_method("kd:T=2,alpha=0.5", FULL, StudentInfo(pooled_dim=8))
    assert kd.T == 2.0 and isinstance(kd.T, float)
    assert kd.alpha == 0.5
    assert create_method(" kd ", FULL, StudentInfo(pooled_dim=8)).T == 4.0


def test_parse_spec_types_the_given_options_and_keeps_the_text():
    from pipeline.methods.dkd import DKD

    plain = MethodSpec.parse("dkd")
    assert (plain.name, plain.method, dict(plain.options)) == ("dkd", DKD, {})
    spaced = MethodSpec.parse("dkd: beta = 0.5 , T=1")
    assert spaced.name == "dkd" and dict(spaced.options) == {"beta": 0.5, "T": 1.0}
    assert str(spaced) == "dkd: beta = 0.5 , T=1" and MethodSpec.parse(str(spaced)) == spaced  # round trip
    assert spaced != MethodSpec.parse("dkd:beta=0.5,T=1")  # a run records the text as written


def test_a_spec_says_what_it_builds_taps_and_trains_without_a_cache():
    kd, wkd_f, tcs = (MethodSpec.parse(s) for s in ("kd:T=2", "wkd_f:stage=-2", "tcs"))
    assert kd.needs == {LOGITS} and kd.taps == () and kd.trains_classifier
    assert wkd_f.taps == (-2,) and not wkd_f.trains_classifier and not tcs.trains_classifier
    assert MethodSpec.parse("ce").needs == frozenset()
    built = kd.build(FULL, StudentInfo(pooled_dim=8))
    assert built.T == 2.0 and create_method(kd, FULL, StudentInfo(pooled_dim=8)).T == 2.0


def test_a_spec_is_a_string_in_a_pydantic_model_parsed_once():
    from pipeline.train.config import StudentSpec

    spec = StudentSpec(student="test_resnet", methods=["ce", "kd:T=2"])
    assert all(isinstance(m, MethodSpec) for m in spec.methods) and spec.methods[1].options["T"] == 2.0
    assert spec.model_dump(mode="json")["methods"] == ["ce", "kd:T=2"]
    assert StudentSpec.model_json_schema()["properties"]["methods"]["items"] == {"type": "string"}


def one_line_error(spec, cache=FULL):
    with pytest.raises(MethodError) as info:
        create_method(spec, cache, StudentInfo(pooled_dim=8))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_unknown_method_lists_known():
    message = one_line_error("nope")
    assert "'nope'" in message
    for name in list_methods():
        assert name in message


def test_unknown_key_lists_valid_keys():
    message = one_line_error("kd:tau=2")
    assert "'tau'" in message and "T=4.0" in message and "alpha=1.0" in message


@pytest.mark.parametrize("spec", ["kd:T=hot", "kd:T", "kd:T=1,T=2", ":T=1"])
def test_malformed_specs(spec):
    one_line_error(spec)


@pytest.mark.parametrize("spec", ["kd", "dkd"])
def test_missing_logits_names_the_cache_option(spec):
    message = one_line_error(spec, NO_LOGITS)
    assert f"method '{spec}' needs teacher logits" in message
    assert "distillery cache" in message and "--logits dense|topk:K" in message


def test_missing_pooled():
    cache = CacheInfo(num_classes=10, pooled_dim=None, available=frozenset({LOGITS}))
    message = one_line_error("fitnet", cache)
    assert "teacher pooled features" in message and "distillery cache" in message


def test_direct_construction_checks_the_cache_too():
    from pipeline.methods.kd import KD

    with pytest.raises(MethodError):
        KD(NO_LOGITS, 8)


def test_every_target_names_itself_and_the_cache_option_producing_it():
    for name, target in TARGETS.items():
        assert target.name == name and target.description.startswith("teacher ") and target.cache_option
        assert target.layouts and all(layout for layout in target.layouts)


def test_cache_info_requires_pooled_dim_with_pooled():
    with pytest.raises(ValueError):
        CacheInfo(num_classes=10, pooled_dim=None, available=frozenset({POOLED}))


def test_progress():
    p = TrainingProgress(epoch=2, step=25, steps_per_epoch=100, total_epochs=10)
    assert p.epoch_float == pytest.approx(2.25)
    assert p.fraction == pytest.approx(0.225)
    assert TrainingProgress(0, 0, 10, 5).fraction == 0.0
    with pytest.raises(ValueError):
        TrainingProgress(epoch=0, step=100, steps_per_epoch=100, total_epochs=1)


def test_registration_rejects_bad_declarations():
    class NoDefault(Method):
        name = "test_no_default"

        def __init__(self, cache, student, *, w: float):
            super().__init__(cache, student)

        def forward(self, student, targets, labels, progress):
            return {}

    class UnknownTarget(Method):
        name = "test_unknown_target"
        needs = frozenset({"teacher_thoughts"})

        def forward(self, student, targets, labels, progress):
            return {}

    for cls in (NoDefault, UnknownTarget):
        with pytest.raises(TypeError):
            register_method(cls)
    with pytest.raises(TypeError):
        register_method(type("Dup", (Method,), {"name": "kd", "forward": lambda *a: {}}))
    assert "test_no_default" not in list_methods()


def test_methods_compose_by_summing_terms():
    torch.manual_seed(0)
    methods = [create_method(s, FULL, StudentInfo(pooled_dim=8)) for s in ("ce", "kd", "dkd", "fitnet")]
    student = StudentOutputs(logits=torch.randn(4, 10), pooled=torch.randn(4, 8))
    targets = {LOGITS: torch.randn(4, 10), POOLED: torch.randn(4, 16)}
    labels = torch.randint(0, 10, (4,))
    progress = TrainingProgress(epoch=30, step=0, steps_per_epoch=10, total_epochs=40)
    terms = {}
    for method in methods:
        out = method(student, targets, labels, progress)
        assert not terms.keys() & out.keys()
        assert all(k.startswith(method.name) and v.ndim == 0 for k, v in out.items())
        terms.update(out)
    assert torch.isfinite(sum(terms.values()))


@pytest.mark.parametrize("spec, message", [
    ("kd:T=-1", "method 'kd': option 'T' must be >= 0.01 and <= 100, not -1.0"),
    ("kd:T=0", "method 'kd': option 'T' must be >= 0.01 and <= 100, not 0.0"),
    ("kd:alpha=-1", "method 'kd': option 'alpha' must be >= 0 and <= 10000, not -1.0"),
    ("kd:alpha=nan", "method 'kd': option 'alpha' must be >= 0 and <= 10000, not nan"),
    ("kd:T=inf", "method 'kd': option 'T' must be >= 0.01 and <= 100, not inf"),
    ("ce:label_smoothing=1.5", "method 'ce': option 'label_smoothing' must be >= 0 and <= 1, not 1.5"),
    ("dkd:warmup=-2", "method 'dkd': option 'warmup' must be >= 0 and <= 10000, not -2.0"),
    ("tcs:rounds=0", "method 'tcs': option 'rounds' must be >= 1 and <= 1000, not 0"),
    ("wkd_l:sinkhorn_reg=0", "method 'wkd_l': option 'sinkhorn_reg' must be >= 0.001 and <= 100, not 0.0"),
])
def test_option_outside_its_declared_range_is_one_line_before_anything_is_built(spec, message):
    with pytest.raises(MethodError) as info:
        MethodSpec.parse(spec)  # no cache, no student: refused from the spec alone
    assert str(info.value) == message


def test_every_numeric_option_of_every_method_declares_a_range_its_default_lies_in():
    from pipeline.methods.base import _REGISTRY, _declared, _option_parameters
    from pipeline.options import Range

    for name in list_methods():
        for p in _option_parameters(_REGISTRY[name]):
            if type(p.default) in (int, float) and p.name != "stage":  # stages: Method.stage_option
                declared = _declared(p, Range)
                assert declared is not None and declared.contains(p.default), (name, p.name)


def test_a_method_declaring_a_default_outside_its_range_is_refused_at_registration():
    from typing import Annotated

    from pipeline.options import Range

    class Bad(Method):
        name = "bad_default_range"

        def __init__(self, cache, student, *, T: Annotated[float, Range(gt=0)] = 0.0) -> None:
            super().__init__(cache, student)

        def forward(self, student, targets, labels, progress):
            return {}

    with pytest.raises(TypeError, match="default 0.0 of option 'T' of method 'bad_default_range' is outside"):
        register_method(Bad)


def test_every_option_of_every_method_declares_its_meaning_and_an_undocumented_one_is_refused():
    from typing import Annotated

    from pipeline.methods.base import _REGISTRY
    from pipeline.options import Range

    for name in list_methods():
        helps = _REGISTRY[name].option_help()
        assert helps.keys() == _REGISTRY[name].options().keys() and all(helps.values()), name

    class Undocumented(Method):
        name = "undocumented_option"

        def __init__(self, cache, student, *, T: Annotated[float, Range(gt=0)] = 1.0) -> None:
            super().__init__(cache, student)

        def forward(self, student, targets, labels, progress):
            return {}

    with pytest.raises(TypeError, match="option 'T' of method 'undocumented_option' needs its meaning declared"):
        register_method(Undocumented)
