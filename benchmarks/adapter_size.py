"""Size of a prompt-tuning adapter on GLIP-T for the ODinW Aquarium prompt (7 categories, with descriptions),
with P0 stored in float32 and in float16 (`adapt prompt-tune --prompt-dtype float16`), and what the float16
rounding does to GLIP-T's detections on one image.

    python benchmarks/adapter_size.py [--weights GLIP-T weights; default: built from ../shared/reference]
    python benchmarks/adapter_size.py --no-descriptions     # the odinw_13 prompt (names only)
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--weights", default=None)
    parser.add_argument("--no-descriptions", action="store_true", help="the odinw_13 prompt (names only)")
    parser.add_argument("--image", default=None, help="image to detect on (default: a generated icons-aquarium test scene)")
    parser.add_argument("--size", type=int, default=512, help="input short side for the detection check")
    parser.add_argument("--reference", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "reference")
    args = parser.parse_args()
    from PIL import Image

    from adapt.adapter import Adapter, base_fingerprint, load_adapter, save_adapter
    from torchvision.ops import box_iou

    from backbone.detector import GLIPDetector
    from adapt.tune import task_tokens
    from backbone.model import GLIP
    from backbone.processor import GLIPProcessor
    from tasks import get_task

    weights = args.weights
    if weights is None:
        from speed_core import build_weights

        weights = build_weights(args.reference, "glip_t", Path(tempfile.gettempdir()) / "glip-adapt-bench")
    glip = GLIP.from_pretrained(str(weights)).eval()
    glip.config = dataclasses.replace(glip.config, image=dataclasses.replace(glip.config.image, min_size=args.size,
                                                                             max_size=args.size))
    task = get_task("aquarium")
    categories = task.categories
    if args.no_descriptions:
        categories = [dataclasses.replace(c, prefix="", suffix="") for c in categories]
    prompt = task_tokens(GLIPProcessor.from_config(glip.config), categories)
    with torch.no_grad():
        features = glip.encode_prompt(prompt.input_ids, prompt.attention_mask)
    adapter = Adapter(strategy="prompt-tune", task=task.name,
                      categories=[{"name": c.name, "prefix": c.prefix, "suffix": c.suffix} for c in task.categories],
                      prompt=features, positive_map=prompt.positive_map, input_ids=prompt.input_ids,
                      caption=prompt.caption, base_model="glip-t", base_fingerprint=base_fingerprint(glip))
    print(f"prompt {prompt.caption!r}: {prompt.num_tokens} tokens x {glip.config.text.hidden_size}")
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float32", "float16"):
            size = save_adapter(adapter, Path(tmp) / f"{dtype}.safetensors", prompt_dtype=dtype).stat().st_size
            print(f"  P0 in {dtype}: adapter {size:,} bytes ({size / 1000:.1f} KB; target < 100 KB)")
        half = load_adapter(Path(tmp) / "float16.safetensors")
    detector = GLIPDetector(glip, GLIPProcessor.from_config(glip.config))
    if args.image is None:  # ODinW images cannot be downloaded here; an icon-world aquarium scene stands in
        scenes = get_task("icons-aquarium").split("test")
        image = scenes.load_image(scenes.image_ids[0])
    else:
        image = Image.open(args.image).convert("RGB")
    batch = detector.processor.preprocess([image])
    visual = glip.encode_images(batch.pixel_values, batch.image_sizes)
    runs = {name: detector.detect_with_features(batch, p0, prompt.positive_map, task.category_names, visual=visual)[0]
            for name, p0 in (("float32", features), ("float16", half.prompt))}
    full, rounded = runs["float32"], runs["float16"]
    top = min(len(full), len(rounded), 100)
    # Near-tied scores may swap ranks, so match each float32 detection to a float16 one (same label, IoU > 0.99).
    iou = box_iou(full.boxes[:top], rounded.boxes[:top])
    iou[full.labels[:top, None] != rounded.labels[None, :top]] = 0
    best_iou, match = iou.max(dim=1)
    found = best_iou > 0.99
    score_change = (full.scores[:top][found] - rounded.scores[:top][match[found]]).abs().max()
    print(f"  float16 P0 vs float32 on a {batch.image_sizes[0][1]}x{batch.image_sizes[0][0]} input: "
          f"{int(found.sum())}/{top} top detections found again, scores within {score_change:.1e}")

if __name__ == "__main__":
    main()
