"""Forward latency and peak memory of GLIP-T(C) and GLIP-T(A) with the reference weights (issue: the GLIP core).

    python benchmarks/speed_core.py [--reference ../shared/reference] [--threads 2] [--runs 5]
                                    [--device cpu|cuda] [--dtype float32 bfloat16]

Each (model, size, dtype) runs in its own process, so peak RSS is that configuration's alone. Timed: the full
model call as the official timing measured it (tokenizer + BERT + Swin/FPN + DyHead + head +
post-processing) on an already normalised, padded image; median of --runs after one warm-up. A dtype below
float32 runs the network under autocast (backbone.device.autocast), as GLIPDetector does; post-processing runs
in float32.
Official code on this machine, timed beside this script in the same hour (2 threads, median of 3; issue #10):
GLIP-T(C) 2.47 s / 17.48 s and GLIP-T(A) 1.35 s / 7.69 s at 320x480 / 800x1333; peak RSS at 800x1333
3.60 GiB (GLIP-T(C)) and 2.37 GiB (GLIP-T(A)).
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
from pathlib import Path

from timing import timed_runs  # benchmarks/timing.py, beside this script


CASES = {"glip_t": ("GLIP-T(C)", "person. bicycle. car. toothbrush."),
         "glip_a": ("GLIP-T(A)", "a red box. blue circle. yellow banner. white oval. brown triangle")}
SIZES = [(320, 480), (800, 1333)]
OFFICIAL = {("glip_t", 320): (2.47, None), ("glip_t", 800): (17.48, 3.60),
            ("glip_a", 320): (1.35, None), ("glip_a", 800): (7.69, 2.37)}


def worker(weights: str, case: str, height: int, width: int, runs: int, threads: int, device: str,
           dtype: str, deform_impl: str) -> dict:
    import torch

    from backbone.detector import split_prompt
    from backbone.device import autocast, resolve_device, resolve_dtype
    from backbone.dyhead import use_deform_impl
    from backbone.model import GLIP
    from backbone.postprocess import Postprocessor
    from backbone.processor import GLIPProcessor

    torch.set_num_threads(threads)
    device = resolve_device(device)
    compute_dtype = resolve_dtype(dtype, device)
    model = GLIP.from_pretrained(weights).eval().to(device)
    if deform_impl != "config":  # override the checkpoint config's choice, to compare implementations
        use_deform_impl(model, deform_impl)
    deform_impl = model.config.dyhead.deform_impl if deform_impl == "config" else deform_impl
    processor = GLIPProcessor.from_config(model.config)
    postprocessor = Postprocessor.from_config(model.config)
    rss_after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    padded = (-(-height // 32) * 32, -(-width // 32) * 32)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.zeros(1, 3, *padded)
    pixels[..., :height, :width] = torch.randn(1, 3, height, width, generator=generator)
    pixels = pixels.to(device)
    caption = CASES[case][1]

    def call():
        with torch.no_grad():
            [prompt] = processor.tokenize(split_prompt(caption))
            with autocast(device, compute_dtype):
                features = model.encode_prompt(prompt.input_ids.to(device), prompt.attention_mask.to(device))
                outputs = model(features, pixels, [(height, width)])
            result = postprocessor(outputs.to(dtype=torch.float32), prompt.positive_map.to(device))
        if device.type == "cuda":
            torch.cuda.synchronize()
        return result

    times = timed_runs(call, runs)
    peak_cuda = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"case": case, "size": f"{height}x{width}", "padded": f"{padded[0]}x{padded[1]}", "device": str(device),
            "peak_cuda_gib": peak_cuda and round(peak_cuda, 2),
            "dtype": dtype, "deform_impl": deform_impl, "median_s": statistics.median(times), "runs_s": [round(t, 2) for t in times],
            "rss_after_load_gib": round(rss_after_load, 2),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def build_weights(reference: Path, case: str, folder: Path) -> Path:
    """Official-format weights from the deterministic initialiser, converted once to our format."""
    out = folder / f"{case}.safetensors"
    folder.mkdir(parents=True, exist_ok=True)
    if not out.exists():
        official = folder / f"{case}_official.safetensors"
        subprocess.run([sys.executable, "init_weights.py", str((reference / case / "keys.json").resolve()),
                        str(official)], cwd=reference, check=True, capture_output=True)
        from backbone.checkpoints import save_model
        from backbone.model import GLIP

        save_model(GLIP.from_pretrained(official), out, source=str(official))
        official.unlink()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "reference")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", nargs="*", default=["float32"], help="float32, bfloat16, float16 (CUDA): each in turn")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "glip-adapt-bench")
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    parser.add_argument("--deform-impl", default="config", choices=["config", "torchvision", "im2col", "gather"])
    parser.add_argument("--sizes", nargs="*", type=int, default=[320, 800], help="shorter sides to run")
    parser.add_argument("--worker", nargs=4, metavar=("WEIGHTS", "CASE", "H", "W"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        weights, case, h, w = args.worker
        print(json.dumps(worker(weights, case, int(h), int(w), args.runs, args.threads, args.device, args.dtype[0],
                                args.deform_impl)))
        return
    args.cache.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in args.cases:
        weights = build_weights(args.reference, case, args.cache)
        for (height, width), dtype in [(s, d) for s in SIZES if s[0] in args.sizes for d in args.dtype]:
            run = subprocess.run([sys.executable, __file__, "--worker", str(weights), case, str(height), str(width),
                                  "--runs", str(args.runs), "--threads", str(args.threads), "--device", args.device,
                                  "--dtype", dtype, "--deform-impl", args.deform_impl],
                                 capture_output=True, text=True,
                                 env={**os.environ, "PYTHONWARNINGS": "ignore"})
            if run.returncode != 0:
                raise SystemExit(run.stderr[-2000:])
            row = json.loads(run.stdout.strip().splitlines()[-1])
            rows.append(row)
            official_s, official_gib = OFFICIAL[(case, height)]
            print(f"{CASES[case][0]:<10} {row['size']:>9} ({row['padded']}) {row['device']} {row['dtype']} "
                  f"deform={row['deform_impl']}: "
                  f"median {row['median_s']:.2f} s (runs {row['runs_s']}), peak RSS {row['peak_rss_gib']:.2f} GiB"
                  + (f", peak CUDA {row['peak_cuda_gib']} GiB" if row["peak_cuda_gib"] else "")
                  + f"  | official CPU: {official_s} s, {official_gib or '-'} GiB  -> {official_s / row['median_s']:.1f}x",
                  flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
