"""Icon-world generation throughput (scenes/s) at 256x256 on one CPU core.

    python benchmarks/icon_world_speed.py [--scenes 500] [--core 0]

Measures, after rendering the sprites once (reported separately):
  - pretraining samples (`IconPretrainDataset.sample`, half detection / half grounding), in memory;
  - each downstream task's scene style, in memory;
  - pretraining samples encoded to PNG (what `write_pretrain_corpus` does per image).
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.icons import ICON_TASKS, IconPretrainDataset, IconWorld, Rng  # noqa: E402
from tasks.icons.split import load_category_split  # noqa: E402


def rate(fn, n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        fn(i)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=500)
    parser.add_argument("--core", type=int, default=0, help="CPU core to pin to (Linux)")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.core})
    print(f"python {platform.python_version()}, {platform.processor() or platform.machine()}, "
          f"pinned to core {args.core}, {args.scenes} scenes per measurement, 256x256")

    world = IconWorld()
    start = time.perf_counter()
    world.warm()
    print(f"sprite rendering (once per process): {len(world.sprites)} sprites in {time.perf_counter() - start:.2f} s")

    dataset = IconPretrainDataset(world, length=args.scenes, seed=0)
    print(f"pretraining samples (in memory):  {rate(dataset.sample, args.scenes):7.1f} scenes/s")

    split = load_category_split()
    for name, spec in ICON_TASKS.items():
        icons = list(split.heldout[name])
        pool = list(world.pretrain_icons)

        def scene(i: int, spec=spec, icons=icons, pool=pool, name=name) -> None:
            rng = Rng("bench", name, i)
            objects = [rng.choice(icons) for _ in range(rng.integer(*spec.objects))]
            world.compose(rng, objects, rng.sample(pool, rng.integer(*spec.distractors)), spec.style)

        print(f"{name + ' scenes (in memory):':34}{rate(scene, args.scenes):7.1f} scenes/s")

    def to_png(i: int) -> None:
        image, _ = dataset.sample(i)
        image.save(io.BytesIO(), format="PNG", compress_level=1)

    print(f"pretraining samples + PNG encode: {rate(to_png, args.scenes):7.1f} scenes/s")


if __name__ == "__main__":
    main()
