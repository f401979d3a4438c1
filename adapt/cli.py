"""The `adapt` command line: a thin layer over the Python API (heavy imports stay inside commands).

The options of training, pretraining and serving are the fields of their config dataclasses (adapt.cli_config binds
them); every failure of any command is one `error: ...` line (adapt.cli_config.CommandGroup).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer

from adapt import STRATEGIES
from adapt.cli_config import CommandError, CommandGroup, bind_options, build_command
from adapt.cli_tasks import resolve_data_root, tasks_app

# The two options every command that runs a model takes (resolved by backbone.device).
DeviceOption = Annotated[Optional[str], typer.Option("--device", help="cpu, cuda or cuda:N (default: CUDA when "
                                                                          "available, else CPU)")]
DtypeOption = Annotated[str, typer.Option("--dtype", help="float32, bfloat16 (autocast; CPU and CUDA) or float16 "
                                                          "(CUDA only)")]

app = typer.Typer(help="Parameter-efficient adaptation of GLIP: one frozen core, many small task adapters.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
                  cls=CommandGroup.with_lazy(lambda: _lazy_commands()))
app.add_typer(tasks_app, name="tasks", help="List, inspect, fetch and render detection tasks.")


def fail(message: str, code: int = 2) -> NoReturn:
    """Refuse with one `error: message` line and exit status `code`."""
    raise CommandError(message, code)


@app.command("verify-reference")
def verify_reference(
    cases: Annotated[list[Path], typer.Argument(help="reference case folders (keys.json, prompt.json, input.png, outputs.*)")],
    threads: Annotated[int, typer.Option(help="CPU threads")] = 2,
    device: DeviceOption = None,
    dtype: DtypeOption = "float32",
) -> None:
    """Rebuild each case's official checkpoint, convert it, run it and compare every stage with the official outputs.

    With --dtype bfloat16/float16 the same comparison runs against the float32 official outputs, with the
    tolerances derived for that precision (backbone/verify.py)."""
    from backbone.verify import verify_case

    failed = 0
    for case in cases:
        try:
            report = verify_case(case, threads=threads, device=device, dtype=dtype)
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
    from backbone.checkpoints import save_model
    from backbone.model import GLIP

    if not source.exists():
        fail(f"{source} does not exist")
    model = GLIP.from_pretrained(source)  # a CheckpointMismatchError is a ValueError: one `error:` line
    save_model(model, target, source=str(source))
    typer.echo(f"wrote {target} ({model.config.name}, {target.stat().st_size / 2**20:.1f} MiB)")


@app.command()
def detect(
    images: Annotated[list[Path], typer.Argument(help="image files")],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="categories, 'fish. shark. penguin'")],
    base: Annotated[str, typer.Option(help="checkpoint name or path")] = "glip-nano",
    threshold: Annotated[float, typer.Option(help="score threshold")] = 0.5,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="write COCO-style results here")] = None,
    device: DeviceOption = None,
    dtype: DtypeOption = "float32",
) -> None:
    """Zero-shot detection with a base model and a text prompt."""
    import json

    from backbone.detector import GLIPDetector

    detector = GLIPDetector.from_pretrained(base, device=device, dtype=dtype)
    results = []
    for index, (path, dets) in enumerate(zip(images, detector.detect([str(p) for p in images], prompt, threshold))):
        typer.echo(f"{path}: {len(dets)} detections")
        for box, score, name in zip(dets.boxes.tolist(), dets.scores.tolist(), dets.names):
            typer.echo(f"  {name:<20} {score:.3f}  [{', '.join(f'{v:.1f}' for v in box)}]")
        results += dets.to_coco(index, file_name=str(path))
    if json_out:
        json_out.write_text(json.dumps(results, indent=1))


def _pretrain(values: dict) -> None:
    """Pretrain glip-nano(-a) on the icon world with GLIP's grounding objective."""
    import json

    from adapt.pretrain import PretrainConfig, pretrain as run

    summary = run(PretrainConfig(**values, data_root=resolve_data_root()))
    typer.echo(json.dumps(summary.to_dict(), indent=1))


def _build_pretrain():
    from adapt.pretrain import PretrainConfig
    from adapt.train.config import TrainConfig

    return build_command("pretrain", bind_options(_pretrain, PretrainConfig, nested={"trainer": TrainConfig}))


