"""The `ops` command line. Heavy imports live inside the commands that need them."""

import json
from pathlib import Path

import typer

from diffusion.config import ConfigError, load_run_config

app = typer.Typer(help="Submit, watch and record diffusion experiments.", no_args_is_help=True)
config_app = typer.Typer(help="Job specs in configs/jobs/.", no_args_is_help=True)
app.add_typer(config_app, name="config")

JOBS_DIR = Path("configs/jobs")


def spec_path(name: str) -> Path:
    path = Path(name) if name.endswith((".yaml", ".yml")) else JOBS_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in JOBS_DIR.glob("*.yaml"))) or "none"
        raise typer.BadParameter(f"no job spec {path}; known: {known}", param_hint="NAME")
    return path


@config_app.command("list")
def config_list(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """The job specs, with their task and description."""
    from ruamel.yaml import YAML

    rows = []
    for path in sorted(JOBS_DIR.glob("*.yaml")):
        raw = YAML(typ="safe").load(path.read_text()) or {}
        rows.append({"name": path.stem, "task": (raw.get("run") or {}).get("task", "train"),
                     "description": " ".join(str(raw.get("description", "")).split())})
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("name", "task", "description")
    for row in rows:
        table.add_row(row["name"], row["task"], row["description"])
    Console().print(table)


@config_app.command("validate")
def config_validate(
    names: list[str] = typer.Argument(None, help="Spec names or paths; all of configs/jobs/ when omitted."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Validate job specs; one line per problem, exit 1 if any is invalid."""
    paths = [spec_path(name) for name in names] if names else sorted(JOBS_DIR.glob("*.yaml"))
    results = []
    for path in paths:
        try:
            load_run_config(path)
            results.append({"spec": str(path), "valid": True, "error": None})
        except ConfigError as exc:
            results.append({"spec": str(path), "valid": False, "error": str(exc)})
    if as_json:
        typer.echo(json.dumps(results, indent=2))
    else:
        for result in results:
            typer.echo(f"ok    {result['spec']}" if result["valid"] else f"error {result['error']}")
    if not all(result["valid"] for result in results):
        raise typer.Exit(1)
