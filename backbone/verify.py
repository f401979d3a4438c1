"""Check this GLIP against a reference case: a folder of inputs and outputs produced by the official code.

A case folder holds keys.json (official key layout), prompt.json, input.png, outputs.safetensors and
outputs.json; its parent holds init_weights.py, which rebuilds the official-format checkpoint
deterministically. We rebuild it (running that script from its own folder), convert and load it
strictly, run the case, and compare every stage within the tolerances below (relative to each tensor's
largest value) and the detections with the matching rule of `match_detections`.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor
from torchvision.ops import box_iou

from backbone.device import autocast, resolve_device, resolve_dtype

# Relative tolerances, max|ours - ref| / max|ref| (README "Tolerances": ~5-10x the official noise floor).
TOLERANCES = {"bert": 1e-5, "backbone": 1e-5, "fpn": 1e-5, "dyhead": 2e-4, "head": 2e-4}


@dataclass(frozen=True)
class MatchRule:
    """When one of our detections stands for a reference one: same label, IoU and score within these bounds."""

    min_iou: float = 0.99
    max_score_diff: float = 1e-4


FLOAT32_RULE = MatchRule()

# Reduced precision (bf16 autocast; fp16 on CUDA is held to the same bounds), against the float32 official outputs.
# u = 2^-8 is bf16's unit roundoff (8-bit significand); every matmul/conv input is rounded to it.
# - BERT, Swin and FPN: 12 blocks in series whose rounding errors add at random give about sqrt(12)*u = 3.5u
#   relative to the tensor's largest value; doubled for margin: 8u.
# - DyHead and head: they run on the FPN's (already rounded) output and round again in every layer: 16u.
# - Detections: a score sqrt(p*c) moves by ~s/2 * (dlogit + dcenterness); with |logit| <= ~9, s <= 0.3 and the
#   logits' relative error <= 16u that is <= 0.01, so a detection matches at |dscore| <= 0.01 and IoU >= 0.9 (a
#   box decoded from deltas with relative error 16u moves by a few percent of its side). A reference detection
#   whose score lies within 0.01 of the top-N cut may swap with its neighbour: it is fragile, and as many extra
#   detections are allowed.
REDUCED_U = 2.0**-8
REDUCED_TOLERANCES = {"bert": 8 * REDUCED_U, "backbone": 8 * REDUCED_U, "fpn": 8 * REDUCED_U,
                      "dyhead": 16 * REDUCED_U, "head": 16 * REDUCED_U}
REDUCED_RULE = MatchRule(min_iou=0.9, max_score_diff=0.01)


@dataclass
class CheckResult:
    name: str
    worst: float
    tolerance: float
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.worst <= self.tolerance


@dataclass
class CaseReport:
    case: str
    model: str
    checks: list[CheckResult] = field(default_factory=list)
    seconds: float = 0.0
    floor_runs: list[dict[str, float]] = field(default_factory=list)  # reduced precision: see precision_floor

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def render(self) -> str:
        lines = [f"case {self.case} ({self.model})"]
        for c in self.checks:
            status = "ok  " if c.ok else "FAIL"
            lines.append(f"  {status} {c.name:<28} worst {c.worst:.3g} (tolerance {c.tolerance:.3g}) {c.detail}")
        if self.floor_runs:
            lines.append("       precision floor, weights rounded to nearest / stochastically (seeds 0-"
                         f"{len(self.floor_runs) - 2}), float32 compute:")
            for key, label in (("dyhead", "dyhead"), ("head", "head"), ("missed", "unmatched")):
                lines.append(f"         {label:<10} " + " / ".join(f"{run[key]:.3g}" for run in self.floor_runs))
        lines.append(f"  {'PASS' if self.ok else 'FAIL'} in {self.seconds:.1f} s")
        return "\n".join(lines)


def relative_error(ours: Tensor, ref: Tensor) -> float:
    if ours.shape != ref.shape:
        return float("inf")
    scale = ref.abs().max().clamp(min=1e-12)
    return float((ours.float() - ref.float()).abs().max() / scale) if ref.numel() else 0.0


def rebuild_weights(case_dir: Path, out_file: Path) -> None:
    """Run the initialiser that sits in the case's parent folder, from there, on the case's keys.json."""
    script = case_dir.parent / "init_weights.py"
    if not script.exists():
        raise FileNotFoundError(f"{script} not found: a reference case folder must sit beside init_weights.py")
    run = subprocess.run([sys.executable, script.name, str((case_dir / "keys.json").resolve()), str(out_file)],
                         cwd=script.parent, capture_output=True, text=True)
    if run.returncode != 0 or "OK" not in run.stdout:
        raise RuntimeError(f"init_weights.py failed for {case_dir}:\n{run.stdout}\n{run.stderr}")


def match_detections(boxes: Tensor, scores: Tensor, labels: Tensor, ref_boxes: Tensor, ref_scores: Tensor,
                     ref_labels: Tensor, fragile: set[int], max_extra: int,
                     rule: MatchRule = FLOAT32_RULE) -> tuple[int, int, int]:
    """One-to-one matching (same label, IoU ≥ rule.min_iou, |Δscore| ≤ rule.max_score_diff).

    Returns (unmatched non-fragile reference detections, extra detections, matched)."""
    used = torch.zeros(len(boxes), dtype=torch.bool)
    iou = box_iou(ref_boxes, boxes) if len(boxes) and len(ref_boxes) else torch.zeros(len(ref_boxes), len(boxes))
    missed, matched = 0, 0
    for i in range(len(ref_boxes)):
        ok = (labels == ref_labels[i]) & (iou[i] >= rule.min_iou) & \
            ((scores - ref_scores[i]).abs() <= rule.max_score_diff) & ~used
        if ok.any():
            j = int(torch.nonzero(ok)[0])
            used[j] = True
            matched += 1
        elif i not in fragile:
            missed += 1
    return missed, int((~used).sum()), matched


def reduced_fragile(boxes: Tensor, scores: Tensor, labels: Tensor, rule: MatchRule, nms_threshold: float) -> set[int]:
    """Reference detections that reduced precision may legitimately drop: a score within the score tolerance of the
    top-N cut (it can swap with a neighbour), or a same-label, higher-scoring neighbour whose IoU lies within
    1 - rule.min_iou below the NMS threshold (moved boxes can cross it and suppress this one)."""
    fragile = set(((scores - scores.min()).abs() <= rule.max_score_diff).nonzero().flatten().tolist())
    iou = box_iou(boxes, boxes)
    band = (iou > nms_threshold - (1 - rule.min_iou)) & (iou <= nms_threshold)
    higher = scores[None, :] > scores[:, None]  # [i, j]: j scores higher than i
    near_nms = band & higher & (labels[:, None] == labels[None, :])
    return fragile | set(near_nms.any(1).nonzero().flatten().tolist())


# A reduced-precision run is also held to the case's own precision floor: this float32 model with its weights
# rounded to the reduced dtype, once to nearest and FLOOR_ROUNDINGS times stochastically (each a valid copy of the
# weights at that precision, as the official code at that precision would hold them). On an ill-conditioned case no
# run at that precision can meet the roundoff bounds above: with the reference's random weights, rounding
# GLIP-T(C)'s weights alone moves its DyHead output by 51-84 % and loses 13-39 robust detections, depending on the
# rounding. Each check then allows FLOOR_FACTOR times the floor's worst run: autocast also rounds the activations
# every matmul reads, a second source of the weights' size, and independent sources add as sqrt(2).
FLOOR_ROUNDINGS = 3
FLOOR_FACTOR = 2.0 ** 0.5
STAGES = ("bert", "backbone", "fpn", "dyhead", "head")


def verify_case(case_dir: str | Path, threads: int | None = 2, device: str | None = "cpu",
                dtype: str | None = "float32") -> CaseReport:
    from backbone.model import GLIP
    from backbone.processor import GLIPProcessor

    case_dir = Path(case_dir)
    for name in ("keys.json", "prompt.json", "outputs.safetensors", "outputs.json"):
        if not (case_dir / name).exists():
            raise FileNotFoundError(f"{case_dir / name} is missing: not a reference case folder")
    if threads:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "official.safetensors"
        rebuild_weights(case_dir, weights)
        model = GLIP.from_pretrained(weights).eval()
    config = model.config
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    model = model.to(device)
    report = CaseReport(case=str(case_dir), model=f"{config.name}, {str(dtype).removeprefix('torch.')} on {device}")
    ref = load_file(str(case_dir / "outputs.safetensors"))
    described = json.loads((case_dir / "outputs.json").read_text())
    prompt = json.loads((case_dir / "prompt.json").read_text())
    processor = GLIPProcessor.from_config(config)

    # Prompt: ids, mask and positive map must be identical on the real tokens.
    spans = [tuple(s) for s in prompt["phrase_char_spans"]]
    chunks = processor.tokenize((prompt["caption"], spans))
    if len(chunks) != 1:
        raise ValueError("reference prompts fit in one chunk; this one was split")
    tokens = chunks[0]
    n = int(ref["lang.attention_mask"].sum())
    same_ids = torch.equal(tokens.input_ids, ref["lang.input_ids"][:, :n]) and \
        torch.equal(tokens.attention_mask.long(), ref["lang.attention_mask"][:, :n])
    same_map = torch.equal(tokens.positive_map, ref["lang.positive_map"][:, :n] > 0) and \
        bool((ref["lang.positive_map"][:, n:] == 0).all())
    report.checks.append(CheckResult("prompt ids/mask/positive map", 0.0 if same_ids and same_map else 1.0, 0.0,
                                     f"{n} tokens, {len(spans)} phrases"))

    # Pre-processing: our pipeline on input.png must reproduce the network input.
    image = processor.load_image(case_dir / "input.png")
    original_hw = tuple(described.get("original_image_hw", (image.height, image.width)))
    unpadded_hw = tuple(described.get("network_input_hw_unpadded", original_hw))
    batch = processor.preprocess([image], resize=unpadded_hw != original_hw)
    report.checks.append(CheckResult("preprocess input.image", relative_error(batch.pixel_values, ref["input.image"]),
                                     1e-6, f"{tuple(ref['input.image'].shape[-2:])}"))

    reduced = dtype != torch.float32
    measure = CaseMeasurement(model, config, tokens, ref, described, device, reduced, n, original_hw, unpadded_hw)
    ours = measure(dtype)
    if not reduced:
        tolerances, floor = dict(TOLERANCES), None
    else:
        report.floor_runs = precision_floor(model, measure, dtype)
        floor = {key: max(run[key] for run in report.floor_runs) for key in report.floor_runs[0]}
        tolerances = {stage: max(REDUCED_TOLERANCES[stage], FLOOR_FACTOR * floor[stage]) for stage in STAGES}

    def floor_note(key: str) -> str:
        return f"(precision floor {floor[key]:.3g})" if floor is not None else ""

    for stage in STAGES:
        report.checks.append(CheckResult(stage, ours[stage], tolerances[stage], floor_note(stage)))
    report.checks.append(CheckResult("anchors (exact)", ours["anchors"], 0.0))
    count_tolerance = ours["count_band"] if floor is None else max(ours["count_band"], FLOOR_FACTOR * floor["count"])
    report.checks.append(CheckResult("candidates per level (count)", ours["count"], count_tolerance,
                                     "|Δcount| ≤ the pairs within the error of the threshold " + floor_note("count")))
    missed_tolerance = 0 if floor is None else FLOOR_FACTOR * floor["missed"]
    extra_tolerance = ours["max_extra"] if floor is None else max(ours["max_extra"], FLOOR_FACTOR * floor["extra"])
    report.checks.append(CheckResult("detections: unmatched reference", ours["missed"], missed_tolerance,
                                     f"{ours['matched']}/{ours['references']} matched, {ours['fragile']} fragile "
                                     + floor_note("missed")))
    report.checks.append(CheckResult("detections: extra", ours["extra"], extra_tolerance,
                                     f"{ours['detections']} detections " + floor_note("extra")))
    report.seconds = time.perf_counter() - started
    return report


def round_stochastically(tensor: Tensor, dtype: torch.dtype, generator: torch.Generator) -> Tensor:
    """`tensor` rounded to one of its two neighbours in `dtype`, the nearer one the likelier (kept in float32)."""
    nearest = tensor.to(dtype)
    toward = torch.where(tensor > nearest.float(), float("inf"), float("-inf")).to(dtype)
    other = torch.nextafter(nearest, toward).float()
    nearest = nearest.float()
    gap = (other - nearest).abs()
    p_other = torch.where(gap > 0, (tensor - nearest).abs() / gap, torch.zeros_like(tensor))
    draw = torch.rand(tensor.shape, generator=generator, device=tensor.device)
    return torch.where(draw < p_other, other, nearest)


def precision_floor(model: torch.nn.Module, measure: "CaseMeasurement", dtype: torch.dtype) -> list[dict[str, float]]:
    """Float32 runs with the weights rounded to `dtype`: to nearest, then stochastically (seeds
    0..FLOOR_ROUNDINGS-1); the model's weights are restored afterwards."""
    weights = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    original = {k: v.clone() for k, v in weights.items()}
    runs = []
    for seed in [None, *range(FLOOR_ROUNDINGS)]:
        generator = None if seed is None else torch.Generator(measure.device).manual_seed(seed)
        with torch.no_grad():
            for key, tensor in weights.items():
                tensor.copy_(original[key].to(dtype) if generator is None
                             else round_stochastically(original[key], dtype, generator))
        runs.append(measure(torch.float32))
    with torch.no_grad():
        for key, tensor in weights.items():
            tensor.copy_(original[key])
    return runs


