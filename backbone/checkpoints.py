"""Named checkpoints and their files: embedded glip-nano weights, official .pth files, converted safetensors, the Hub.

A flat table, timm `default_cfgs` style: name -> where the weights are and which preset they fit.
Converted/embedded files are safetensors whose header metadata carries the model config as JSON.
This module finds and reads files; it never builds a model (`GLIP.from_pretrained` does, with these readers),
so loading does not import the model back.
"""
from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from glip_io import atomic_write
from backbone.config import GLIPConfig
from backbone.device import DTYPES

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
        state = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in state.items()}
    header = {"format": "glip-adapt/model", "config": json.dumps(model.config.to_dict()),
              "excluded_prefix": exclude_prefix or "", **{k: str(v) for k, v in metadata.items()}}
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=header))


def read_safetensors_header(path: str | Path) -> dict[str, str]:
    """The string metadata in a safetensors file's header (any safetensors file, not only models)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as error:
        raise ValueError(f"{path} is not a readable safetensors file ({error})") from error


def read_config(path: str | Path) -> GLIPConfig | None:
    """The model config stored by `save_model`, or None for a file without one (e.g. the official layout)."""
    header = read_safetensors_header(path) if Path(path).suffix == ".safetensors" else {}
    return GLIPConfig.from_dict(json.loads(header["config"])) if "config" in header else None


def read_saved_state(path: str | Path, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict of a `save_model` file for a model whose own state is `expected`, ready for a strict load.

    Tensors the file left out on purpose (`exclude_prefix`) and a language backbone the model was built without
    are taken from `expected`; tensors are cast to the model's dtypes (a file may store float16).
    """
    # "adapter.*" tensors ride along in merged single-task models (adapt adapters merge); not model weights.
    state = {k: v for k, v in load_file(str(path)).items() if not k.startswith("adapter.")}
    if not any(k.startswith("text.") for k in expected):
        state = {k: v for k, v in state.items() if not k.startswith("text.")}
    excluded = read_safetensors_header(path).get("excluded_prefix") or None
    if excluded:  # those tensors come from their own source (the packaged text encoder), already loaded
        state.update({k: v for k, v in expected.items() if k.startswith(excluded)})
    return {k: v.to(expected[k].dtype) if k in expected and v.is_floating_point() else v for k, v in state.items()}


def resolve_weights(name_or_path: str | Path) -> Path:
    """The local file for a checkpoint name (see `list_checkpoints()`), a local path, or a Hub file name."""
    name = str(name_or_path)
    entry = CHECKPOINTS.get(name)
    if entry is not None and entry.local_file:
        local = WEIGHTS_DIR / entry.local_file
        if not local.exists():
            raise FileNotFoundError(f"embedded weights {local} are missing; reinstall glip-adapt or pretrain them "
                                    f"with `adapt pretrain --preset {name}`")
        return local
    path = Path(name)
    return path if path.exists() else _download(name)


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
