"""`distillery deploy`: serve a deployment spec's flows (docs/operations.md#prefect-in-production)."""

from pathlib import Path
from typing import Annotated, Optional

import typer

from flows.cli.display import print_table

group = typer.Typer()


@group.command("deploy")
def deploy_cmd(
    spec: Annotated[Path, typer.Argument(help="deployment spec (TOML), e.g. deploy/nightly.toml")],
    check: Annotated[bool, typer.Option(help="only check the spec and list its deployments")] = False,
    limit: Annotated[Optional[int], typer.Option(help="most flow runs at once in this process")] = None,
) -> None:
    """Serve the spec's flows as deployments (schedules, event triggers) against PREFECT_API_URL."""
    from flows.deploy import load_spec, serve_spec

    if check:
        loaded = load_spec(spec)
        rows = [{"deployment": f"{d.flow_name}/{d.name}", "schedule": ", ".join(
            str(s.schedule.cron if hasattr(s.schedule, "cron") else s.schedule.interval) for s in d.schedules)
            or "-", "triggers": len(d.triggers)} for d in loaded.deployments]
        print_table(f"{spec}: {len(rows)} deployments", rows)
        return
    serve_spec(spec, limit)
