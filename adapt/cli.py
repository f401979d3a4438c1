"""The `adapt` command line: a thin layer over the Python API (heavy imports stay inside commands)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(help="Parameter-efficient adaptation of GLIP: one frozen core, many small task adapters.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@app.command("verify-reference")
def verify_reference(
    cases: Annotated[list[Path], typer.Argument(help="reference case folders (e.g. ../shared/reference/glip_t)")],
    threads: Annotated[int, typer.Option(help="CPU threads")] = 2,
) -> None:
    """Rebuild each case's official checkpoint, convert it, run it and compare every stage with the official outputs."""
    from backbone.verify import verify_case

    failed = 0
    for case in cases:
        try:
            report = verify_case(case, threads=threads)
        except (FileNotFoundError, ValueError, RuntimeError) as error:
            typer.echo(f"case {case}: ERROR {error}", err=True)
            failed += 1
            continue
        typer.echo(report.render())
        failed += not report.ok
    if failed:
        fail(f"{failed} of {len(cases)} reference case(s) failed", code=1)


@app.command()
def convert(
    source: Annotated[Path, typer.Argument(help="official GLIP checkpoint (.pth)")],
    target: Annotated[Path, typer.Argument(help="output .safetensors (our key names, config in the header)")],
) -> None:
    """Convert an official GLIP checkpoint into this toolkit's safetensors format (strict)."""
    from backbone.convert import CheckpointMismatchError, convert_file

    if not source.exists():
        fail(f"{source} does not exist")
    try:
        config = convert_file(source, target)
    except CheckpointMismatchError as error:
        fail(str(error))
    typer.echo(f"wrote {target} ({config.name}, {target.stat().st_size / 2**20:.1f} MiB)")


@app.command()
def detect(
    images: Annotated[list[Path], typer.Argument(help="image files")],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="categories, 'fish. shark. penguin'")],
    base: Annotated[str, typer.Option(help="checkpoint name or path")] = "glip-nano",
    threshold: Annotated[float, typer.Option(help="score threshold")] = 0.5,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="write COCO-style results here")] = None,
) -> None:
    """Zero-shot detection with a base model and a text prompt."""
    import json

    from backbone.detector import GLIPDetector

    detector = GLIPDetector.from_pretrained(base)
    results = []
    for index, (path, dets) in enumerate(zip(images, detector.detect([str(p) for p in images], prompt, threshold))):
        typer.echo(f"{path}: {len(dets)} detections")
        for box, score, name in zip(dets.boxes.tolist(), dets.scores.tolist(), dets.names):
            typer.echo(f"  {name:<20} {score:.3f}  [{', '.join(f'{v:.1f}' for v in box)}]")
        results += [dict(r, file=str(path), category=name) for r, name in zip(dets.to_coco(index), dets.names)]
    if json_out:
        json_out.write_text(json.dumps(results, indent=1))


@app.command()
def pretrain(
    preset: Annotated[str, typer.Option(help="glip-nano or glip-nano-a")] = "glip-nano",
    steps: Annotated[int, typer.Option(help="optimizer steps")] = 3000,
    batch_size: Annotated[int, typer.Option(help="images per step")] = 8,
    lr: Annotated[float, typer.Option(help="AdamW learning rate")] = 6e-4,
    seed: Annotated[int, typer.Option(help="seed of data, prompts and init")] = 0,
    out: Annotated[Path, typer.Option(help="run folder (checkpoints, metrics.jsonl)")] = Path("runs/pretrain"),
    weights: Annotated[Optional[Path], typer.Option(help="final weights file")] = None,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads")] = None,
    eval_every: Annotated[int, typer.Option(help="held-in evaluation every N steps")] = 500,
    resume: Annotated[bool, typer.Option(help="continue the run in --out if it has a checkpoint")] = True,
) -> None:
    """Pretrain glip-nano(-a) on the icon world with GLIP's grounding objective (CPU: about 1-2 s per step)."""
    import json

    from adapt.pretrain import PretrainConfig, pretrain as run

    summary = run(PretrainConfig(preset=preset, steps=steps, batch_size=batch_size, lr=lr, seed=seed, out_dir=out,
                                 weights_out=weights, threads=threads, eval_every=eval_every, resume=resume,
                                 data_root=_data_root()))
    typer.echo(json.dumps(summary, indent=1))


def _data_root() -> Optional[Path]:
    """$ADAPT_DATA (read here only: library code takes the root as an argument)."""
    import os

    return Path(os.environ["ADAPT_DATA"]) if os.environ.get("ADAPT_DATA") else None


def _register_subapps() -> None:
    from adapt.cli_tasks import tasks_app

    app.add_typer(tasks_app, name="tasks", help="List, inspect, fetch and render detection tasks.")


def main() -> None:
    _register_subapps()
    app()


if __name__ == "__main__":
    main()
