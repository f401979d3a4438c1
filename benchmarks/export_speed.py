"""An exported task on onnxruntime against the same task in PyTorch (fp32 and bf16 autocast), on CPU.

    python benchmarks/export_speed.py [--models nano glip_t] [--threads 2] [--runs 5] [--out benchmarks/results/export_speed]

Models: glip-nano at 256x256, and GLIP-T(C) (reference weights, ../shared/reference) at 800x1333 (padded
800x1344), each with a prompt adapter (the base's P0 for the reference caption; a tuned P0 has the same shape
and cost). Every configuration runs in its own process, so the peak RSS is that run's alone: the export
(`adapt.export.export_task`, a static graph of the padded size), then onnxruntime (`OnnxTask.run`: graph +
numpy post-processing), PyTorch fp32 and PyTorch bf16 autocast (`model(P0, pixels)` + `Postprocessor`).
Timed: normalised padded pixels in, final detections out; median of --runs after one warm-up, 2 threads.
Writes OUT.json (every run) and OUT.txt (the table, with the machine's load average before and after).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from timing import timed_runs  # benchmarks/timing.py, beside this script


HERE = Path(__file__).resolve().parent
MODELS = {"nano": ("glip-nano", (256, 256), ["fish", "jellyfish", "penguin", "shark"]),
          "glip_t": ("GLIP-T(C)", (800, 1333), ["person", "bicycle", "car", "toothbrush"])}
RUNTIMES = ("onnxruntime", "torch-fp32", "torch-bf16")


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def prepare(model: str, folder: Path, reference: Path) -> dict:
    """Base weights, prompt adapter and exported ONNX file of `model` (each built once into `folder`)."""
    import torch

    from adapt.adapter import save_adapter
    from adapt.export import export_task, zero_shot_adapter
    from backbone.model import GLIP

    folder.mkdir(parents=True, exist_ok=True)
    if model == "glip_t":
        sys.path.insert(0, str(HERE))
        from speed_core import build_weights

        base = str(build_weights(reference, "glip_t", folder))
    else:
        base = "glip-nano"
    adapter = folder / f"{model}-pt.safetensors"
    if not adapter.exists():
        glip = GLIP.from_pretrained(base)
        save_adapter(zero_shot_adapter(glip, MODELS[model][2], base), adapter)
        del glip
    onnx_file = folder / f"{model}.onnx"
    started = time.perf_counter()
    torch.set_num_threads(2)
    result = export_task(adapter, onnx_file, fixed_size=padded(MODELS[model][1]))
    sizes = {"adapter_bytes": adapter.stat().st_size, "onnx_bytes": result.bytes}
    if Path(base).exists():
        sizes["base_bytes"] = Path(base).stat().st_size
    return {"model": model, "runtime": "export", "base": base, "adapter": str(adapter), "onnx": str(onnx_file),
            "export_s": round(time.perf_counter() - started, 1), "peak_rss_gib": round(peak_rss_gib(), 2), **sizes}


def padded(size: tuple[int, int]) -> tuple[int, int]:
    return tuple(-(-side // 32) * 32 for side in size)


def worker(model: str, runtime: str, adapter: str, onnx_file: str, runs: int, threads: int) -> dict:
    import numpy as np

    height, width = MODELS[model][1]
    rng = np.random.default_rng(0)
    pixels = np.zeros((1, 3, *padded((height, width))), dtype=np.float32)
    pixels[..., :height, :width] = rng.standard_normal((1, 3, height, width), dtype=np.float32)
    if runtime == "onnxruntime":
        from adapt.onnx_runtime import OnnxTask

        task = OnnxTask(onnx_file, providers=["CPUExecutionProvider"], threads=threads)

        def call():
            return task.run(pixels, [(height, width)])
    else:
        import torch

        from adapt.predict import AdapterDetector
        from backbone.device import autocast

        torch.set_num_threads(threads)
        detector = AdapterDetector.load(adapter)
        inputs = torch.from_numpy(pixels)
        dtype = torch.bfloat16 if runtime == "torch-bf16" else torch.float32

        def call():
            with torch.no_grad(), autocast(torch.device("cpu"), dtype):
                outputs = detector.model(detector.adapter.prompt, inputs, [(height, width)])
                return detector.postprocessor(outputs, detector.adapter.positive_map)
    rss_after_load = peak_rss_gib()
    times = timed_runs(call, runs)
    return {"model": model, "runtime": runtime, "size": f"{height}x{width}", "median_s": round(statistics.median(times), 3),
            "runs_s": [round(t, 3) for t in times], "rss_after_load_gib": round(rss_after_load, 2),
            "peak_rss_gib": round(peak_rss_gib(), 2), "threads": threads}


def spawn(*args: str) -> dict:
    run = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(HERE.parent)))
    if run.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--runtimes", nargs="*", default=list(RUNTIMES), choices=list(RUNTIMES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--reference", type=Path, default=HERE.parents[1] / "shared" / "reference")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "glip-adapt-bench")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "export_speed")
    parser.add_argument("--prepare", nargs=1, help=argparse.SUPPRESS)
    parser.add_argument("--worker", nargs=4, metavar=("MODEL", "RUNTIME", "ADAPTER", "ONNX"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.prepare:
        print(json.dumps(prepare(args.prepare[0], args.cache, args.reference)))
        return
    if args.worker:
        print(json.dumps(worker(*args.worker, runs=args.runs, threads=args.threads)))
        return
    load_before = os.getloadavg()
    rows = []
    for model in args.models:
        built = spawn("--prepare", model, "--cache", str(args.cache), "--reference", str(args.reference))
        rows.append(built)
        print(f"{MODELS[model][0]}: exported in {built['export_s']} s (peak RSS {built['peak_rss_gib']} GiB), "
              f"ONNX {built['onnx_bytes'] / 2**20:.1f} MiB, adapter {built['adapter_bytes'] / 1e3:.1f} KB", flush=True)
        for runtime in args.runtimes:
            row = spawn("--worker", model, runtime, built["adapter"], built["onnx"], "--runs", str(args.runs),
                        "--threads", str(args.threads))
            rows.append(row)
            print(f"  {runtime:<12} median {row['median_s']:.3f} s (runs {row['runs_s']}), "
                  f"peak RSS {row['peak_rss_gib']:.2f} GiB", flush=True)
    load_after = os.getloadavg()
    report = {"rows": rows, "load_before": load_before, "load_after": load_after, "threads": args.threads,
              "runs": args.runs, "cpu_count": os.cpu_count()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    args.out.with_suffix(".txt").write_text(render(report))
    print(render(report))


def render(report: dict) -> str:
    lines = [f"threads {report['threads']}, median of {report['runs']} after a warm-up; load average (1/5/15 min) "
             f"before {', '.join(f'{v:.2f}' for v in report['load_before'])}, after "
             f"{', '.join(f'{v:.2f}' for v in report['load_after'])} on {report['cpu_count']} CPUs",
             "| model | input | runtime | median | peak RSS | file |", "|---|---|---|---|---|---|"]
    exports = {r["model"]: r for r in report["rows"] if r["runtime"] == "export"}
    for row in report["rows"]:
        if row["runtime"] == "export":
            continue
        built = exports[row["model"]]
        file = (f"ONNX {built['onnx_bytes'] / 2**20:.1f} MiB" if row["runtime"] == "onnxruntime" else
                f"adapter {built['adapter_bytes'] / 1e3:.1f} KB + base" +
                (f" {built['base_bytes'] / 2**20:.1f} MiB" if "base_bytes" in built else " (embedded)"))
        lines.append(f"| {MODELS[row['model']][0]} | {row['size']} | {row['runtime']} | {row['median_s']:.3f} s | "
                     f"{row['peak_rss_gib']:.2f} GiB | {file} |")
    for model, built in exports.items():
        lines.append(f"export {MODELS[model][0]}: {built['export_s']} s, peak RSS {built['peak_rss_gib']} GiB")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
