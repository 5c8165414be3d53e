"""The `distillery` group that imports a command's module only when that command runs or shows its help.

The command modules import no torch (their options read torch-free configs, `flows/cli/options.py`), yet
typer, pydantic and the configs cost a few tenths of a second each. `distillery --help` lists every command
from the modules' source (each `@group.command("NAME")` and its docstring, read with `ast`), so it imports none
of them; a module some code has already imported lists its registered commands instead (a command added at run
time is listed too).
"""

import ast
import functools
import importlib
import sys
from pathlib import Path

import typer
from typer._click import Command, Context, HelpFormatter
from typer.core import TyperCommand, TyperGroup

GROUP_MODULES = ("teacher", "students", "lab", "deploy")  # flows/cli/<name>.py, each a typer.Typer named `group`


def module_name(group: str) -> str:
    return f"{__package__}.{group}"


@functools.cache
def source_commands(group: str) -> dict[str, str]:
    """Command name -> docstring of the functions `group`'s module registers with `@group.command("NAME")`."""
    tree = ast.parse((Path(__file__).parent / f"{group}.py").read_text())
    found = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            for deco in node.decorator_list:
                if (isinstance(deco, ast.Call) and isinstance(deco.func, ast.Attribute) and deco.func.attr == "command"
                        and deco.args and isinstance(deco.args[0], ast.Constant)):
                    found[deco.args[0].value] = ast.get_docstring(node) or ""
    return found


def loaded_commands(group: str) -> dict[str, Command]:
    """The click commands of `group`'s module, imported now if it was not yet."""
    return typer.main.get_group(importlib.import_module(module_name(group)).group).commands


def listed_commands(group: str) -> dict[str, Command]:
    """Commands to list in the help: the real ones of an imported module, else stand-ins read from the source."""
    if module_name(group) in sys.modules:
        return loaded_commands(group)
    return {name: TyperCommand(name=name, help=doc) for name, doc in source_commands(group).items()}


class LazyGroup(TyperGroup):
    """The top-level group: its commands are those of the group modules, imported one at a time on demand."""

    @property
    def commands(self) -> dict[str, Command]:  # every command, each module imported (tests walk them all)
        return {name: cmd for group in GROUP_MODULES for name, cmd in loaded_commands(group).items()}

    @commands.setter
    def commands(self, value: dict[str, Command]) -> None:  # click's __init__ sets it; the modules hold them
        if value:
            raise TypeError("register commands on a group module's `group`, not on the top-level app")

    def list_commands(self, ctx: Context) -> list[str]:
        return [name for group in GROUP_MODULES for name in listed_commands(group)]

    def get_command(self, ctx: Context, cmd_name: str) -> Command | None:
        for group in GROUP_MODULES:
            if cmd_name in listed_commands(group):
                return loaded_commands(group).get(cmd_name)
        return None

    def format_help(self, ctx: Context, formatter: HelpFormatter) -> None:
        """The help screen, commands listed without importing their modules."""
        from typer import rich_utils

        listing = TyperGroup(name=self.name, params=self.params, help=self.help,
                             commands={n: c for g in GROUP_MODULES for n, c in listed_commands(g).items()})
        return rich_utils.rich_format_help(obj=listing, ctx=ctx, markup_mode=self.rich_markup_mode)
