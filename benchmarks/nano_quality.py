"""Measured quality of the embedded base models (the numbers of backbone/weights/MODEL_CARD.md).

    python benchmarks/nano_quality.py [--models glip-nano glip-nano-a] [--out benchmarks/results/nano_quality.json]

Protocols (COCOeval bbox, test split of each task):
  held-in, per-image-16: icons-heldin (pretraining categories, unseen scenes); each image is prompted
      with 16 names: its present categories plus random absent ones (seeded by image id);
  held-in, all-chunked: the same images prompted with all 506 pretraining categories, run as chunks of
      at most 256 tokens and merged before NMS (LVIS-style);
  zero-shot: each downstream icon task (held-out categories) with its own prompt.
Each figure is reproduced by `adapt eval --base MODEL --task TASK --split test --protocol PROTOCOL`.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

DOWNSTREAM = ["icons-aquarium", "icons-vehicles", "icons-thermal", "icons-aerial", "icons-described"]


def render(detector, dataset, out: Path, count: int = 4) -> None:
    from adapt.evaluation import per_image_names, task_prompt
    from tasks.visualize import contact_sheet, draw_predictions

    prompts = task_prompt(dataset.categories)
    tiles = []
    for image_id in dataset.image_ids[:count]:
        labels = per_image_names(dataset, image_id, 16)
        [dets] = detector.detect(dataset.load_image(image_id), [prompts[j] for j in labels], threshold=0.0)
        names = [dataset.categories[j].name for j in labels]
        tiles.append(draw_predictions(dataset.load_image(image_id), dets.boxes, dets.scores, dets.labels, names,
                                      score_threshold=0.3, target=None))
    contact_sheet(tiles, columns=count, cell=256).save(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=["glip-nano", "glip-nano-a"])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/nano_quality.json"))
    parser.add_argument("--picture", type=Path, default=Path("docs/images/glip_nano_detections.png"))
    parser.add_argument("--data-root", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    import torch

    from adapt.evaluation import evaluate
    from backbone.detector import GLIPDetector
    from tasks import get_task

    if args.threads:
        torch.set_num_threads(args.threads)
    results = {}
    for model in args.models:
        detector = GLIPDetector.from_pretrained(model)
        heldin = get_task("icons-heldin", data_root=args.data_root).split("test")
        row = {}
        for protocol in ("per-image-16", "all-chunked"):
            started = time.perf_counter()
            metrics = evaluate(detector, heldin, protocol)
            row[f"heldin/{protocol}"] = {"AP": round(metrics["AP"], 2), "AP50": round(metrics["AP50"], 2),
                                         "seconds": round(time.perf_counter() - started, 1)}
            print(f"{model} icons-heldin {protocol}: AP {metrics['AP']:.1f} AP50 {metrics['AP50']:.1f}", flush=True)
        for task in DOWNSTREAM:
            split = get_task(task, data_root=args.data_root).split("test")
            metrics = evaluate(detector, split, "task")
            row[f"zero-shot/{task}"] = {"AP": round(metrics["AP"], 2), "AP50": round(metrics["AP50"], 2)}
            print(f"{model} zero-shot {task}: AP {metrics['AP']:.1f} AP50 {metrics['AP50']:.1f}", flush=True)
        results[model] = row
        if model == "glip-nano" and args.picture:
            args.picture.parent.mkdir(parents=True, exist_ok=True)
            render(detector, heldin, args.picture)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
