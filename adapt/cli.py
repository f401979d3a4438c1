"""The `adapt` command line: a thin layer over the Python API (heavy imports stay inside commands)."""
from __future__ import annotations

import typer

app = typer.Typer(help="Parameter-efficient adaptation of GLIP: one frozen core, many small task adapters.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)


def _register_subapps() -> None:
    from adapt.cli_tasks import tasks_app

    app.add_typer(tasks_app, name="tasks", help="List, inspect, fetch and render detection tasks.")


def main() -> None:
    _register_subapps()
    app()


if __name__ == "__main__":
    main()
