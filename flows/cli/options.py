"""Options several `distillery` commands share: choices, help texts and the checks run while parsing.

Every option's default is read from the config class, method or function that declares it (`default_of`),
never restated here, and so is its help where a config declares one (`Declared`); every option has help text
(tests/flows/test_cli_listing.py walks them all).
"""

from typing import Literal

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
