"""The `adapt` command line: a thin layer over the Python API (heavy imports stay inside commands)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from adapt import STRATEGIES
from adapt.cli_tasks import resolve_data_root

# The two options every command that runs a model takes (resolved by backbone.device).
DeviceOption = Annotated[Optional[str], typer.Option("--device", help="cpu, cuda or cuda:N (default: CUDA when "
                                                                          "available, else CPU)")]
DtypeOption = Annotated[str, typer.Option("--dtype", help="float32, bfloat16 (autocast; CPU and CUDA) or float16 "
                                                          "(CUDA only)")]

app = typer.Typer(help="Parameter-efficient adaptation of GLIP: one frozen core, many small task adapters.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)


DeviceOption = Annotated[Optional[str], typer.Option("--device", help="cpu, cuda or cuda:N (default: CUDA when available, else CPU)")]
DtypeOption = Annotated[str, typer.Option("--dtype", help="float32, bfloat16 or float16 (CUDA only)")]


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


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
    from backbone.convert import CheckpointMismatchError
    from backbone.model import GLIP

    if not source.exists():
        fail(f"{source} does not exist")
    try:
        model = GLIP.from_pretrained(source)
    except CheckpointMismatchError as error:
        fail(str(error))
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
    prompt_names: Annotated[int, typer.Option(help="names per detection prompt (present + absent)")] = 16,
    grad_clip: Annotated[float, typer.Option(help="max total gradient norm (0: no clipping)")] = 1.0,
    num_workers: Annotated[int, typer.Option(help="processes drawing scenes beside the training")] = 0,
    resume: Annotated[bool, typer.Option(help="continue the run in --out if it has a checkpoint")] = True,
    device: DeviceOption = None,
    dtype: DtypeOption = "float32",
) -> None:
    """Pretrain glip-nano(-a) on the icon world with GLIP's grounding objective ."""
    import json

    from adapt.pretrain import PretrainConfig, pretrain as run

    try:
        config = PretrainConfig(preset=preset, steps=steps, batch_size=batch_size, lr=lr, seed=seed, out_dir=out,
                                weights_out=weights, threads=threads, eval_every=eval_every, resume=resume,
                                prompt_names=prompt_names, grad_clip=grad_clip or None, num_workers=num_workers,
                                device=device, dtype=dtype, data_root=resolve_data_root())
        summary = run(config)
    except ValueError as error:  # DeviceError included: an unusable --device/--dtype
        fail(str(error))
    typer.echo(json.dumps(summary, indent=1))


