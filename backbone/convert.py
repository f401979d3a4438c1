"""Official GLIP checkpoints (maskrcnn_benchmark layout) → this package's module names.

The mapping is an explicit table of regular expressions (official key → our key, or `None` to drop,
with the reason). Loading is strict: every official key must be mapped or knowingly dropped, every
model key must be filled, every shape must agree; otherwise the error lists the offending keys
grouped by module. Checkpoints are read with `torch.load(weights_only=True)`, which never unpickles code.
"""
from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import torch
from torch import Tensor, nn

from backbone.anchors import anchor_template
from backbone.config import GLIPConfig, get_preset


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model: missing, unexpected or mis-shaped keys."""


def _shift_downsample(match: re.Match) -> str:
    # Official Swin merges patches at the END of stage i; timm at the START of stage i+1.
    return f"swin.body.layers.{int(match[1]) + 1}.downsample.{match[2]}"


def _tower_key(match: re.Match, deep_fusion: bool) -> str:
    index, rest = int(match[1]), match[2]
    if not deep_fusion:
        return f"dyhead.layers.{index}.dyconv.{rest}"
    layer, part = divmod(index, 3)  # [VLFuse, BertEncoderLayer, DyConv] per tower layer
    if part == 0:
        return f"dyhead.layers.{layer}.fusion.{rest.removeprefix('b_attn.')}"
    if part == 1:
        return f"dyhead.layers.{layer}.text_layer.{rest}"
    return f"dyhead.layers.{layer}.dyconv.{rest}"


# (pattern, replacement or None, why it is dropped). First match wins.
KEY_TABLE: list[tuple[str, object, str]] = [
    (r"backbone\.body\.layers\.(\d+)\.blocks\.(\d+)\.attn\.relative_position_index", None,
     "recomputed by timm (checked against the checkpoint)"),
    (r"backbone\.body\.patch_embed\.(.*)", r"swin.body.patch_embed.\1", ""),
    (r"backbone\.body\.layers\.(\d+)\.blocks\.(.*)", r"swin.body.layers.\1.blocks.\2", ""),
    (r"backbone\.body\.layers\.(\d+)\.downsample\.(.*)", _shift_downsample, ""),
    (r"backbone\.body\.norm(\d)\.(weight|bias)", r"swin.norms.\1.\2", ""),
    (r"backbone\.fpn\.fpn_inner(\d)\.(.*)", lambda m: f"fpn.lateral.{int(m[1]) - 2}.{m[2]}", ""),
    (r"backbone\.fpn\.fpn_layer(\d)\.(.*)", lambda m: f"fpn.output.{int(m[1]) - 2}.{m[2]}", ""),
    (r"backbone\.fpn\.top_blocks\.p6\.(.*)", r"fpn.extra.0.\1", ""),
    (r"backbone\.fpn\.top_blocks\.p7\.(.*)", r"fpn.extra.1.\1", ""),
    (r"language_backbone\.body\.model\.embeddings\.(position_ids|token_type_ids)", None,
     "constant buffer of transformers 4.x BERT (arange / zeros)"),
    (r"language_backbone\.body\.model\.pooler\..*", None, "BERT pooler, unused by GLIP"),
    (r"language_backbone\.body\.model\.(.*)", r"text.bert.\1", ""),
    (r"rpn\.head\.dyhead_tower\.(\d+)\.(.*)", "tower", ""),
    (r"rpn\.head\.cls_logits\.(weight|bias)", None,
     "legacy classifier, computed by the official code only for its width (caps prompts at 80 phrases)"),
    (r"rpn\.head\.(bbox_pred|centerness|dot_product_projection_text)\.(weight|bias)", r"head.\1.\2", ""),
    (r"rpn\.head\.scales\.(\d+)\.scale", r"head.scales.\1.scale", ""),
    (r"rpn\.head\.(log_scale|bias_lang|bias0)", r"head.\1", ""),
    (r"rpn\.anchor_generator\.cell_anchors\.(\d+)", None, "anchor templates, recomputed (checked)"),
]


def unwrap_state_dict(checkpoint: dict) -> dict[str, Tensor]:
    """The model state dict of an official checkpoint file: under "model", keys prefixed "module."."""
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointMismatchError("not a GLIP checkpoint: expected a dict of tensors, optionally under 'model'")
    return {k.removeprefix("module."): v for k, v in state.items()}


def read_official(path: str | Path) -> dict[str, Tensor]:
    """Read an official .pth (or a safetensors file in the official key layout) without unpickling code."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return unwrap_state_dict(load_file(str(path)))
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt zip, truncated file, pickled code, ...
        raise CheckpointMismatchError(f"cannot read {path} as a PyTorch checkpoint ({error}); "
                                      "is the download complete?") from error
    return unwrap_state_dict(checkpoint)


