"""`adapt tasks ...`: list, show, inspect, fetch and generate detection tasks.

The data root is `--root`, else `$ADAPT_DATA`, else the user cache dir (`tasks.default_data_root()`);
this module is the only place that reads the environment for it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn, Optional

import typer

from adapt.cli_config import CommandError, CommandGroup

tasks_app = typer.Typer(help="List, inspect, fetch and render detection tasks.", no_args_is_help=True,
                        add_completion=False, pretty_exceptions_enable=False, cls=CommandGroup)

ROOT_HELP = "Data root (default: $ADAPT_DATA, else ~/.cache/glip-adapt/data)."


def resolve_data_root(root: Optional[Path] = None) -> Path:
    """`--root`, else `$ADAPT_DATA`, else the user cache dir."""
    if root is not None:
        return root.expanduser()
    env = os.environ.get("ADAPT_DATA")
    if env:
        return Path(env).expanduser()
    from tasks import default_data_root

    return default_data_root()


def _fail(message: str) -> NoReturn:
    """A task that cannot be listed, shown or fetched: one `error:` line, exit status 1."""
    raise CommandError(message, code=1)


def _get(name: str, root: Path):
    import tasks

    try:
        return tasks.get_task(name, data_root=root)
    except (KeyError, FileNotFoundError, ValueError) as e:
        _fail(str(e))


@tasks_app.command("list")
def list_command(suite: Optional[str] = typer.Option(None, help="odinw13, odinw35, icons or user."),
                 root: Optional[Path] = typer.Option(None, help=ROOT_HELP)) -> None:
    """List the registered tasks and whether their data is on disk."""
    import tasks

    data_root = resolve_data_root(root)
    names = tasks.list_tasks(suite)
    if not names:
        _fail(f"no tasks in suite {suite!r}; suites: odinw13, odinw35, icons, user")
    typer.echo(f"data root: {data_root}")
    typer.echo(f"{'name':34} {'suite':8} {'cats':>4}  {'data':9} source")
    for name in names:
        task = tasks.get_task(name, data_root=data_root)
        status = "on disk" if task.is_available() else ("generate" if task.generate else "fetch")
        typer.echo(f"{name:34} {task.suite:8} {len(task.categories):>4}  {status:9} {task.source}")


@tasks_app.command("show")
def show_command(name: str = typer.Argument(..., help="Task name, task file (.yaml/.json) or dataset folder."),
                 render: int = typer.Option(0, help="Write a contact sheet of this many samples."),
                 out: Optional[Path] = typer.Option(None, help="PNG path for --render (default: <name>.png)."),
                 split: Optional[str] = typer.Option(None, help="Split to render (default: train, else the first)."),
                 cell: int = typer.Option(256, help="Tile size of the contact sheet in pixels."),
                 columns: Optional[int] = typer.Option(None, help="Tiles per row of the contact sheet."),
                 colors: Optional[int] = typer.Option(None, help="Quantize the sheet to this many colours."),
                 root: Optional[Path] = typer.Option(None, help=ROOT_HELP)) -> None:
    """Show a task's categories, prompt, splits and data location; optionally render samples."""
    from tasks import DataError, DataNotFoundError

    task = _get(name, resolve_data_root(root))
    typer.echo(f"{task.name}  [{task.suite}]  {task.description}")
    typer.echo(f"source: {task.source}")
    typer.echo(f"data:   {task.root}  ({'on disk' if task.is_available() else 'missing: ' + task.how_to_get()})")
    typer.echo(f"splits: {', '.join(task.splits)}  (evaluated on: {task.eval_split})")
    typer.echo(f"categories ({len(task.categories)}):")
    for k, cat in enumerate(task.categories):
        extra = f"   prompt: {cat.prefix!r} + {cat.prompt_phrase!r} + {cat.suffix!r}" if cat.has_description else ""
        typer.echo(f"  {k:3d} {cat.name}{extra}")
    typer.echo(f"prompt: {task.prompt(use_descriptions=True)[0]!r}")
    if render <= 0:
        return
    from tasks.visualize import render_samples

    try:
        split_name = split or ("train" if "train" in task.splits else next(iter(task.splits)))
        dataset = task.split(split_name)
        path = render_samples(dataset, render, out or Path(f"{task.name}.png"), columns=columns, cell=cell,
                              colors=colors)
    except (DataNotFoundError, DataError, KeyError) as e:
        _fail(str(e).strip("'\""))
    typer.echo(f"wrote {path} ({min(render, len(dataset))} samples of {split_name}; {dataset.report.summary()})")


