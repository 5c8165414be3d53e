"""What the `distillery` command line shows: the console, tables, warnings, the one error line, progress.

Results go to stdout (a table a script may read), warnings and errors to stderr. Progress is a live rich
bar per running loop on a terminal; without one (a log, `> file`, a scheduled run) plain lines instead.
"""

import sys

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from pipeline import progress

console = Console(width=None if sys.stdout.isatty() else 140)


class RateColumn(ProgressColumn):
    def render(self, task) -> Text:  # noqa: ANN001 - rich's Task
        unit = task.fields.get("unit", "it")
        return Text(f"{task.speed:,.0f} {unit}/s" if task.speed else f"- {unit}/s", style="cyan")


class RichReporter:
    """`pipeline.progress` reporter drawing one rich bar per running loop (samples/s, ETA)."""

    def __init__(self, display: Progress) -> None:
        self.display = display
        self.ids: dict[str, int] = {}

    def start(self, key: str, description: str, total: int, unit: str) -> None:
        # Descriptions are plain text: a run's "[ce+kd]" is not rich markup.
        self.ids[key] = self.display.add_task(escape(description), total=total, unit=unit)

    def advance(self, key: str, amount: int) -> None:
        self.display.advance(self.ids[key], amount)

    def finish(self, key: str) -> None:
        self.display.remove_task(self.ids.pop(key))


def plain_line(text: str) -> None:
    """One progress line on stdout, as plain text (a run's "[ce+kd]" is not rich markup)."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)


class show_progress:
    """Context manager wiring the library's progress hooks to the console: a live rich bar per running loop on
    a terminal; without one (a log, `> file`, a scheduled run, where a redrawn bar shows nothing until the
    end) `pipeline.progress.LineReporter`'s plain lines, one per loop every 10 s and one when it ends."""

    def __enter__(self) -> None:
        self.display = None
        if console.is_terminal:
            self.display = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                    RateColumn(), TimeRemainingColumn(elapsed_when_finished=True),
                                    console=console, transient=True)
            self.display.__enter__()
        progress.set_reporter(RichReporter(self.display) if self.display else progress.LineReporter(plain_line))

    def __exit__(self, *exc: object) -> None:
        progress.set_reporter(None)
        if self.display is not None:
            self.display.__exit__(*exc)


def print_table(title: str, rows: list[dict], columns: list[str] | None = None) -> None:
    table = Table(title=title, title_justify="left")
    columns = columns or (list(rows[0]) if rows else [])
    for c in columns:
        table.add_column(c, justify="right" if rows and isinstance(rows[0].get(c), (int, float)) else "left")
    for r in rows:
        table.add_row(*[f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c]) for c in columns])
    console.print(table)


def report_skipped(where: str, skipped: list[str]) -> None:
    """One line on stderr for images left out under --on-bad-image skip (stdout may be a table)."""
    if skipped:
        more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        Console(stderr=True).print(f"skipped {len(skipped)} undecodable image(s) of {where}: "
                                   f"{', '.join(skipped[:3])}{more}", markup=False, highlight=False)


def warn(message: str | None) -> None:
    """A warning line on stderr (stdout may be a table a script reads)."""
    if message:
        Console(stderr=True).print(f"[yellow]warning:[/yellow] {escape(message)}", highlight=False, soft_wrap=True)


def fail(message: str) -> None:
    """The CLI's one error line on stderr, exit code 2."""
    Console(stderr=True).print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(2)
