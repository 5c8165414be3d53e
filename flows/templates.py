"""`out` templates: a run directory per flow run (`{date}`, `{time}`, `{flow_run_name}`, `{flow_run_id}`),
checked where a run would fail on them (`template_fields`) and filled (`fill_template`). Prefect-free: the
command line fills them for a local run too, and `deploy --check` checks them without starting anything.
"""

import re
import string
from datetime import datetime, timezone

from pipeline.errors import DistilleryError

PLACEHOLDERS = ("date", "time", "flow_run_name", "flow_run_id")


class TemplateError(DistilleryError):
    """An `out` template that cannot be filled."""


def template_fields(template: str) -> list[str]:
    """The placeholders of an `out` template, each a bare known `{name}`; anything else is one line now, not a
    failed run each night: a stray brace, `{date!z}`, `{date:>3000000000}` (a 3 GB path), an unknown name."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise TemplateError(f"'{template}' is not a valid template ({e}); write a literal brace as {{{{ or }}}}") \
            from None
    known = ", ".join("{" + p + "}" for p in PLACEHOLDERS)
    fields = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in PLACEHOLDERS:
            raise TemplateError(f"unknown placeholder {{{name}}} in '{template}'; use {known}")
        if spec or conversion:
            raise TemplateError(f"placeholder {{{name}}} in '{template}' takes no !conversion or :format; "
                                f"write {{{name}}}")
        fields.append(name)
    return fields


def path_component(text: str) -> str:
    """`text` as one directory name: a flow run named `../../x` (names are free text) stays inside the
    template's root (`..-..-x`)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", text).lstrip(".") or "-"


def fill_template(template: str, start: datetime, flow_run_name: str, flow_run_id: str) -> str:
    """`template` filled for a run started at `start` (UTC) named `flow_run_name`."""
    template_fields(template)
    return template.format(date=start.strftime("%Y-%m-%d"), time=start.strftime("%H%M%S"),
                           flow_run_name=path_component(flow_run_name), flow_run_id=path_component(flow_run_id))


def local_path(template: str) -> str:
    """`template` filled for a run outside any flow (a command without a server to record it): starting now,
    named `local`."""
    if not template_fields(template):
        return template
    return fill_template(template, datetime.now(timezone.utc), "local", "local")