def infer_config(official: dict[str, Tensor]) -> GLIPConfig:
    """Which preset an official state dict is (GLIP-T, GLIP-T(A) or GLIP-L), from its keys and shapes."""
    embed = official.get("backbone.body.patch_embed.proj.weight")
    if embed is None:
        raise CheckpointMismatchError("not a GLIP checkpoint: no 'backbone.body.patch_embed.proj.weight'; "
                                      "is this a checkpoint of another model?")
    deep_fusion = any(".b_attn." in k for k in official)
    if embed.shape[0] == 192:
        return get_preset("glip-l")
    if embed.shape[0] == 96:
        return get_preset("glip-t" if deep_fusion else "glip-t-a")
    raise CheckpointMismatchError(f"Swin embedding width {embed.shape[0]} matches no GLIP preset (96: T, 192: L)")


def map_key(key: str, deep_fusion: bool) -> tuple[str | None, str]:
    """Our name for an official key (None when dropped) and why; KeyError when the table has no rule."""
    for pattern, target, reason in KEY_TABLE:
        match = re.fullmatch(pattern, key)
        if not match:
            continue
        if target is None:
            return None, reason
        if target == "tower":
            return _tower_key(match, deep_fusion), ""
        if callable(target):
            return target(match), ""
        return match.expand(target), ""
    raise KeyError(key)


def _group(keys) -> str:
    groups = defaultdict(list)
    for key in sorted(keys):
        groups[".".join(key.split(".")[:3])].append(key)
    lines = []
    for module, members in groups.items():
        shown = ", ".join(members[:4]) + (f", … (+{len(members) - 4})" if len(members) > 4 else "")
        lines.append(f"  {module}: {len(members)} keys: {shown}")
    return "\n".join(lines)


def convert_state_dict(official: dict[str, Tensor], model: nn.Module, deep_fusion: bool,
                       strides: tuple[int, ...] = (8, 16, 32, 64, 128), anchor_base_size: int = 8) -> dict[str, Tensor]:
    """Map an official state dict onto `model`'s keys; raise CheckpointMismatchError listing every problem."""
    expected = model.state_dict()
    converted, unexpected, misshaped, misshaped_targets = {}, [], [], set()
    for key, value in official.items():
        try:
            ours, _ = map_key(key, deep_fusion)
        except KeyError:
            unexpected.append(key)
            continue
        if ours is None:
            _check_dropped(key, value, expected, strides, anchor_base_size, model)
            continue
        if ours not in expected:
            unexpected.append(key)
        elif tuple(expected[ours].shape) != tuple(value.shape):
            misshaped.append(f"{key} {tuple(value.shape)} -> {ours} {tuple(expected[ours].shape)}")
            misshaped_targets.add(ours)
        else:
            converted[ours] = value.to(expected[ours].dtype)
    missing = [k for k in expected if k not in converted and k not in misshaped_targets]
    problems = []
    if missing:
        problems.append(f"missing from the checkpoint ({len(missing)}):\n{_group(missing)}")
    if unexpected:
        problems.append(f"unexpected in the checkpoint ({len(unexpected)}):\n{_group(unexpected)}")
    if misshaped:
        problems.append(f"shape mismatches ({len(misshaped)}):\n  " + "\n  ".join(misshaped[:20]))
    if problems:
        raise CheckpointMismatchError("checkpoint does not fit the model:\n" + "\n".join(problems))
    return converted


def _check_dropped(key: str, value: Tensor, expected: dict, strides, anchor_base_size: int, model: nn.Module) -> None:
    """Buffers we recompute must equal what the checkpoint stored, else our recomputation is wrong for it."""
    anchors = re.fullmatch(r"rpn\.anchor_generator\.cell_anchors\.(\d+)", key)
    if anchors:
        level = int(anchors[1])
        if level < len(strides):
            ours = anchor_template(strides[level], anchor_base_size * strides[level])
            if not torch.equal(ours, value.float().reshape(1, 4)):
                raise CheckpointMismatchError(f"{key} = {value.tolist()} differs from the recomputed anchor "
                                              f"{ours.tolist()}: anchor sizes/strides of this checkpoint are not "
                                              "the preset's")
        return
    relative = re.fullmatch(r"backbone\.body\.layers\.(\d+)\.blocks\.(\d+)\.attn\.relative_position_index", key)
    if relative:
        stage, block = int(relative[1]), int(relative[2])
        ours = model.swin.body.layers[stage].blocks[block].attn.relative_position_index
        if ours.is_meta:  # shape-only conversion (e.g. a key-layout check): nothing to compare
            return
        if not torch.equal(ours.reshape(value.shape).to(value.dtype), value):
            raise CheckpointMismatchError(f"{key} differs from timm's relative position index")


def load_official_into(model: nn.Module, official: dict[str, Tensor], config: GLIPConfig) -> None:
    state = convert_state_dict(official, model, config.fusion.enabled, config.strides, config.head.anchor_base_size)
    model.load_state_dict(state, strict=True)
