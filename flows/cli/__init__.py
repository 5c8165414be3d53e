"""The `distillery` command line (docs/ARCHITECTURE.md#command-line-contract: these spellings are a contract scripts rely on).

One module per command group (`teacher`, `students`, `lab`, `deploy`), each a `typer.Typer` named `group`,
imported only when one of its commands is used (`lazy.LazyGroup`), whose commands parse their options, make one library or flow call and print; `display` prints, `options`
holds what several commands share. `main` turns every error a user can fix into one line on stderr, exit 2.
"""

import os
import sys
from importlib.metadata import version
from typing import Annotated

from flows.server import default_prefect_home

default_prefect_home()  # before anything imports Prefect, which reads PREFECT_HOME once
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Prefect's console logs would tear through the progress display and print a traceback before the one-line
# error of bad input; the server keeps every log line (flow, task and library) and the CLI prints results.
os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
# Prefect waits 20 s for its temporary server; a busy machine (a shared CI runner, a teacher pass beside it)
# has been measured to need more, and a timed-out start wastes the whole command.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")

import typer  # noqa: E402 - after the Prefect home is settled

from flows import signals  # noqa: E402
from flows.cli.display import fail  # noqa: E402
from flows.cli.lazy import LazyGroup  # noqa: E402

# The command groups (teacher, students, lab, deploy: `lazy.GROUP_MODULES`) are imported when one of their
# commands runs or shows its help, so `distillery --help` imports neither torch nor Prefect.
app = typer.Typer(cls=LazyGroup, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Distillery: teach once, distill many.")


def print_version(value: bool) -> None:
    """--version: the installed package's version (what `pip show distillery` says), then exit."""
    if value:
        print(version("distillery"))
        raise typer.Exit()


@app.callback()
def distillery(
    show_version: Annotated[bool, typer.Option("--version", help="print the version and exit", is_eager=True,
                                               callback=print_version)] = False,
) -> None:
    """Options before the command (`distillery --version`)."""



def main() -> None:
    # typer vendors click as typer._click; its usage errors would otherwise be a multi-line panel.
    from typer._click.exceptions import ClickException, NoArgsIsHelpError

    from pipeline.errors import DistilleryError, one_line

    try:
        with signals.installed():
            code = app(standalone_mode=False)
    except NoArgsIsHelpError:  # `distillery` alone: typer has printed the help screen, exit 2 as click does
        sys.exit(2)
    except DistilleryError as e:  # raised here or in a DataLoader worker (whose traceback torch folds into it)
        signal_code = signals.exit_code(e)  # a worker that Ctrl-C ended first
        if signal_code is not None:
            interrupted(signal_code)
        fail(one_line(e))
    except ClickException as e:  # an option typer cannot parse (`--views x`), an unknown command or option
        ctx = getattr(e, "ctx", None)
        # typer checks a Literal choice through pydantic, whose message starts "Value error, ".
        fail(f"{e.format_message().replace('Value error, ', '')} (see `{ctx.command_path if ctx else 'distillery'} "
             f"--help`)")
    except ModuleNotFoundError as e:
        if e.name != "faiss":
            raise
        # faiss is an extra (`cpu` or `gpu`, alternatives installing one module), so an install may lack it.
        fail("faiss is not installed: install distillery with one of its faiss extras, "
             "pip install -c constraints.txt '.[cpu]' (or '.[gpu]' on a CUDA machine)")
    except typer.Abort:  # Ctrl-C outside a flow
        sys.exit(130)
    except BaseException as e:  # Ctrl-C, SIGTERM (`signals`; inside a flow run as Prefect re-raises it)
        signal_code = signals.exit_code(e)
        if signal_code is None:
            raise
        interrupted(signal_code)
    sys.exit(code if isinstance(code, int) else 0)


def interrupted(code: int) -> None:
    """The one line of a command a signal ended (`signals`), exit 128 + the signal."""
    sys.stdout.flush()
    command = next((arg for arg in sys.argv[1:] if not arg.startswith("-")), "")
    print(signals.interrupted_line(command), file=sys.stderr, flush=True)
    sys.exit(code)
