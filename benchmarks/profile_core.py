"""Where a GLIP-T forward spends its time, by stage and by op, under a chosen dtype (torch.profiler).

    python benchmarks/profile_core.py [--case glip_t] [--size 800 1344] [--dtype bfloat16] [--threads 1]

Stages: Swin + FPN, then per DyHead layer its fusion block, its BERT layer and its DyConv, then the head, each
under `record_function`, so the table's stage rows give their share of the total.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed_core import CASES, build_weights  # noqa: E402

from backbone.detector import split_prompt  # noqa: E402
from backbone.device import autocast, resolve_device, resolve_dtype  # noqa: E402
from backbone.model import GLIP  # noqa: E402
from backbone.processor import GLIPProcessor  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "reference")
    parser.add_argument("--case", default="glip_t", choices=list(CASES))
    parser.add_argument("--size", type=int, nargs=2, default=[800, 1344], metavar=("H", "W"))
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/glip-adapt-bench"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device("cpu")
    dtype = resolve_dtype(args.dtype, device)
    model = GLIP.from_pretrained(str(build_weights(args.reference, args.case, args.cache))).eval()
    [prompt] = GLIPProcessor.from_config(model.config).tokenize(split_prompt(CASES[args.case][1]))
    pixels = torch.randn(1, 3, *args.size)

    def call() -> None:
        with torch.no_grad(), autocast(device, dtype):
            text = model.encode_prompt(prompt.input_ids, prompt.attention_mask)
            with record_function("stage: swin+fpn"):
                levels = model.encode_images(pixels).levels
            hidden = text.hidden
            for layer in model.dyhead.layers:
                if layer.fusion is not None:
                    with record_function("stage: fusion"):
                        levels, hidden = layer.fusion(levels, hidden, text.mask)
                if layer.text_layer is not None:
                    with record_function("stage: bert layer"):
                        out = layer.text_layer(hidden)
                        hidden = out[0] if isinstance(out, tuple) else out
                with record_function("stage: dyconv"):
                    levels = layer.dyconv(levels)
            with record_function("stage: head"):
                model.head(levels, hidden if model.deep_fusion else text.embedded)

    call()
    with profile() as prof:
        call()
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=30))


if __name__ == "__main__":
    main()
