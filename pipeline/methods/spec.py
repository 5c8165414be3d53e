"""A method as a run names it, parsed once: ``kd:T=2,alpha=0.5`` -> :class:`MethodSpec`.

The spec string (``name`` or ``name:key=value,...``) is what a user writes (``--method``, a sweep file, an
experiment's row) and what a run records (config.json, summary.json, its directory name). It is parsed into
a :class:`MethodSpec` once, when the student it belongs to is configured (`pipeline.train.config.StudentSpec`):
the registered class, the given options typed by their defaults and checked against their declared ranges.
Everything after that asks the spec (what it builds, which student stages it taps, whether it trains the
classifier, what it needs from the cache) instead of parsing the string again.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from pydantic_core import core_schema

from .registry import MethodError, method_class

if TYPE_CHECKING:  # a spec is parsed (its method's module imported) without importing torch up front
    from .base import CacheInfo, Method, StudentInfo

OptionValue = bool | int | float | str


@dataclass(frozen=True)
class MethodSpec:
    """One method of a run: its spec ``text`` as written, the registered ``method`` class and the given
    ``options``, typed and range-checked. ``str(spec)`` is the text, so a parsed spec round-trips
    (``MethodSpec.parse(str(spec)) == spec``) and a run's records keep the user's spelling; two specs are equal
    when their text is. As a pydantic field it is validated from that text and serialised back to it."""

    text: str
    method: type[Method] = field(compare=False, repr=False)
    options: Mapping[str, OptionValue] = field(compare=False)

    @classmethod
    def parse(cls, text: str) -> MethodSpec:
        """:class:`MethodError` (one line) for an empty name, a malformed or repeated option, an unknown method
        or option, a value of the wrong type, or one outside the option's declared range."""
        name, _, rest = text.strip().partition(":")
        name = name.strip()
        if not name:
            raise MethodError(f"empty method name in spec {text!r}; expected name or name:key=value,...")
        method = method_class(name)
        defaults = method.options()
        raw: dict[str, str] = {}
        for item in filter(None, (s.strip() for s in rest.split(","))):
            key, sep, value = (s.strip() for s in item.partition("="))
            if not sep or not key:
                raise MethodError(f"bad option {item!r} in method spec {text!r}; expected key=value")
            if key in raw:
                raise MethodError(f"option {key!r} given twice in method spec {text!r}")
            raw[key] = value
        unknown = sorted(raw.keys() - defaults.keys())
        if unknown:
            valid = ", ".join(f"{k}={v!r}" for k, v in defaults.items()) or "none"
            raise MethodError(f"method {name!r} has no option{'s' if len(unknown) > 1 else ''} "
                              f"{', '.join(map(repr, unknown))}; valid options: {valid}")
        options = {key: _convert(name, key, value, defaults[key]) for key, value in raw.items()}
        ranges = method.option_ranges()
        for key, value in options.items():
            if key in ranges:
                ranges[key].check(f"method {name!r}: option {key!r}", value, MethodError)
        return cls(text, method, MappingProxyType(options))

    def __str__(self) -> str:
        return self.text

    @property
    def name(self) -> str:
        return self.method.name

    @property
    def needs(self) -> frozenset[str]:
        """The cached targets the method reads (none: it never reads the teacher, as ``ce``)."""
        return self.method.needs

    @property
    def taps(self) -> tuple[int, ...]:
        """The student stages the method reads (indices from the deepest, ``-1``)."""
        return self.method.taps_for(self.options)

    @property
    def trains_classifier(self) -> bool:
        """Whether the method's loss reaches the student's classifier (`Method.trains_classifier`)."""
        return self.method.trains_classifier(self.options)

    def build(self, cache: CacheInfo, student: StudentInfo) -> Method:
        """The method module for this cache and student (:class:`MethodError` for a cache missing a target)."""
        return self.method(cache, student, **self.options)

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> core_schema.CoreSchema:
        # Validated from its text (a parsed spec passes as is), serialised back to it: JSON stays a string.
        return core_schema.no_info_plain_validator_function(
            cls._validate, json_schema_input_schema=core_schema.str_schema(),
            serialization=core_schema.plain_serializer_function_ser_schema(str))

    @classmethod
    def _validate(cls, value: Any) -> MethodSpec:
        if isinstance(value, MethodSpec):
            return value
        if not isinstance(value, str):
            raise MethodError(f"a method spec is a string such as kd:T=2, not {value!r}")
        return cls.parse(value)


def _convert(method: str, key: str, raw: str, default: OptionValue) -> OptionValue:
    # The default's type decides the parse, so `T=2` yields 2.0 and `alpha=abc` fails here, not mid-run.
    kind = type(default)
    try:
        if kind is bool:
            return {"true": True, "1": True, "false": False, "0": False}[raw.lower()]
        return kind(raw)
    except (KeyError, ValueError):
        raise MethodError(f"option {key!r} of method {method!r} expects {kind.__name__}, got {raw!r}") from None


def create_method(spec: str | MethodSpec, cache: CacheInfo, student: StudentInfo) -> Method:
    """Build the method a spec (``name`` or ``name:key=value,...``, parsed or not) names for ``cache``;
    :class:`MethodError` as :meth:`MethodSpec.parse` and :meth:`MethodSpec.build` raise it."""
    return MethodSpec._validate(spec).build(cache, student)
