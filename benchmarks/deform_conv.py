"""Modulated deformable conv on CPU: torchvision's kernel vs our im2col (grid_sample + matmul) and gather
(embedding_bag + matmul) vs plain conv.

    python benchmarks/deform_conv.py [--threads 2] [--parts 1 2 3] [--dtype float32] [--rounds 4]

Part 1: one 3x3 conv (256 channels) on the GLIP-T DyHead level sizes at 800x1344 input.
Part 2: a glip-nano training step (batch 8, 256 px) with plain convs (the preset) and with deformable convs.
Part 3: the GLIP-T(A) forward at 800x1344 (reference weights), im2col and gather interleaved in one process,
round after round, so a machine whose speed drifts from minute to minute affects both alike.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from backbone.dyhead import modulated_deform_conv, use_deform_impl

from timing import timed_runs  # benchmarks/timing.py, beside this script


def timed(fn, runs: int = 3) -> float:
    return statistics.median(timed_runs(fn, runs))


def part1(rounds: int = 5) -> None:
    print(f"one 3x3 modulated deformable conv, 256 -> 256 channels (median of {rounds} interleaved rounds):")
    for height, width in [(100, 168), (50, 84), (25, 42)]:
        x = torch.randn(1, 256, height, width)
        weight, bias = torch.randn(256, 256, 3, 3) * 0.02, torch.randn(256)
        offset, mask = torch.randn(1, 18, height, width), torch.rand(1, 9, height, width)
        plain = torch.nn.Conv2d(256, 256, 3, padding=1)
        calls = {impl: (lambda impl=impl: modulated_deform_conv(x, offset, mask, weight, bias, 1, impl))
                 for impl in ("torchvision", "im2col", "gather")}
        calls["plain conv"] = lambda: plain(x)
        times = {name: [] for name in calls}
        with torch.no_grad():
            for call in calls.values():
                call()  # warm-up
            for _ in range(rounds):  # each round runs every implementation, so drift hits them alike
                for name, call in calls.items():
                    started = time.perf_counter()
                    call()
                    times[name].append(time.perf_counter() - started)
        print(f"  {height:>3}x{width:<3}  " + "   ".join(f"{name} {statistics.median(runs) * 1000:7.1f} ms"
                                                        for name, runs in times.items()))


def part2() -> None:
    from backbone.config import glip_nano
    from backbone.loss import GroundingLoss, GroundingTarget
    from backbone.model import GLIP

    print("glip-nano training step, batch 8 x 256x256 (median of 3):")
    base = glip_nano()
    for label, dyhead in [("plain conv (preset)", base.dyhead),
                          ("deformable, torchvision", dataclasses.replace(base.dyhead, deformable=True,
                                                                           deform_impl="torchvision")),
                          ("deformable, im2col", dataclasses.replace(base.dyhead, deformable=True,
                                                                      deform_impl="im2col")),
                          ("deformable, gather", dataclasses.replace(base.dyhead, deformable=True,
                                                                      deform_impl="gather"))]:
        torch.manual_seed(0)
        model = GLIP.from_config(dataclasses.replace(base, dyhead=dyhead))
        model.text.requires_grad_(False)
        loss_fn = GroundingLoss()
        ids = torch.randint(1000, 5000, (8, 30))
        prompt = model.encode_prompt(ids, torch.ones_like(ids)).detach()
        pixels = torch.randn(8, 3, 256, 256)
        targets = [GroundingTarget(torch.tensor([[20.0, 30.0, 90.0, 120.0]]),
                                   torch.zeros(1, 30, dtype=torch.bool).index_fill_(1, torch.tensor([3]), True))] * 8

        def step():
            loss = loss_fn(model(prompt, pixels), targets)["loss"]
            loss.backward()

        print(f"  {label:<26} {timed(step):.2f} s")


def part3(dtype_name: str, rounds: int) -> None:
    from pathlib import Path

    from speed_core import CASES, build_weights  # benchmarks/speed_core.py, beside this script

    from backbone.detector import split_prompt
    from backbone.device import autocast, resolve_dtype
    from backbone.model import GLIP
    from backbone.processor import GLIPProcessor

    reference = Path(__file__).resolve().parents[2] / "shared" / "reference"
    model = GLIP.from_pretrained(str(build_weights(reference, "glip_a", Path("/tmp/glip-adapt-bench")))).eval()
    dtype = resolve_dtype(dtype_name, torch.device("cpu"))
    [prompt] = GLIPProcessor.from_config(model.config).tokenize(split_prompt(CASES["glip_a"][1]))
    pixels = torch.randn(1, 3, 800, 1344, generator=torch.Generator().manual_seed(0))

    def forward(impl: str):
        use_deform_impl(model, impl)
        with torch.no_grad(), autocast(torch.device("cpu"), dtype):
            return model(model.encode_prompt(prompt.input_ids, prompt.attention_mask), pixels, [(800, 1333)])

    print(f"GLIP-T(A) forward, 800x1344, {dtype_name}, implementations interleaved ({rounds} rounds after a warm-up):")
    times = {"im2col": [], "gather": []}
    for impl in times:
        forward(impl)
    for _ in range(rounds):
        for impl in times:
            started = time.perf_counter()
            forward(impl)
            times[impl].append(time.perf_counter() - started)
    for impl, runs in times.items():
        print(f"  {impl:<7} median {statistics.median(runs):.2f} s  (runs {', '.join(f'{t:.2f}' for t in runs)})")
    ratios = [a / b for a, b in zip(times["im2col"], times["gather"])]
    print(f"  im2col / gather, round by round: {', '.join(f'{r:.2f}' for r in ratios)} "
          f"(median {statistics.median(ratios):.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parts", type=int, nargs="*", default=[1, 2, 3])
    parser.add_argument("--dtype", default="float32", help="part 3's autocast dtype")
    parser.add_argument("--rounds", type=int, default=4, help="part 3's rounds")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for part in args.parts:
        if part == 3:
            part3(args.dtype, args.rounds)
        else:
            {1: part1, 2: part2}[part]()


if __name__ == "__main__":
    main()
