"""Named checkpoints and loading: embedded glip-nano weights, official .pth files, converted safetensors, the Hub.

A flat table, timm `default_cfgs` style: name -> where the weights are and which preset they fit.
Converted/embedded files are safetensors whose header metadata carries the model config as JSON.
"""
from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from glip_io import atomic_write
from backbone.config import GLIPConfig

HUB_REPO = "GLIPModel/GLIP"
WEIGHTS_DIR = Path(__file__).parent / "weights"


@dataclass(frozen=True)
class Checkpoint:
    preset: str
    hub_file: str | None = None  # file in the Hub repo GLIPModel/GLIP
    local_file: str | None = None  # file under backbone/weights/ (embedded in this package)
    zero_shot_coco_ap: float | None = None


CHECKPOINTS: dict[str, Checkpoint] = {
    "glip-nano": Checkpoint("glip-nano", local_file="glip-nano.safetensors"),
    "glip-nano-a": Checkpoint("glip-nano-a", local_file="glip-nano-a.safetensors"),
    "glip-t-a": Checkpoint("glip-t-a", hub_file="glip_a_tiny_o365.pth", zero_shot_coco_ap=42.9),
    "glip-t-b": Checkpoint("glip-t", hub_file="glip_tiny_model_o365.pth", zero_shot_coco_ap=44.9),
    "glip-t-c": Checkpoint("glip-t", hub_file="glip_tiny_model_o365_goldg.pth", zero_shot_coco_ap=46.7),
    "glip-t": Checkpoint("glip-t", hub_file="glip_tiny_model_o365_goldg_cc_sbu.pth", zero_shot_coco_ap=46.6),
    "glip-l": Checkpoint("glip-l", hub_file="glip_large_model.pth", zero_shot_coco_ap=51.4),
}


def list_checkpoints() -> list[str]:
    return list(CHECKPOINTS)


def fingerprint_state(state: dict[str, torch.Tensor]) -> str:
    """A stable sha256 over names, shapes, dtypes and bytes of a state dict (adapters name their base by it)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().contiguous().cpu()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def save_model(model, path: str | Path, *, exclude_prefix: str | None = None, dtype: str | None = None,
               **metadata: str) -> None:
    """Write the model's weights and config to one safetensors file, atomically.

    `exclude_prefix` leaves out tensors that loading rebuilds elsewhere (e.g. "text." for a frozen
    packaged BERT); `dtype="float16"` halves the file (loading casts back to the model's dtype).
    """
    path = Path(path)
    if model.config is None:
        raise ValueError("model has no config to store; build it with GLIP.from_config")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
             if not (exclude_prefix and k.startswith(exclude_prefix))}
    if dtype is not None:
        state = {k: v.to(getattr(torch, dtype)) if v.is_floating_point() else v for k, v in state.items()}
    header = {"format": "glip-adapt/model", "config": json.dumps(model.config.to_dict()),
              "excluded_prefix": exclude_prefix or "", **{k: str(v) for k, v in metadata.items()}}
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=header))


def read_metadata(path: str | Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def load_converted(path: str | Path, with_text: bool = True, skip_text_keys: bool = False):
    """A GLIP from a safetensors file written by `save_model` (strict)."""
    from safetensors.torch import load_file

    from backbone.model import GLIP

    path = Path(path)
    try:
        metadata = read_metadata(path)
    except Exception as error:
        raise ValueError(f"{path} is not a readable safetensors file ({error})") from error
    if "config" not in metadata:
        raise ValueError(f"{path} has no GLIP config in its metadata: an official-layout file? "
                         f"convert it first with `adapt convert {path} OUT.safetensors`")
    config = GLIPConfig.from_dict(json.loads(metadata["config"]))
    model = GLIP.from_config(config, with_text=with_text)
    # "adapter.*" tensors ride along in merged single-task models (adapt adapters merge); not model weights.
    state = {k: v for k, v in load_file(str(path)).items() if not k.startswith("adapter.")}
    expected = model.state_dict()
    excluded = metadata.get("excluded_prefix") or None
    if not with_text:
        state = {k: v for k, v in state.items() if not k.startswith("text.")}
    if excluded:  # those tensors come from their own source (the packaged text encoder), already loaded
        state.update({k: v for k, v in expected.items() if k.startswith(excluded)})
    state = {k: v.to(expected[k].dtype) if k in expected and v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True)
    return model


def load_pretrained(name_or_path: str, with_text: bool = True):
    """GLIP from a checkpoint name (see `list_checkpoints()`), a local .pth/.safetensors, or a Hub file name."""
    from backbone.convert import infer_config, load_official_into, read_official
    from backbone.model import GLIP

    path = Path(name_or_path)
    if name_or_path in CHECKPOINTS and CHECKPOINTS[name_or_path].local_file:
        local = WEIGHTS_DIR / CHECKPOINTS[name_or_path].local_file
        if not local.exists():
            raise FileNotFoundError(f"embedded weights {local} are missing; reinstall glip-adapt or pretrain them "
                                    f"with `adapt pretrain --preset {name_or_path}`")
        return load_converted(local, with_text=with_text)
    if not path.exists():
        path = _download(name_or_path)
    if path.suffix == ".safetensors" and "config" in read_metadata(path):
        return load_converted(path, with_text=with_text)
    official = read_official(path)
    config = infer_config(official)
    model = GLIP.from_config(config)
    load_official_into(model, official, config)
    return model


def _download(name: str) -> Path:
    entry = CHECKPOINTS.get(name)
    filename = entry.hub_file if entry else name
    known = [c.hub_file for c in CHECKPOINTS.values() if c.hub_file]
    if entry is None and filename not in known:
        close = difflib.get_close_matches(name, list(CHECKPOINTS) + known, n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise FileNotFoundError(f"{name!r} is neither a local file nor a known checkpoint.{hint} "
                                f"Known: {', '.join(CHECKPOINTS)}")
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(HUB_REPO, filename))
    except Exception as error:
        raise FileNotFoundError(
            f"could not fetch {filename} from the Hub repo {HUB_REPO} ({type(error).__name__}). Offline? Download "
            f"https://huggingface.co/{HUB_REPO}/resolve/main/{filename} elsewhere and pass its local path instead, "
            f"e.g. --base /path/to/{filename}") from error