def _task_label(task: str) -> str:
    """A file-name stem for a task: a folder's own name (`--task .` included), a task file's stem, or the name."""
    path = Path(task)
    if path.is_dir():
        return path.resolve().name
    return path.stem if path.suffix in (".yaml", ".yml", ".json") else path.name


def _tune_command(strategy: str):
    def command(
        values: dict,
        report: Annotated[Optional[Path], typer.Option(help="write metrics, timings and paths here (JSON)")] = None,
        threads: Annotated[Optional[int], typer.Option(help="CPU threads")] = None,
    ) -> None:
        from adapt.tune import TuneConfig, tune, write_report

        if threads:
            import torch

            torch.set_num_threads(threads)
        if values.get("out") is None:
            values["out"] = Path("adapters") / f"{_task_label(values['task'])}-{strategy}.safetensors"
        result = tune(TuneConfig(**values, data_root=resolve_data_root()))
        _print_tune(result)
        if report:
            write_report(result, report)

    command.__doc__ = STRATEGIES[strategy].summary
    return command


def _build_tune(strategy: str):
    from adapt.train.config import TrainConfig
    from adapt.tune import TuneConfig

    # LoRA's own settings are offered only by strategies that carry LoRA (a config file may still carry them).
    other = () if STRATEGIES[strategy].lora else tuple(f.name for f in dataclasses.fields(TuneConfig)
                                                       if f.name.startswith("lora_"))
    return build_command(strategy, bind_options(_tune_command(strategy), TuneConfig, fixed={"strategy": strategy},
                                                nested={"trainer": TrainConfig}, hide=other))


def _print_tune(result) -> None:
    zero, tuned = result.zero_shot, result.tuned
    typer.echo(f"task {result.task} · {result.strategy} · {result.few_shot}")
    if zero:
        typer.echo(f"  zero-shot  AP {zero.AP:.1f}  AP50 {zero.AP50:.1f}")
    typer.echo(f"  tuned      AP {tuned.AP:.1f}  AP50 {tuned.AP50:.1f}")
    typer.echo(f"  trainable parameters {result.trainable_parameters:,}; "
               f"{result.timings.steps} steps in {result.timings.train_s:.0f} s")
    if result.adapter_path is not None:
        typer.echo(f"  adapter {result.adapter_path} ({result.adapter_bytes:,} bytes)")


@app.command("eval")
def evaluate_command(
    task: Annotated[str, typer.Option(help="task name, task file or dataset folder")],
    adapter: Annotated[Optional[str], typer.Option(help="adapter file or hf://OWNER/NAME (@REV, /FOLDER "
                                                      "optional); default: zero-shot base")] = None,
    base: Annotated[Optional[str], typer.Option(help="base checkpoint (default: the adapter's, else glip-nano)")] = None,
    split: Annotated[Optional[str], typer.Option(help="split (default: the task's evaluation split)")] = None,
    protocol: Annotated[str, typer.Option(help="'task', 'all-chunked' (chunks fill 256 tokens), 'all-chunked-N' "
                                               "(at most N categories per chunk) or 'per-image-N' (held-in)")] = "task",
    limit: Annotated[Optional[int], typer.Option(help="first N images only")] = None,
    report: Annotated[Optional[Path], typer.Option(help="write metrics here (JSON)")] = None,
    results_json: Annotated[Optional[Path], typer.Option("--results", help="COCO results json")] = None,
    device: DeviceOption = None,
    dtype: DtypeOption = "float32",
) -> None:
    """COCO AP of a base (zero-shot, the task's prompt) or of an adapter on a task split."""
    import json

    from adapt.evaluation import evaluate
    from tasks import get_task

    task_obj = get_task(task, data_root=resolve_data_root())
    dataset = task_obj.split(split or task_obj.eval_split)
    if adapter is not None:
        from adapt.predict import AdapterDetector

        detector = AdapterDetector.load(adapter, base, device=device, dtype=dtype)
        if detector.categories != task_obj.category_names:
            fail(f"adapter {adapter} is for categories {detector.categories}, not task {task_obj.name!r}'s")
        metrics = evaluate(None, dataset, protocol, limit=limit, detect_fn=detector.detect_fn())
    else:
        from backbone.detector import GLIPDetector

        metrics = evaluate(GLIPDetector.from_pretrained(base or "glip-nano", device=device, dtype=dtype), dataset,
                           protocol, limit=limit)
    typer.echo(f"{task_obj.name} [{task_obj.split_name(split or task_obj.eval_split)}] protocol {protocol}: "
               f"AP {metrics.AP:.1f}  AP50 {metrics.AP50:.1f}  AP75 {metrics.AP75:.1f}")
    floor = metrics.name_blind_floor_AP50
    typer.echo(f"  boxes found {metrics.hit_rate:.1f} %, named right {metrics.naming_rate:.1f} %"
               + (f"; name-blind floor AP50 {floor:.1f}" if floor is not None else ""))
    for name, value in metrics.per_category.items():
        typer.echo(f"  {name:<28} AP {value if value is None else round(value, 1)}")
    if report:
        report.write_text(json.dumps({"task": task_obj.name, "adapter": str(adapter) if adapter else None,
                                      "base": base, "metrics": metrics.to_dict()}, indent=1, default=str))


