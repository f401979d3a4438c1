"""Modulated deformable conv on CPU: torchvision's kernel vs our im2col (grid_sample + matmul) vs plain conv.

    python benchmarks/deform_conv.py [--threads 2]

Part 1: one 3x3 conv (256 channels) on the GLIP-T DyHead level sizes at 800x1344 input.
Part 2: a glip-nano training step (batch 8, 256 px) with plain convs (the preset) and with deformable convs.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics

import torch

from backbone.dyhead import modulated_deform_conv

from timing import timed_runs  # benchmarks/timing.py, beside this script


def timed(fn, runs: int = 3) -> float:
    return statistics.median(timed_runs(fn, runs))


def part1() -> None:
    print("one 3x3 modulated deformable conv, 256 -> 256 channels (median of 3):")
    for height, width in [(100, 168), (50, 84), (25, 42)]:
        x = torch.randn(1, 256, height, width)
        weight, bias = torch.randn(256, 256, 3, 3) * 0.02, torch.randn(256)
        offset, mask = torch.randn(1, 18, height, width), torch.rand(1, 9, height, width)
        plain = torch.nn.Conv2d(256, 256, 3, padding=1)
        with torch.no_grad():
            tv = timed(lambda: modulated_deform_conv(x, offset, mask, weight, bias, 1, "torchvision"))
            ours = timed(lambda: modulated_deform_conv(x, offset, mask, weight, bias, 1, "im2col"))
            conv = timed(lambda: plain(x))
        print(f"  {height:>3}x{width:<3}  torchvision {tv * 1000:7.1f} ms   im2col {ours * 1000:7.1f} ms   "
              f"plain conv {conv * 1000:6.1f} ms")


def part2() -> None:
    from backbone.config import glip_nano
    from backbone.loss import GroundingLoss, GroundingTarget
    from backbone.model import GLIP

    print("glip-nano training step, batch 8 x 256x256 (median of 3):")
    base = glip_nano()
    for label, dyhead in [("plain conv (preset)", base.dyhead),
                          ("deformable, torchvision", dataclasses.replace(base.dyhead, deformable=True)),
                          ("deformable, im2col", dataclasses.replace(base.dyhead, deformable=True,
                                                                      deform_impl="im2col"))]:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    part1()
    part2()


if __name__ == "__main__":
    main()
