"""Size of a prompt-tuning adapter on GLIP-T for the ODinW Aquarium prompt (7 categories, with descriptions).

    python benchmarks/adapter_size.py [--weights GLIP-T weights; default: built from ../shared/reference]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--weights", default=None)
    parser.add_argument("--no-descriptions", action="store_true", help="the odinw_13 prompt (names only)")
    parser.add_argument("--reference", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "reference")
    args = parser.parse_args()
    from adapt.adapter import Adapter, base_fingerprint, save_adapter
    from adapt.tune import task_tokens
    from backbone.model import GLIP
    from backbone.processor import GLIPProcessor
    from tasks import get_task

    weights = args.weights
    if weights is None:
        from speed_core import build_weights

        weights = build_weights(args.reference, "glip_t", Path(tempfile.gettempdir()) / "glip-adapt-bench")
    glip = GLIP.from_pretrained(str(weights)).eval()
    task = get_task("aquarium")
    categories = task.categories
    if args.no_descriptions:
        import dataclasses

        categories = [dataclasses.replace(c, prefix="", suffix="") for c in categories]
    prompt = task_tokens(GLIPProcessor.from_config(glip.config), categories)
    with torch.no_grad():
        features = glip.encode_prompt(prompt.input_ids, prompt.attention_mask)
    adapter = Adapter(strategy="prompt-tune", task=task.name,
                      categories=[{"name": c.name, "prefix": c.prefix, "suffix": c.suffix} for c in task.categories],
                      prompt=features, positive_map=prompt.positive_map, input_ids=prompt.input_ids,
                      caption=prompt.caption, base_model="glip-t", base_fingerprint=base_fingerprint(glip))
    with tempfile.TemporaryDirectory() as tmp:
        size = save_adapter(adapter, Path(tmp) / "aquarium.safetensors").stat().st_size
    print(f"prompt {prompt.caption!r}: {prompt.num_tokens} tokens x {glip.config.text.hidden_size} -> "
          f"adapter {size:,} bytes ({size / 1000:.1f} KB; target < 100 KB)")


if __name__ == "__main__":
    main()