@app.command()
def predict(
    images: Annotated[list[Path], typer.Argument(help="image files")],
    adapter: Annotated[Optional[str], typer.Option(
        help="adapter file or hf://OWNER/NAME (@REV, /FOLDER optional)")] = None,
    onnx: Annotated[Optional[Path], typer.Option("--onnx", help="a task exported by `adapt export` (run by "
                                                 "onnxruntime instead of PyTorch; no --adapter needed)")] = None,
    base: Annotated[Optional[str], typer.Option(help="base checkpoint (default: the adapter's)")] = None,
    threshold: Annotated[float, typer.Option(help="score threshold")] = 0.3,
    save_vis: Annotated[Optional[Path], typer.Option(help="write PNGs with boxes into this folder")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="COCO results json")] = None,
    device: DeviceOption = None,
    dtype: DtypeOption = "float32",
) -> None:
    """Detect a task's categories with its adapter or its exported ONNX graph (the language backbone is not run)."""
    import json

    if (adapter is None) == (onnx is None):
        fail("pass --adapter FILE (PyTorch) or --onnx FILE (onnxruntime), not both and not neither")
    if onnx is not None:
        if base is not None:
            fail("--base does not apply to --onnx: the exported graph already holds its base")
        from adapt.onnx_runtime import OnnxDetector

        detector = OnnxDetector(onnx)
    else:
        from adapt.predict import AdapterDetector

        detector = AdapterDetector.load(adapter, base, device=device, dtype=dtype)
    loaded = [detector.processor.load_image(p) for p in images]
    records = []
    for index, (path, image) in enumerate(zip(images, loaded)):
        [dets] = detector.detect(image, threshold)
        typer.echo(f"{path}: {len(dets)} detections")
        for box, score, name in zip(dets.boxes.tolist(), dets.scores.tolist(), dets.names):
            typer.echo(f"  {name:<20} {score:.3f}  [{', '.join(f'{v:.1f}' for v in box)}]")
        records += dets.to_coco(index, detector.category_ids, file_name=str(path))
        if save_vis:
            from tasks.visualize import draw_predictions

            save_vis.mkdir(parents=True, exist_ok=True)
            draw_predictions(image, dets.boxes, dets.scores, dets.labels, dets.categories,
                             score_threshold=threshold).save(save_vis / f"{path.stem}.png")
    if json_out:
        json_out.write_text(json.dumps(records, indent=1))