@dataclass
class CaseMeasurement:
    """One run of a case's network input and prompt through the model, compared stage by stage with the reference."""

    model: torch.nn.Module
    config: object
    tokens: object
    ref: dict[str, Tensor]
    described: dict
    device: torch.device
    reduced: bool  # judged by the reduced-precision rule (also the float32 floor run of a reduced check)
    num_tokens: int  # real prompt tokens
    original_hw: tuple[int, int]
    unpadded_hw: tuple[int, int]  # the network input before padding

    def __call__(self, dtype: torch.dtype) -> dict[str, float]:
        from backbone.postprocess import Postprocessor, phrase_probabilities
        from backbone.processor import rescale_boxes

        model, config, tokens, ref, device = self.model, self.config, self.tokens, self.ref, self.device
        n, original_hw, unpadded_hw = self.num_tokens, self.original_hw, self.unpadded_hw
        with torch.no_grad(), autocast(device, dtype):
            prompt_features = model.encode_prompt(tokens.input_ids.to(device), tokens.attention_mask.to(device))
            # the reference network input, to isolate the model from any pre-processing difference
            pixels = ref["input.image"].to(device)
            stages = model.swin(pixels)
            visual = model.encode_images(pixels, [unpadded_hw])
            outputs = model.fuse_and_predict(visual, prompt_features)
        outputs = outputs.to(torch.device("cpu"), torch.float32)
        prompt_features = prompt_features.to("cpu", torch.float32)
        stages = [s.cpu().float() for s in stages]

        def worst(pairs: list[tuple[Tensor, Tensor]]) -> float:
            return max(relative_error(a, b) for a, b in pairs)

        measured = {"bert": worst([(prompt_features.hidden, ref["lang.bert_hidden"][:, :n])]),
                    "backbone": worst([(s, ref[f"backbone.stage{i + 3}"]) for i, s in enumerate(stages)]),
                    "fpn": worst([(p.cpu(), ref[f"fpn.p{i + 3}"]) for i, p in enumerate(visual.levels)])}
        dyhead = [(v, ref[f"dyhead.visual.l{i}"]) for i, v in enumerate(outputs.fused_visual)]
        if "dyhead.lang_hidden" in ref:
            dyhead.append((outputs.fused_text, ref["dyhead.lang_hidden"][:, :n]))
        measured["dyhead"] = worst(dyhead)
        head = []
        for i, (logits, deltas, centerness) in enumerate(zip(outputs.split_levels(outputs.alignment_logits),
                                                             outputs.split_levels(outputs.box_deltas),
                                                             outputs.split_levels(outputs.centerness))):
            head += [(logits, ref[f"head.dot_product_logits.l{i}"][..., :n]),
                     (deltas, ref[f"head.bbox_reg.l{i}"].flatten(2).transpose(1, 2)),
                     (centerness, ref[f"head.centerness.l{i}"].flatten(1))]
        measured["head"] = worst(head)
        anchors = outputs.split_levels(outputs.anchors, 0)
        measured["anchors"] = max(float((a - ref[f"anchors.l{i}"]).abs().max())
                                  if a.shape == ref[f"anchors.l{i}"].shape else float("inf")
                                  for i, a in enumerate(anchors))

        postprocessor = Postprocessor.from_config(config)
        levels = postprocessor.level_candidates(outputs, 0, tokens.positive_map)
        measured["count"] = max(abs(len(c.scores) - ref[f"post.candidates.l{i}.scores"].shape[0])
                                for i, c in enumerate(levels))
        measured["count_band"] = 3.0
        if self.reduced:  # pairs whose probability lies within the logits' error of the threshold may cross it
            logit_error = REDUCED_TOLERANCES["head"] * float(outputs.alignment_logits.abs().max())
            probs = phrase_probabilities(outputs.alignment_logits[0], tokens.positive_map[:, :n])
            band = probs * (1 - probs) * logit_error
            measured["count_band"] += float(((probs - config.postprocess.score_threshold).abs() <= band).sum())
        final = postprocessor.select(type(levels[0]).cat(levels))
        boxes = rescale_boxes(final.boxes, unpadded_hw, original_hw)
        robustness = self.described.get("robustness", {})
        fragile = set(robustness.get("fragile_detection_indices", []))
        max_extra = int(robustness.get("max_extra_detections", 0))
        rule = REDUCED_RULE if self.reduced else FLOAT32_RULE
        if self.reduced:
            fragile |= reduced_fragile(ref["det.boxes"], ref["det.scores"], ref["det.labels"], rule,
                                       config.postprocess.nms_threshold)
            max_extra += len(fragile)
        missed, extra, matched = match_detections(boxes, final.scores, final.labels + 1, ref["det.boxes"],
                                                  ref["det.scores"], ref["det.labels"], fragile, max_extra, rule)
        measured.update(missed=missed, extra=extra, matched=matched, fragile=len(fragile), max_extra=max_extra,
                        references=len(ref["det.boxes"]), detections=len(boxes))
        return measured
