"""Options several `distillery` commands share: choices, help texts and the checks run while parsing.

Every option's default is read from the config class, method or function that declares it (`default_of`, or
`source_default` for a function whose module imports torch), never restated here, and so is its help where a
config declares one (`Declared`); every option has help text (tests/flows/test_cli_listing.py walks them all).
Nothing here, nor in the command modules, imports torch, timm, faiss or zarr: the configs are torch-free
modules, and a command imports the library's heavy modules when it runs, so every help screen is quick.
"""

import ast
import functools
import importlib.util
from pathlib import Path
from typing import Any, Literal

import typer

from pipeline.data.datasets import BAD_IMAGE_POLICIES, dataset_help
from pipeline.options import check_device, help_of

# Choice-like options: typer lists the choices in --help and refuses anything else in one line.
OnBadImage = Literal[BAD_IMAGE_POLICIES]
CkaSource = Literal["auto", "logits", "features"]

DATASET_HELP = dataset_help()


def device_option(value: str) -> str:
    """--device: auto, cpu or a CUDA device this machine has, checked while the command line is parsed."""
    check_device(value)
    return value


def Device(help: str = "auto | cpu | cuda[:N] (checked against this machine)") -> typer.models.OptionInfo:  # noqa: A002,N802
    return typer.Option(help=help, callback=device_option, metavar="auto|cpu|cuda[:N]")


def Declared(config: type, name: str, *decls: str, **kwargs) -> typer.models.OptionInfo:  # noqa: N802
    """An option whose help is the one `config` declares for its field `name` (`help_of`): stated once, and
    shown by the Prefect UI too."""
    return typer.Option(*decls, help=help_of(config, name), **kwargs)


@functools.cache
def _module_source(module: str) -> ast.Module:
    return ast.parse(Path(importlib.util.find_spec(module).origin).read_text())


def _constant(tree: ast.Module, node: ast.expr) -> Any:
    """The value of a default written as a constant expression, or as a module constant bound to one."""
    if isinstance(node, ast.Name):
        for statement in tree.body:
            if isinstance(statement, ast.Assign) and any(isinstance(t, ast.Name) and t.id == node.id
                                                         for t in statement.targets):
                return _constant(tree, statement.value)
        raise TypeError(f"{node.id} is not a constant of its module")
    if not all(isinstance(n, (ast.Constant, ast.UnaryOp, ast.BinOp, ast.Tuple, ast.operator, ast.unaryop,
                              ast.expr_context)) for n in ast.walk(node)):
        raise TypeError(f"{ast.unparse(node)} is not a constant expression")
    return eval(compile(ast.Expression(node), "<default>", "eval"), {"__builtins__": {}})  # constants only


def source_constant(module: str, name: str) -> Any:
    """The module constant `name` of `module`, a constant expression read from its source (`source_default`)."""
    tree = _module_source(module)
    return _constant(tree, ast.Name(name))


def source_default(module: str, function: str, name: str) -> Any:
    """The default that `function` of `module` declares for its parameter `name`, read from the module's
    source, which is not imported (it imports torch or faiss): the option's default is still stated once.
    A default that is no constant expression (nor a module constant bound to one) is a TypeError when the
    command module is imported; tests/flows/test_cli_listing.py compares each with the imported function's."""
    tree = _module_source(module)
    found = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function)
    args = found.args
    positional = args.posonlyargs + args.args
    defaults = dict(zip([a.arg for a in positional[len(positional) - len(args.defaults):]], args.defaults))
    defaults.update((a.arg, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None)
    if name not in defaults:
        raise TypeError(f"{module}.{function} declares no default for {name}")
    return _constant(tree, defaults[name])