@tasks_app.command("inspect")
def inspect_command(name: str = typer.Argument(..., help="Dataset folder (COCO, Roboflow COCO, YOLO, Pascal VOC), "
                                                         "task name or task file."),
                    root: Optional[Path] = typer.Option(None, help=ROOT_HELP)) -> None:
    """Load every split and print the format, splits, categories, image and box counts, and every problem."""
    import warnings

    from tasks.formats.inspection import inspect_task

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        task = _get(name, resolve_data_root(root))
    splits = inspect_task(task)
    typer.echo(f"{task.name}: {task.source}")
    typer.echo(f"categories ({len(task.categories)}): {', '.join(task.category_names)}")
    typer.echo(f"{'split':10} {'images':>7} {'boxes':>7}  source")
    for s in splits:
        counts = f"{s.images:>7} {s.boxes:>7}" if s.error is None else f"{'-':>7} {'-':>7}"
        typer.echo(f"{s.name:10} {counts}  {s.source}" + ("  (did not load)" if s.error else ""))
    loaded = [s for s in splits if s.error is None]
    if loaded:
        typer.echo("boxes per category:")
        for cat in task.category_names:
            typer.echo(f"  {cat:24} " + "  ".join(f"{s.name} {s.boxes_per_category[cat]}" for s in loaded))
    problems = [str(w.message) for w in caught] + [f"{s.name}: {line}" for s in splits for line in s.problems]
    typer.echo(f"problems ({len(problems)}):" if problems else "problems: none")
    for line in problems:
        typer.echo(f"  {line}")


@tasks_app.command("fetch")
def fetch_command(name: str = typer.Argument(..., help="A downloadable task, e.g. aquarium."),
                  root: Optional[Path] = typer.Option(None, help=ROOT_HELP),
                  keep_archive: bool = typer.Option(False, help="Keep the downloaded zip after unpacking."),
                  endpoint: Optional[str] = typer.Option(None, help="Hub endpoint (default: $HF_ENDPOINT or the Hub).")
                  ) -> None:
    """Download and unpack a task's data into the data root (ODinW: Hub GLIPModel/GLIP, odinw_35/<Name>.zip)."""
    from tasks.fetch import FetchError, fetch_task

    data_root = resolve_data_root(root)
    task = _get(name, data_root)
    if task.fetch_file is None:
        _fail(f"task {task.name!r} is not downloadable. {task.how_to_get()}")
    try:
        result = fetch_task(task, data_root, endpoint=endpoint, keep_archive=keep_archive)
    except (FetchError, OSError) as e:
        _fail(str(e))
    state = f"downloaded (sha256 {result.archive_sha256})" if result.downloaded else "already present"
    typer.echo(f"{task.name}: {state} at {result.path}")


@tasks_app.command("generate")
def generate_command(names: Optional[list[str]] = typer.Argument(None, help="Icon tasks (default: all)."),
                     root: Optional[Path] = typer.Option(None, help=ROOT_HELP),
                     seed: int = typer.Option(0, help="Generation seed (scene i is a function of seed and i)."),
                     train: Optional[int] = typer.Option(None, help="Train images per task (default 200)."),
                     valid: Optional[int] = typer.Option(None, help="Valid images per task (default 100)."),
                     test: Optional[int] = typer.Option(None, help="Test images per task (default 200)."),
                     pretrain_corpus: int = typer.Option(0, help="Also write this many pretraining samples "
                                                         "to <root>/icons/pretrain-corpus-seed<seed>.")) -> None:
    """Generate the icon-world suite (OpenMoji, CC BY-SA 4.0) into <root>/icons/."""
    from tasks.icons import HELDIN, ICON_TASKS, IconWorld, generate_icon_task, write_pretrain_corpus
    from tasks.icons.suite import DEFAULT_SIZES, HELDIN_SIZES, task_dir

    data_root = resolve_data_root(root)
    names = names or list(ICON_TASKS) + [HELDIN]
    unknown = [n for n in names if n not in ICON_TASKS and n != HELDIN]
    if unknown:
        _fail(f"not icon tasks: {unknown}; icon tasks are {list(ICON_TASKS) + [HELDIN]}")
    overrides = {k: v for k, v in (("train", train), ("valid", valid), ("test", test)) if v is not None}
    world = IconWorld()
    for name in names:
        base = HELDIN_SIZES if name == HELDIN else DEFAULT_SIZES
        sizes = {k: overrides.get(k, v) for k, v in base.items()}
        folder = task_dir(data_root, name)
        existed = (folder / "dataset_info.json").is_file()
        generate_icon_task(name, folder, sizes=sizes, seed=seed, world=world, progress=True)
        typer.echo(f"{name}: {'already present' if existed else 'generated'} at {folder}")
    if pretrain_corpus > 0:
        out = data_root / "icons" / f"pretrain-corpus-seed{seed}"
        if out.exists():
            typer.echo(f"pretraining corpus already present at {out}")
        else:
            write_pretrain_corpus(out, pretrain_corpus, seed=seed, world=world, progress=True)
            typer.echo(f"pretraining corpus: {pretrain_corpus} samples at {out}")
