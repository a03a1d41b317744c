"""`tformer info`: versions, devices, threads and whether bf16 is fast here."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

from tformer_cli.device import machine_info


def info(as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON.")) -> None:
    """Show versions, the devices tformer can use, threads, and whether bf16 is fast here."""
    data = machine_info()
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    table = Table(title="tformer info", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    for key, value in data.items():
        table.add_row(key.replace("_", " "), str(value))
    Console().print(table)
