"""Adapters on the Hugging Face Hub: `push` writes a model repository, `open_adapter` reads one back.

A pushed repository holds three files:
  adapter_model.safetensors   the adapter file, byte for byte
  adapter_config.json         its header metadata as readable JSON, plus where to get the base
  README.md                   a model card (huggingface_hub's ModelCard): library, base, task, categories,
                              evaluation results and usage
A reference `hf://OWNER/NAME[@REVISION][/SUBFOLDER]` (huggingface_hub's own URI grammar, so `@refs/pr/3` works)
names the `adapter_model.safetensors` of that repository, revision and folder; a path ending in `.safetensors`
names that file instead. References resolve through huggingface_hub's download cache: with HF_HUB_OFFLINE=1 they
read what an earlier download left there, and HF_HUB_CACHE / HF_HOME / HF_ENDPOINT / HF_TOKEN apply as usual.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePath

from glip_io import atomic_write
from adapt import __version__
from adapt.adapter import Adapter, AdapterError, load_adapter, read_adapter_header

SCHEME = "hf://"
ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
CARD_FILE = "README.md"
LIBRARY = "glip-adapt"
# Header entries stored as JSON text in the safetensors header; adapter_config.json holds them decoded.
_JSON_KEYS = ("categories", "category_tokens", "lora_config", "training", "evaluation")
_CONFIG_ORDER = ("format", "format_version", "strategy", "task", "categories", "prompt", "category_tokens",
                 "base_model", "base_fingerprint", "lora_config", "training", "evaluation", "toolkit_version")


class HubError(AdapterError):
    """A Hub reference that cannot be resolved or a push that cannot be done; the message says what to do."""


@dataclass(frozen=True)
class HubRef:
    """Where an `hf://` reference points: a file of a model repository at a revision."""

    repo_id: str
    revision: str | None
    subfolder: str  # "" for the repository's root
    filename: str = ADAPTER_FILE

    @property
    def path_in_repo(self) -> str:
        return f"{self.subfolder}/{self.filename}" if self.subfolder else self.filename


def is_hub_ref(ref) -> bool:
    return _as_text(ref).startswith(SCHEME)


def _as_text(ref) -> str:
    """The reference as written; pathlib folds "hf://a/b" into "hf:/a/b", so a Path built from one is still one."""
    text = str(ref)
    if isinstance(ref, PurePath) and text.startswith("hf:/") and not text.startswith(SCHEME) and not Path(ref).exists():
        return SCHEME + text[len("hf:/"):]
    return text


def parse_ref(ref: str | PurePath) -> HubRef:
    """The repository, revision and file of an `hf://` reference; refuses anything but a model repository."""
    from huggingface_hub import parse_hf_uri
    from huggingface_hub.errors import HfUriError

    text = _as_text(ref)
    try:
        uri = parse_hf_uri(text)
    except HfUriError as error:
        raise HubError(f"{text} is not a Hub reference ({error.msg.strip()}); write "
                       "hf://OWNER/NAME[@REVISION][/SUBFOLDER]") from None
    if uri.type != "model":
        raise HubError(f"{text} points at a {uri.type}; adapters live in model repositories: "
                       "hf://OWNER/NAME[@REVISION][/SUBFOLDER]")
    folder, _, name = uri.path_in_repo.rpartition("/")
    if name.endswith(".safetensors"):
        return HubRef(uri.id, uri.revision, folder, name)
    return HubRef(uri.id, uri.revision, uri.path_in_repo.strip("/"))


def open_adapter(ref: str | PurePath) -> Path:
    """The local file of an adapter reference: a path as it is, or an `hf://` reference fetched into (or found
    in) huggingface_hub's cache and checked to be an adapter file. Errors name the reference as given."""
    if not is_hub_ref(ref):
        return Path(ref)
    label = _as_text(ref)
    path = _download(parse_ref(label), label)
    read_adapter_header(path, source=label)  # a file that is no adapter is refused here, named by its reference
    return path


def _download(ref: HubRef, label: str) -> Path:
    from huggingface_hub import hf_hub_download, is_offline_mode
    from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    try:
        return Path(hf_hub_download(ref.repo_id, ref.filename, subfolder=ref.subfolder or None,
                                    revision=ref.revision, library_name=LIBRARY, library_version=__version__))
    except LocalEntryNotFoundError:  # before EntryNotFoundError, its parent: nothing cached and no Hub reached
        if is_offline_mode():
            raise HubError(f"{label} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids fetching "
                           f"it; run `adapt adapters pull {label}` once online, or unset HF_HUB_OFFLINE") from None
        raise HubError(f"cannot reach the Hub to fetch {label}, and it is not in the local cache; check the "
                       "connection (or HF_ENDPOINT), or pull it once online and then set HF_HUB_OFFLINE=1") from None
    except RepositoryNotFoundError:
        raise HubError(f"{label}: repository {ref.repo_id!r} not found on the Hub (or it is private: log in with "
                       "`hf auth login` or set HF_TOKEN); check OWNER/NAME") from None
    except RevisionNotFoundError:
        raise HubError(f"{label}: repository {ref.repo_id!r} has no revision {ref.revision!r}; check the name "
                       "after '@' (a branch, tag or commit)") from None
    except EntryNotFoundError:
        raise HubError(f"{label}: {ref.repo_id!r} has no {ref.path_in_repo}, so it is not a glip-adapt adapter "
                       "repository; adapters are pushed with `adapt push ADAPTER OWNER/NAME`") from None
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else "?"
        raise HubError(f"the Hub refused {label} (HTTP {status}); check the reference and your token "
                       "(`hf auth login` or HF_TOKEN)") from None