def _floats(text: str, option: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        fail(f"{option} takes comma-separated numbers, e.g. 0.8,1; got {text!r}")


def _tune_command(strategy: str):
    def command(
        task: Annotated[str, typer.Option(help="task name (see `adapt tasks list`) or task file")],
        shots: Annotated[Optional[int], typer.Option(help="images per category (default: all training data)")] = None,
        seed: Annotated[int, typer.Option(help="few-shot subset and training seed")] = 0,
        base: Annotated[str, typer.Option(help="base checkpoint: glip-nano, glip-nano-a, an official .pth, ...")] = "glip-nano",
        steps: Annotated[Optional[int], typer.Option(help="optimizer steps (default by shots: 100..400)")] = None,
        epochs: Annotated[Optional[float], typer.Option(help="passes over the training images (overrides --steps)")] = None,
        lr: Annotated[Optional[float], typer.Option(help="learning rate (default per strategy)")] = None,
        batch_size: Annotated[int, typer.Option(help="images per step")] = 4,
        out: Annotated[Optional[Path], typer.Option(help="adapter file to write (.safetensors)")] = None,
        report: Annotated[Optional[Path], typer.Option(help="write metrics, timings and paths here (JSON)")] = None,
        cache: Annotated[bool, typer.Option(help="cache frozen backbone+FPN features across epochs")] = True,
        augment: Annotated[bool, typer.Option(help="also train on horizontally flipped views")] = False,
        scales: Annotated[str, typer.Option(help="training scales as fractions of the input size, e.g. 0.8,1 "
                                                 "(each is a fixed, cached view)")] = "1",
        eval_limit: Annotated[Optional[int], typer.Option(help="evaluate on the first N images only")] = None,
        prompt_dtype: Annotated[Optional[str], typer.Option(
            help="store P0 in the adapter as float16 or bfloat16 (half the bytes)")] = None,
        threads: Annotated[Optional[int], typer.Option(help="CPU threads")] = None,
        device: DeviceOption = None,
        dtype: DtypeOption = "float32",
        run_dir: Annotated[Optional[Path], typer.Option(
            help="keep checkpoints and metrics.jsonl here (checkpoint at every evaluation), so the run can resume "
                 "(default: a temporary folder, removed)")] = None,
        resume: Annotated[bool, typer.Option(help="continue the run in --run-dir from its last checkpoint")] = False,
    ) -> None:
        from adapt.adapter import AdapterError
        from adapt.tune import TuneConfig, tune, write_report

        if threads:
            import torch

            torch.set_num_threads(threads)
        out_path = out or Path("adapters") / f"{Path(task).stem}-{strategy}.safetensors"
        try:
            result = tune(TuneConfig(strategy=strategy, task=task, base=base, shots=shots, seed=seed, steps=steps,
                                     epochs=epochs, lr=lr, batch_size=batch_size, out=out_path, cache_features=cache,
                                     augment=augment, scales=_floats(scales, "--scales"), eval_limit=eval_limit,
                                     prompt_dtype=prompt_dtype, device=device, dtype=dtype, run_dir=run_dir,
                                     resume=resume, data_root=resolve_data_root()))
        except (ValueError, KeyError, FileNotFoundError, FileExistsError, PermissionError, AdapterError) as error:
            fail(str(error).strip('"'))
        _print_tune(result)
        if report:
            write_report(result, report)

    command.__doc__ = STRATEGIES[strategy].summary
    return command


for _strategy in STRATEGIES:  # one command per registered strategy, its help the strategy's summary
    app.command(_strategy)(_tune_command(_strategy))


def _print_tune(result: dict) -> None:
    zero, tuned = result.get("zero_shot"), result["tuned"]
    typer.echo(f"task {result['task']} · {result['strategy']} · {result['few_shot']}")
    if zero:
        typer.echo(f"  zero-shot  AP {zero['AP']:.1f}  AP50 {zero['AP50']:.1f}")
    typer.echo(f"  tuned      AP {tuned['AP']:.1f}  AP50 {tuned['AP50']:.1f}")
    typer.echo(f"  trainable parameters {result['trainable_parameters']:,}; "
               f"{result['timings']['steps']} steps in {result['timings']['train_s']:.0f} s")
    if "adapter" in result:
        typer.echo(f"  adapter {result['adapter']['path']} ({result['adapter']['bytes']:,} bytes)")


@app.command("eval")
def evaluate_command(
    task: Annotated[str, typer.Option(help="task name or task file")],
    adapter: Annotated[Optional[Path], typer.Option(help="adapter file (default: zero-shot base)")] = None,
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

    from adapt.adapter import AdapterError
    from adapt.evaluation import evaluate
    from tasks import get_task

    try:
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
    except (ValueError, KeyError, FileNotFoundError, AdapterError) as error:
        fail(str(error).strip('"'))
    typer.echo(f"{task_obj.name} [{dataset.ann_file.parent.name}] protocol {protocol}: "
               f"AP {metrics['AP']:.1f}  AP50 {metrics['AP50']:.1f}  AP75 {metrics['AP75']:.1f}")
    floor = metrics.get("name_blind_floor_AP50")
    typer.echo(f"  boxes found {metrics['hit_rate']:.1f} %, named right {metrics['naming_rate']:.1f} %"
               + (f"; name-blind floor AP50 {floor:.1f}" if floor is not None else ""))
    for name, value in (metrics.get("per_category") or {}).items():
        typer.echo(f"  {name:<28} AP {value if value is None else round(value, 1)}")
    if report:
        report.write_text(json.dumps({"task": task_obj.name, "adapter": str(adapter) if adapter else None,
                                      "base": base, "metrics": metrics}, indent=1, default=str))


@app.command()
def predict(
    images: Annotated[list[Path], typer.Argument(help="image files")],
    adapter: Annotated[Optional[Path], typer.Option(help="adapter file")] = None,
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

    from adapt.adapter import AdapterError

    if (adapter is None) == (onnx is None):
        fail("pass --adapter FILE (PyTorch) or --onnx FILE (onnxruntime), not both and not neither")
    try:
        if onnx is not None:
            if base is not None:
                fail("--base does not apply to --onnx: the exported graph already holds its base")
            from adapt.onnx_runtime import OnnxDetector

            detector = OnnxDetector(onnx)
        else:
            from adapt.predict import AdapterDetector

            detector = AdapterDetector.load(adapter, base, device=device, dtype=dtype)
        loaded = [detector.processor.load_image(p) for p in images]
    except (ValueError, FileNotFoundError, AdapterError) as error:
        fail(str(error))
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
    adapter: Annotated[Path, typer.Option(help="adapter file (any strategy), or a merged model from `adapters merge`")],
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
    from adapt.adapter import AdapterError
    from adapt.export import ExportError, export_task

    fixed = None
    if size is not None:
        parts = size.lower().split("x")
        if len(parts) != 2 or not all(part.strip().isdigit() for part in parts):
            fail(f"--size takes HEIGHTxWIDTH, e.g. 800x1344; got {size!r}")
        fixed = (int(parts[0]), int(parts[1]))
    try:
        result = export_task(adapter, out, base=base, dtype=dtype, opset=opset, fixed_size=fixed)
    except (ExportError, AdapterError, FileNotFoundError) as error:
        fail(str(error))
    shape = "x".join(str(v) for v in result.input_shape)
    typer.echo(f"wrote {result.path} ({result.bytes / 2**20:.1f} MiB): task {result.task!r} ({result.strategy}), "
               f"input {shape}, opset {result.opset}, {result.dtype}, {result.seconds:.0f} s")


adapters_app = typer.Typer(help="Inspect and merge adapter files.", no_args_is_help=True)
app.add_typer(adapters_app, name="adapters")


@adapters_app.command("inspect")
def adapters_inspect(path: Annotated[Path, typer.Argument(help="adapter file")]) -> None:
    """Print everything an adapter holds: strategy, task, prompt, base fingerprint, settings, results, tensors."""
    from adapt.adapter import AdapterError, describe

    try:
        typer.echo(describe(path))
    except AdapterError as error:
        fail(str(error))


@adapters_app.command("merge")
def adapters_merge(
    path: Annotated[Path, typer.Argument(help="adapter file")],
    out: Annotated[Path, typer.Option(help="standalone model file (.safetensors)")],
    base: Annotated[Optional[str], typer.Option(help="base checkpoint (default: the adapter's)")] = None,
) -> None:
    """Write a standalone model with the adapter folded in (for deploying one task)."""
    from adapt.adapter import AdapterError, merge_adapter

    try:
        merge_adapter(path, out, base)
    except AdapterError as error:
        fail(str(error))
    typer.echo(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")


@app.command()
def serve(
    adapters: Annotated[Path, typer.Option(help="adapter folder: one <task>.safetensors per task (uploads land here)")]
    = Path("adapters"),
    base: Annotated[str, typer.Option(help="checkpoint name or path the adapters were trained on")] = "glip-nano",
    host: Annotated[str, typer.Option(help="interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    keys: Annotated[Optional[str], typer.Option(
        help="API key file (JSON/YAML with sha256 digests, see docs/serving.md); default $ADAPT_SERVE_KEYS (a path "
             "or inline JSON); none = open server, no uploads")] = None,
    max_batch: Annotated[int, typer.Option(help="most requests in one model batch (1 = batching off)")] = 8,
    batch_window_ms: Annotated[float, typer.Option(help="how long a batch waits for more requests")] = 5.0,
    max_queue: Annotated[int, typer.Option(help="waiting requests beyond this get 503 + Retry-After")] = 64,
    deadline: Annotated[float, typer.Option(help="per-request deadline, seconds (then 504)")] = 30.0,
    cache_mb: Annotated[int, typer.Option(help="memory bound of loaded adapters, MiB (LRU)")] = 256,
    max_body_mb: Annotated[int, typer.Option(help="largest detect request body, MiB")] = 16,
    max_pixels: Annotated[int, typer.Option(help="largest image, width x height (decompression-bomb guard)")]
    = 25_000_000,
    threads: Annotated[Optional[int], typer.Option(help="torch CPU threads")] = None,
    device: DeviceOption = None,
    dtype: DtypeOption = "float32",
    ray: Annotated[bool, typer.Option("--ray", help="run as a Ray Serve deployment on a local Ray instance "
                                                    "(on CUDA: one replica per GPU)")] = False,
    replicas: Annotated[Optional[int], typer.Option(
        help="model replicas with --ray (default: one per GPU on CUDA, else 1)")] = None,
) -> None:
    """Serve every adapter in --adapters over HTTP on one shared base: POST /v1/tasks/{task}/detect."""
    import os

    from adapt.serve.engine import EngineConfig
    from adapt.serve.server import load_keys, run_http, run_ray
    from backbone.device import resolve_device, resolve_dtype

    if threads:
        import torch

        torch.set_num_threads(threads)
    try:
        resolve_dtype(dtype, resolve_device(device))  # refuse a device or dtype this machine lacks before loading
        config = EngineConfig(max_batch=max_batch, batch_window_ms=batch_window_ms, max_queue=max_queue,
                              deadline_s=deadline, cache_bytes=cache_mb * 2**20, max_pixels=max_pixels,
                              device=device, dtype=dtype)
        key_config = load_keys(keys or os.environ.get("ADAPT_SERVE_KEYS"))
        options = dict(base=base, adapters_dir=adapters, engine_config=config, keys=key_config, host=host, port=port,
                       max_body_bytes=max_body_mb * 2**20)
        if ray:
            run_ray(**options, replicas=replicas, threads=threads)
        else:
            run_http(**options)
    except (FileNotFoundError, ValueError) as error:
        fail(str(error))


def _register_subapps() -> None:
    from adapt.cli_tasks import tasks_app

    app.add_typer(tasks_app, name="tasks", help="List, inspect, fetch and render detection tasks.")


# Known failures and the one line a user sees for them; anything else is reported as a bug, still in one line.
_PICKLE_HINT = ("holds pickled objects other than tensors, which this toolkit will not unpickle (that could run code); "
                "pass a .safetensors checkpoint, a checkpoint name (e.g. glip-nano) or an official GLIP .pth")


def _argument(option: str) -> str | None:
    """The value given to `option` on this command line, for naming it in an error."""
    import sys

    argv = sys.argv[1:]
    for i, arg in enumerate(argv):
        if arg == option and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(option + "="):
            return arg.split("=", 1)[1]
    return None


def user_message(error: BaseException) -> str:
    """One line for `error`: what went wrong and what to do next (never a traceback, never torch's advice)."""
    import pickle

    from PIL import UnidentifiedImageError

    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, pickle.UnpicklingError) or "weights_only" in text:
        source = _argument("--base")
        return f"{repr(source) if source else 'the checkpoint'} {_PICKLE_HINT}"
    if isinstance(error, UnidentifiedImageError):
        return f"{text.replace('cannot identify image file', 'cannot read image')}; pass a PNG, JPEG or WebP file"
    if isinstance(error, (FileNotFoundError, IsADirectoryError, PermissionError)):
        return f"{text}; check the path"
    if isinstance(error, OSError) and "image" in text.lower():
        return f"{text}; the image is truncated or corrupt, re-export it"
    if isinstance(error, (ValueError, KeyError, TypeError, OSError)):
        return text.strip('"')
    return f"{type(error).__name__}: {text} (an internal error; rerun with ADAPT_DEBUG=1 for the traceback and report it)"


def main() -> None:
    """The `adapt` entry point: every command's failure is one `error: ...` line and exit status 2."""
    import os
    import sys
    import warnings

    _register_subapps()
    warnings.filterwarnings("ignore", message="Detected pickle protocol")  # torch's, before its pickle refusal
    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"  # one line, no source echo
    try:
        app(standalone_mode=True)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        typer.echo("error: interrupted", err=True)
        sys.exit(130)
    except BaseException as error:
        if os.environ.get("ADAPT_DEBUG"):
            raise
        typer.echo(f"error: {user_message(error)}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
