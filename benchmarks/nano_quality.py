"""Measured quality of the embedded base models (the numbers of backbone/weights/MODEL_CARD.md).

    python benchmarks/nano_quality.py [--models glip-nano glip-nano-a] [--protocols per-image-16 ...]
                                      [--out benchmarks/results/nano_quality.json]

Protocols (COCOeval bbox, test split of each task):
  held-in, per-image-16: icons-heldin (pretraining categories, unseen scenes); each image is prompted
      with 16 names: its present categories plus random absent ones (seeded by image id);
  held-in, all-chunked-40: the same images prompted with all 506 pretraining categories, run as chunks of
      at most 40 categories and merged before NMS (GLIP's LVIS evaluation);
  held-in, all-chunked: the same, with chunks filling up to 256 tokens;
  zero-shot: each downstream icon task (held-out categories) with its own prompt.
Every row also reports the hit rate, the top-1 naming rate and (per-image) the name-blind floor AP50
(adapt/evaluation.py). Each figure is reproduced by `adapt eval --base MODEL --task TASK --split test --protocol PROTOCOL`.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

DOWNSTREAM = ["icons-aquarium", "icons-vehicles", "icons-thermal", "icons-aerial", "icons-described"]
HELDIN_PROTOCOLS = ("per-image-16", "all-chunked-40", "all-chunked")


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
    parser.add_argument("--models", nargs="*", default=["glip-nano", "glip-nano-a"],
                        help="embedded names or weight files (a file is reported under its preset's name)")
    parser.add_argument("--protocols", nargs="*", default=list(HELDIN_PROTOCOLS), choices=HELDIN_PROTOCOLS)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/nano_quality.json"))
    parser.add_argument("--picture", type=Path, default=Path("docs/images/glip_nano_detections.png"),
                        help="contact sheet of glip-nano detections ('none': skip)")
    parser.add_argument("--no-zero-shot", action="store_true", help="held-in protocols only")
    parser.add_argument("--data-root", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    import torch

    from adapt.evaluation import evaluate
    from backbone.detector import GLIPDetector
    from glip_io import atomic_write
    from tasks import get_task

    if args.threads:
        torch.set_num_threads(args.threads)
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    for model in args.models:
        detector = GLIPDetector.from_pretrained(model)
        name = detector.model.config.name
        heldin = get_task("icons-heldin", data_root=args.data_root).split("test")
        row = {}
        for protocol in args.protocols:
            started = time.perf_counter()
            metrics = evaluate(detector, heldin, protocol)
            row[f"heldin/{protocol}"] = {key: round(value, 2) for key, value in metrics.headline().items()}
            row[f"heldin/{protocol}"]["seconds"] = round(time.perf_counter() - started, 1)
            print(f"{name} icons-heldin {protocol}: " + describe(metrics), flush=True)
        for task in [] if args.no_zero_shot else DOWNSTREAM:
            split = get_task(task, data_root=args.data_root).split("test")
            metrics = evaluate(detector, split, "task")
            row[f"zero-shot/{task}"] = {key: round(value, 2) for key, value in metrics.headline().items()}
            print(f"{name} zero-shot {task}: " + describe(metrics), flush=True)
        if not args.no_zero_shot:
            zero_shot = [row[f"zero-shot/{task}"]["AP"] for task in DOWNSTREAM]
            row["zero-shot/mean AP"] = round(sum(zero_shot) / len(zero_shot), 2)
        results[name] = {**results.get(name, {}), **row}  # other protocols measured before stay
        atomic_write(args.out, json.dumps(results, indent=1).encode())  # after each model: a cut run keeps rows
        if name == "glip-nano" and args.picture and args.picture.name != "none":
            args.picture.parent.mkdir(parents=True, exist_ok=True)
            render(detector, heldin, args.picture)
    print(json.dumps(results, indent=1))


def describe(metrics) -> str:
    text = f"AP {metrics.AP:.1f} AP50 {metrics.AP50:.1f} hit {metrics.hit_rate:.1f} % " \
           f"named right {metrics.naming_rate:.1f} %"
    if metrics.name_blind_floor_AP50 is not None:
        text += f" (name-blind floor AP50 {metrics.name_blind_floor_AP50:.1f})"
    return text


if __name__ == "__main__":
    main()