@app.command("export")
def export_command(
    adapter: Annotated[str, typer.Option(help="adapter file (any strategy), an hf://OWNER/NAME reference, or a merged "
                                              "model from `adapters merge`")],
    out: Annotated[Path, typer.Option(help="ONNX file to write, e.g. task.onnx")],
    base: Annotated[Optional[str], typer.Option(help="base checkpoint (default: the adapter's)")] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="float32 or float16 (weights; inputs and outputs stay "
                                                      "float32)")] = "float32",
    opset: Annotated[int, typer.Option(help="ONNX opset, 16-20 (GridSample needs 16)")] = 17,
    size: Annotated[Optional[str], typer.Option(help="a fixed input HxW, multiples of 32, e.g. 800x1344: each image "
                                                     "is zero-padded onto this canvas, which changes the scores "
                                                     "(default: any batch and image size, the detections of "
                                                     "`adapt predict --adapter`)")] = None,
) -> None:
    """Export a task to ONNX: the base with the adapter folded in; images in, pre-NMS boxes and scores out."""
    from adapt.export import export_task

    fixed = None
    if size is not None:
        parts = size.lower().split("x")
        if len(parts) != 2 or not all(part.strip().isdigit() for part in parts):
            fail(f"--size takes HEIGHTxWIDTH, e.g. 800x1344; got {size!r}")
        fixed = (int(parts[0]), int(parts[1]))
    result = export_task(adapter, out, base=base, dtype=dtype, opset=opset, fixed_size=fixed)
    shape = "x".join(str(v) for v in result.input_shape)
    typer.echo(f"wrote {result.path} ({result.bytes / 2**20:.1f} MiB): task {result.task!r} ({result.strategy}), "
               f"input {shape}, opset {result.opset}, {result.dtype}, {result.seconds:.0f} s")


adapters_app = typer.Typer(help="Inspect, merge and pull adapter files.", no_args_is_help=True)
app.add_typer(adapters_app, name="adapters")


@adapters_app.command("inspect")
def adapters_inspect(
    path: Annotated[str, typer.Argument(help="adapter file or hf://OWNER/NAME (@REV, /FOLDER optional)")],
) -> None:
    """Print everything an adapter holds: strategy, task, prompt, base fingerprint, settings, results, tensors."""
    from adapt.adapter import describe
    from adapt.hub import open_adapter

    typer.echo(describe(open_adapter(path)))