@dataclass
class PushResult:
    repo_id: str
    revision: str | None
    files: list[str]  # the repository's files, as written
    location: str  # the local folder (--local-dir), else the commit's URL


def push(adapter: str | PurePath, repo_id: str, *, private: bool = False, revision: str | None = None,
         local_dir: str | Path | None = None, token: str | None = None) -> PushResult:
    """Write the adapter's repository (adapter, config, card) and upload it as one commit to `repo_id` (created
    if missing; `revision` is a branch, created from main if missing); with `local_dir`, only write the files."""
    _check_repo_id(repo_id)
    if local_dir is not None:
        files = write_repo(adapter, local_dir, repo_id)
        return PushResult(repo_id, revision, [f.name for f in files], str(local_dir))
    with tempfile.TemporaryDirectory(prefix="adapt-push-") as staging:
        files = write_repo(adapter, staging, repo_id)
        meta = read_adapter_header(files[0])
        url = _upload(Path(staging), repo_id, private=private, revision=revision, token=token,
                      message=f"Upload {meta['strategy']} adapter for task {meta['task']!r}")
    return PushResult(repo_id, revision, [f.name for f in files], url)


def _check_repo_id(repo_id: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        if repo_id.count("/") != 1:
            raise HFValidationError("it needs exactly one '/'")
        validate_repo_id(repo_id)
    except HFValidationError as error:
        reason = str(error).split("\n")[0].rstrip(".")
        raise HubError(f"repository {repo_id!r} is not OWNER/NAME ({reason}); e.g. me/icons-aquarium") from None


def write_repo(adapter: str | PurePath, folder: str | Path, repo_id: str) -> list[Path]:
    """Write adapter_model.safetensors (unchanged), adapter_config.json and README.md into `folder`."""
    label = _as_text(adapter)
    path = open_adapter(adapter)
    loaded = load_adapter(path, source=label)  # every check a reader would make, before anything is written
    data = path.read_bytes()
    folder = Path(folder)
    config = adapter_config(read_adapter_header(path, source=label), hashlib.sha256(data).hexdigest())
    return [atomic_write(folder / ADAPTER_FILE, data),
            atomic_write(folder / CONFIG_FILE, (json.dumps(config, indent=2) + "\n").encode()),
            atomic_write(folder / CARD_FILE, str(model_card(loaded, repo_id)).encode())]


def adapter_config(metadata: dict[str, str], sha256: str) -> dict:
    """The header metadata as JSON (JSON-valued entries decoded), with where to get the base and the file's hash."""
    config = {"library_name": LIBRARY}
    # The header's order is not kept by safetensors: a fixed order makes the same adapter give the same file.
    rank = {key: i for i, key in enumerate(_CONFIG_ORDER)}
    for key in sorted(metadata, key=lambda k: (rank.get(k, len(rank)), k)):
        config[key] = json.loads(metadata[key]) if key in _JSON_KEYS else metadata[key]
        if key == "base_fingerprint":
            config["base_source"] = base_source(metadata.get("base_model", ""))
    config.setdefault("base_source", base_source(metadata.get("base_model", "")))
    config["adapter_file"] = ADAPTER_FILE
    config["adapter_sha256"] = sha256
    return config


def base_source(name: str) -> str:
    """Where a base named `name` comes from, for people who load the adapter elsewhere."""
    from backbone.checkpoints import CHECKPOINTS, HUB_REPO

    entry = CHECKPOINTS.get(name)
    if entry is not None and entry.local_file:
        return "embedded in the glip-adapt package (no download)"
    if entry is not None and entry.hub_file:
        return f"{SCHEME}{HUB_REPO}/{entry.hub_file} (fetched on first use)"
    return "a local checkpoint file: pass the same file as --base"


def _hub_base(name: str) -> str | None:
    from backbone.checkpoints import CHECKPOINTS, HUB_REPO

    entry = CHECKPOINTS.get(name)
    return HUB_REPO if entry is not None and entry.hub_file else None


_CARD = """---
{{ card_data }}
---

# {{ task }}: a glip-adapt {{ strategy }} adapter

Detects {{ categories | length }} categories of the task `{{ task }}` with the GLIP base model `{{ base }}`,
adapted by {{ strategy }}. Made with glip-adapt {{ version }}.

| | |
|---|---|
| library | glip-adapt {{ version }} |
| base model | `{{ base }}` (fingerprint `{{ fingerprint }}`): {{ source }} |
| task | `{{ task }}` |
| strategy | {{ strategy }} |
| categories | {{ categories | join(", ") }} |
| prompt | `{{ prompt }}` |
{%- for key, value in training %}
| {{ key }} | {{ value }} |
{%- endfor %}

## Evaluation

{% if results -%}
COCO AP on the task's evaluation split.

| | AP | AP50 |
|---|---|---|
{%- for name, metrics in results %}
| {{ name }} | {{ metrics.AP }} | {{ metrics.AP50 }} |
{%- endfor %}
{%- else -%}
Not evaluated.
{%- endif %}

## Usage

With glip-adapt installed:

```bash
adapt predict --adapter hf://{{ repo_id }} photo.jpg
adapt adapters pull hf://{{ repo_id }} --to adapters/    # a server's folder, for `adapt serve`
python -c "from adapt.predict import AdapterDetector; print(AdapterDetector.load('hf://{{ repo_id }}').detect('photo.jpg'))"
```

The adapter file is `adapter_model.safetensors`; `adapter_config.json` is its header metadata as JSON.
"""
_TRAINING_KEYS = ("shots", "seed", "steps", "epochs", "lr", "batch_size")


def model_card(adapter: Adapter, repo_id: str):
    """The repository's README as a huggingface_hub ModelCard (YAML metadata + the text above)."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    results = [(name, adapter.evaluation[key]) for key, name in (("zero_shot", "zero-shot base"),
                                                                  ("tuned", "this adapter"))
               if isinstance(adapter.evaluation.get(key), dict) and "AP" in adapter.evaluation[key]]
    tuned = adapter.evaluation.get("tuned") if isinstance(adapter.evaluation.get("tuned"), dict) else {}
    eval_results = [EvalResult(task_type="object-detection", dataset_type=adapter.task, dataset_name=adapter.task,
                               metric_type=metric, metric_name=f"COCO {metric}", metric_value=tuned[metric])
                    for metric in ("AP", "AP50") if metric in tuned]
    data = ModelCardData(library_name=LIBRARY, base_model=_hub_base(adapter.base_model),
                         pipeline_tag="object-detection", model_name=repo_id.split("/")[-1],
                         tags=["glip", LIBRARY, "adapter", adapter.strategy, "object-detection"],
                         eval_results=eval_results or None)
    training = [(k, adapter.training[k]) for k in _TRAINING_KEYS if adapter.training.get(k) is not None]
    return ModelCard.from_template(
        data, template_str=_CARD, task=adapter.task, strategy=adapter.strategy, categories=adapter.category_names,
        base=adapter.base_model, fingerprint=adapter.base_fingerprint[:16], source=base_source(adapter.base_model),
        prompt=adapter.caption, training=training, results=results, repo_id=repo_id,
        version=adapter.toolkit_version or __version__)


def _upload(folder: Path, repo_id: str, *, private: bool, revision: str | None, token: str | None,
            message: str) -> str:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    api = HfApi(token=token, library_name=LIBRARY, library_version=__version__)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision, commit_message=message)
    except OfflineModeIsEnabled:
        raise HubError(f"cannot push to {repo_id}: HF_HUB_OFFLINE=1 forbids uploads; unset it, or write the "
                       "files with --local-dir DIR") from None
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status in (401, 403):
            raise HubError(f"the Hub refused the push to {repo_id} (HTTP {status}): log in with a write token "
                           "(`hf auth login` or HF_TOKEN) that may write to that owner") from None
        raise HubError(f"the push to {repo_id} failed (HTTP {status}); retry, or write the files with "
                       "--local-dir DIR and upload them yourself") from None
    except OSError as error:  # no network at all
        raise HubError(f"cannot reach the Hub to push {repo_id} ({type(error).__name__}); check the connection "
                       "(or HF_ENDPOINT), or write the files with --local-dir DIR") from None
    return str(commit.commit_url)


def pull(ref: str | PurePath, to: str | Path | None = None, name: str | None = None,
         overwrite: bool = False) -> Path:
    """Fetch an adapter into the cache and, with `to`, copy it into that folder as `<name or task>.safetensors`
    (the layout `adapt serve` reads). Refuses to replace a different file unless `overwrite`."""
    label = _as_text(ref)
    path = open_adapter(ref)
    adapter = load_adapter(path, source=label)
    if to is None:
        return path
    from adapt.serve.pool import SUFFIX, validate_name

    try:
        stem = validate_name(name or adapter.task)
    except ValueError as error:
        raise HubError(f"{error}; pass --name NAME for the file in {to}") from None
    target = Path(to) / f"{stem}{SUFFIX}"
    data = path.read_bytes()
    if target.exists() and not overwrite and target.read_bytes() != data:
        raise HubError(f"{target} exists and holds another adapter; pass --name NEW to keep both, or --overwrite")
    return atomic_write(target, data)


__all__ = ["ADAPTER_FILE", "CARD_FILE", "CONFIG_FILE", "HubError", "HubRef", "PushResult", "adapter_config",
           "is_hub_ref", "model_card", "open_adapter", "parse_ref", "pull", "push", "write_repo"]
