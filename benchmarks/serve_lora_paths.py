"""How the server should run a LoRA tenant's fusion + head: printed figures, not a timed test.

The fusion's folded order reads the visual projections' `.weight` directly, so a LoRA update on them must be
in that weight or the projection must be called. Two exact ways, timed on the same batch:
  folded  per adapter, `functional_call` with W + scale·B·A on every target (the folded fusion order runs);
  direct  one pass for all adapters, each adding scale·B·(A·x) per sample through forward hooks (the fusion
          takes its direct order, which projects every visual token to embed_dim).
Both are checked to give the same alignment logits before they are timed.

    OMP_NUM_THREADS=1 python benchmarks/serve_lora_paths.py --base glip-nano --tenants 1 4 --reps 5
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn


def hooked(model: nn.Module, factors: list[dict], rows_of: list[list[int]]):
    """Hooks adding sample rows' scale·B(Ax) in every target module (the direct way)."""
    modules = dict(model.named_modules())
    handles = []
    for factor, rows in zip(factors, rows_of):
        index = torch.tensor(rows)
        for name, (down, up, scale) in factor.items():
            def hook(_module, args, output, down=down, up=up, scale=scale, index=index):
                delta = (args[0].index_select(0, index) @ down.T) @ up.T
                return output.index_add(0, index, delta * scale)
            handles.append(modules[name].register_forward_hook(hook))
    stack = contextlib.ExitStack()
    stack.callback(lambda: [h.remove() for h in handles])
    return stack


def main() -> None:
    from adapt.serve.lora import LoRAFactors, folded_weights
    from adapt.strategies import LORA_DEFAULT_TARGETS
    from backbone.model import GLIP
    from backbone.outputs import PromptFeatures, VisualFeatures
    from backbone.processor import GLIPProcessor
    import re

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="glip-nano")
    parser.add_argument("--tenants", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=None, help="square padded size (default: the base's)")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    base = GLIP.from_pretrained(args.base).eval().requires_grad_(False)
    processor = GLIPProcessor.from_config(base.config)
    [tokens] = processor.tokenize(["fish", "shark", "penguin", "jellyfish", "starfish"])
    with torch.no_grad():
        p0 = base.encode_prompt(tokens.input_ids, tokens.attention_mask)
    side = args.image_size or processor.image.max_size
    weights = dict(base.named_parameters())
    targets = [n for n, m in base.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(LORA_DEFAULT_TARGETS, n)]
    print(f"{args.base}: {side}x{side} images, LoRA r={args.rank} on {len(targets)} targets, "
          f"torch threads {torch.get_num_threads()}")
    for tenants in args.tenants:
        factors = [{t: (0.02 * torch.randn(args.rank, weights[f"{t}.weight"].shape[1]),
                        0.02 * torch.randn(weights[f"{t}.weight"].shape[0], args.rank), 2.0) for t in targets}
                   for _ in range(tenants)]
        lora = [LoRAFactors({t: f[t][0] for t in f}, {t: f[t][1] for t in f}, 2.0) for f in factors]
        with torch.inference_mode():
            visual = base.encode_images(torch.randn(tenants, 3, side, side))
            prompt = p0.expand(tenants)

            def one(i):
                return VisualFeatures([lvl[i:i + 1] for lvl in visual.levels], visual.image_sizes[i:i + 1])

            def run_folded():
                return [torch.func.functional_call(base, folded_weights(weights, lora[i]), (PromptFeatures(
                    prompt.hidden[i:i + 1], prompt.embedded[i:i + 1], prompt.mask[i:i + 1]),),
                    {"visual": one(i)}).alignment_logits for i in range(tenants)]

            def run_direct():
                with hooked(base, factors, [[i] for i in range(tenants)]):
                    return list(base.fuse_and_predict(visual, prompt).alignment_logits.split(1))

            diff = max(float((a - b).abs().max()) for a, b in zip(run_folded(), run_direct()))
            times = {"folded": [], "direct": []}
            for _ in range(args.reps):  # interleaved, so drift on a shared machine hits both alike
                for name, fn in (("folded", run_folded), ("direct", run_direct)):
                    start = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - start)
        folded, direct = (statistics.median(times[k]) * 1000 for k in ("folded", "direct"))
        print(f"  {tenants} LoRA tenants, one image each: folded per adapter {folded:.1f} ms, direct with hooks "
              f"{direct:.1f} ms ({direct / folded:.2f}x); max |logit diff| {diff:.1e}")


if __name__ == "__main__":
    main()