@adapters_app.command("merge")
def adapters_merge(
    path: Annotated[str, typer.Argument(help="adapter file or hf://OWNER/NAME (@REV, /FOLDER optional)")],
    out: Annotated[Path, typer.Option(help="standalone model file (.safetensors)")],
    base: Annotated[Optional[str], typer.Option(help="base checkpoint (default: the adapter's)")] = None,
) -> None:
    """Write a standalone model with the adapter folded in (for deploying one task)."""
    from adapt.adapter import merge_adapter
    from adapt.hub import open_adapter

    merge_adapter(open_adapter(path), out, base)
    typer.echo(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")


@adapters_app.command("pull")
def adapters_pull(
    ref: Annotated[str, typer.Argument(help="hf://OWNER/NAME (@REV, /FOLDER optional)")],
    to: Annotated[Optional[Path], typer.Option(help="copy it into this folder as <task>.safetensors (a server's "
                                                   "--adapters folder); default: only fetch it into the HF cache")]
    = None,
    name: Annotated[Optional[str], typer.Option(help="file name in --to, without .safetensors (default: the "
                                                     "adapter's task)")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace a different adapter of that name in --to")] = False,
) -> None:
    """Fetch an adapter from the Hub into the local cache (then usable offline); --to also copies it into a folder."""
    from adapt.hub import pull

    path = pull(ref, to, name=name, overwrite=overwrite)
    typer.echo(f"{ref} -> {path}")


@app.command()
def push(
    adapter: Annotated[str, typer.Argument(help="adapter file (or an hf:// reference to copy)")],
    repo_id: Annotated[str, typer.Argument(metavar="OWNER/NAME", help="Hub model repository (created if missing)")],
    private: Annotated[bool, typer.Option("--private", help="create the repository private")] = False,
    revision: Annotated[Optional[str], typer.Option(help="branch to commit to (created from main if missing)")]
    = None,
    local_dir: Annotated[Optional[Path], typer.Option(help="only write the repository's files into this folder "
                                                          "(no upload)")] = None,
) -> None:
    """Share an adapter on the Hugging Face Hub: adapter_model.safetensors, adapter_config.json and a model card.

    Uses your Hub login (`hf auth login` or HF_TOKEN). Others then run `adapt predict --adapter hf://OWNER/NAME`."""
    from adapt.hub import push as push_adapter

    result = push_adapter(adapter, repo_id, private=private, revision=revision, local_dir=local_dir)
    ref = f"hf://{repo_id}" + (f"@{revision}" if revision else "")
    typer.echo(f"wrote {', '.join(result.files)} to {result.location}")
    if local_dir is None:
        typer.echo(f"use it with: adapt predict --adapter {ref} IMAGE")


def _serve(
    values: dict,
    adapters: Annotated[Path, typer.Option(help="adapter folder: one <task>.safetensors per task (uploads land here)")]
    = Path("adapters"),
    base: Annotated[str, typer.Option(help="checkpoint name or path the adapters were trained on")] = "glip-nano",
    host: Annotated[str, typer.Option(help="interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    keys: Annotated[Optional[str], typer.Option(
        help="API key file (JSON/YAML with sha256 digests, see docs/serving.md); default $ADAPT_SERVE_KEYS (a path "
             "or inline JSON); none = open server, no uploads")] = None,
    docs: Annotated[bool, typer.Option("--docs", help="serve Swagger UI at /docs (it loads its scripts from a "
                                                      "CDN)")] = False,
    threads: Annotated[Optional[int], typer.Option(help="torch CPU threads")] = None,
    ray: Annotated[bool, typer.Option("--ray", help="run as a Ray Serve deployment on a local Ray instance "
                                                    "(on CUDA: one replica per GPU)")] = False,
    replicas: Annotated[Optional[int], typer.Option(
        help="model replicas with --ray (default: one per GPU on CUDA, else 1)")] = None,
) -> None:
    """Serve every adapter in --adapters over HTTP on one shared base: POST /v1/tasks/{task}/detect."""
    import os

    from adapt.serve.app import HTTPLimits
    from adapt.serve.engine import EngineConfig
    from adapt.serve.server import load_keys, run_http, run_ray
    from backbone.device import resolve_device, resolve_dtype

    if threads:
        import torch

        torch.set_num_threads(threads)
    http = HTTPLimits(**values.pop("http", {}))
    config = EngineConfig(**values)
    resolve_dtype(config.dtype, resolve_device(config.device))  # refuse a device this machine lacks before loading
    key_config = load_keys(keys or os.environ.get("ADAPT_SERVE_KEYS"))
    options = dict(base=base, adapters_dir=adapters, engine_config=config, keys=key_config, host=host, port=port,
                   http=http, docs=docs)
    if ray:
        run_ray(**options, replicas=replicas, threads=threads)
    else:
        run_http(**options)


def _build_serve():
    from adapt.serve.app import HTTPLimits
    from adapt.serve.engine import EngineConfig

    return build_command("serve", bind_options(_serve, EngineConfig, nested={"http": HTTPLimits}))


def _sweep(values: dict) -> None:
    """Compare strategies on tasks: a grid of runs, each scored on its task and on the base's own vocabulary."""
    from adapt.sweep import SweepConfig, run_sweep

    config = SweepConfig(**values, data_root=resolve_data_root())
    rows = run_sweep(config, log=typer.echo)
    failed = [r for r in rows if r["status"] != "ok"]
    typer.echo(f"{len(rows)} runs, {len(failed)} failed; results in {config.out / 'results.csv'}, "
               f"table in {config.out / 'table.md'}")
    if failed:
        raise CommandError(f"{len(failed)} run(s) failed (errors in results.csv); run the same command again to "
                           "retry them", code=1)


def _build_sweep():
    from adapt.sweep import SweepConfig

    return build_command("sweep", bind_options(_sweep, SweepConfig))


def _lazy_commands() -> dict:
    """The commands built on first use: {name: (summary, build)}; one per registered strategy."""
    from functools import partial

    commands = {name: (spec.summary, partial(_build_tune, name)) for name, spec in STRATEGIES.items()}
    commands["pretrain"] = ("Pretrain glip-nano(-a) on the icon world with GLIP's grounding objective.",
                            _build_pretrain)
    commands["serve"] = ("Serve every adapter in --adapters over HTTP on one shared base.", _build_serve)
    commands["sweep"] = ("Compare strategies: tasks x bases x strategies x shots x seeds, with retention.",
                         _build_sweep)
    return commands




def main() -> None:
    """The `adapt` entry point ([project.scripts]): the app with warnings as one line each."""
    import warnings

    warnings.filterwarnings("ignore", message="Detected pickle protocol")  # torch's, before its pickle refusal
    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"  # one line, no source echo
    app()


if __name__ == "__main__":
    main()
