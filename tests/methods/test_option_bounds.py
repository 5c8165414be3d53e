"""Every numeric method option is bounded on both sides by what is meaningful (issue 29: options without upper
bounds ran into overflow, NaN losses or multi-GB allocations before anything said what was wrong)."""

from __future__ import annotations

import pytest

from pipeline.methods import MethodError, MethodSpec, list_methods, method_class


def method(name: str):  # noqa: ANN201 - a Method subclass
    return method_class(name)


def test_every_numeric_option_has_a_lower_and_an_upper_bound() -> None:
    unbounded = [f"{name}:{option}" for name in list_methods()
                 for option, allowed in method(name).option_ranges().items()
                 if option != "stage"  # checked against the student's stages (Method.stage_option, taps)
                 and ((allowed.le is None and allowed.lt is None) or (allowed.ge is None and allowed.gt is None))]
    assert not unbounded, f"options without both bounds: {unbounded}"


@pytest.mark.parametrize("spec, message", [
    ("kd:T=1e-320", "option 'T' must be >= 0.01 and <= 100, not 1e-320"),
    ("kd:alpha=1e308", "option 'alpha' must be >= 0 and <= 10000, not 1e+308"),
    ("wkd_f:hidden=1000000000", "option 'hidden' must be >= 1 and <= 8192"),
    ("tcs:rounds=1000000000", "option 'rounds' must be >= 1 and <= 1000"),
    ("wkd_l:sinkhorn_iters=100000000", "option 'sinkhorn_iters' must be >= 1 and <= 1000"),
    ("scalekd:heads=100000", "option 'heads' must be >= 1 and <= 64"),
    ("dkd:T=inf", "option 'T' must be >= 0.01 and <= 100, not inf"),
])
def test_an_option_beyond_its_bound_is_refused_in_one_line(spec: str, message: str) -> None:
    with pytest.raises(MethodError) as e:
        MethodSpec.parse(spec)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_published_defaults_lie_inside_the_bounds() -> None:
    for name in list_methods():
        for option, allowed in method(name).option_ranges().items():
            default = method(name).options()[option]
            assert allowed.contains(default), f"{name}:{option}={default}"
    MethodSpec.parse("wkd_l:weight=600,T=8")  # WKD-L's CIFAR-100 setting
