"""Download and unpack task data (ODinW zips from the Hub model repo GLIPModel/GLIP).

- Download: `huggingface_hub.hf_hub_download` (progress bar, Range-resume of interrupted transfers,
  `endpoint` or $HF_ENDPOINT for mirrors and for tests against a local server), wrapped in a clean retry.
- Check: the file size against the server's metadata, and the SHA-256 against `expected_sha256` or, for
  LFS files, the server's ETag (the Hub's LFS ETag is the content's SHA-256). A mismatch deletes the
  download and raises `ChecksumError`.
- Unpack: into a temporary folder beside the target, then one `rename` into place, so a task folder is
  either complete or absent; archive members with absolute paths or `..` are refused.
"""
from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

HUB_REPO = "GLIPModel/GLIP"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class FetchError(RuntimeError):
    """A download that could not be completed."""


class ChecksumError(FetchError):
    """Downloaded bytes differ from the expected size or SHA-256."""


@dataclass(frozen=True)
class FetchResult:
    path: Path  # the unpacked folder
    archive_sha256: str | None  # None when the folder was already there
    downloaded: bool


def sha256_of(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def download(filename: str, cache_dir: str | Path, *, repo_id: str = HUB_REPO, repo_type: str = "model",
             revision: str | None = None, endpoint: str | None = None, expected_sha256: str | None = None,
             attempts: int = 3, progress: bool = True) -> tuple[Path, str]:
    """Download one file of a Hub repo into `cache_dir` (Hub cache layout); returns (path, sha256).

    Interrupted transfers resume with HTTP Range inside `hf_hub_download`; a failed attempt is retried
    from scratch up to `attempts` times. The result is verified (see module docstring).
    """
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    url = hf_hub_url(repo_id, filename, repo_type=repo_type, revision=revision, endpoint=endpoint)
    last: Exception | None = None
    silence = not progress and not are_progress_bars_disabled()
    for attempt in range(1, attempts + 1):
        if silence:
            disable_progress_bars()
        try:
            meta = get_hf_file_metadata(url, endpoint=endpoint)
            path = Path(hf_hub_download(repo_id, filename, repo_type=repo_type, revision=revision,
                                        cache_dir=str(cache_dir), endpoint=endpoint, force_download=attempt > 1))
        except Exception as e:  # network errors, 5xx, truncated bodies: start again cleanly
            last = e
            continue
        finally:
            if silence:
                enable_progress_bars()
        digest = _verify(path, meta, expected_sha256, url)
        return path, digest
    raise FetchError(f"could not download {url} after {attempts} attempts: {type(last).__name__}: {last}") from last


def _verify(path: Path, meta, expected_sha256: str | None, url: str) -> str:
    size = path.stat().st_size
    if meta.size is not None and size != meta.size:
        _discard(path)
        raise ChecksumError(f"{url}: downloaded {size} bytes, the server announced {meta.size}; removed the file")
    digest = sha256_of(path)
    server = (meta.etag or "").strip('"').lower()
    expected = (expected_sha256 or "").lower() or (server if _SHA256.match(server) else "")
    if expected and digest != expected:
        _discard(path)
        source = "expected" if expected_sha256 else "the server's ETag says"
        raise ChecksumError(f"{url}: SHA-256 {digest} but {source} {expected}; removed the download, "
                            "run the command again to retry")
    return digest


def _discard(path: Path) -> None:
    """Remove a Hub-cache file: the snapshot link and the blob it points to."""
    blob = path.resolve()
    path.unlink(missing_ok=True)
    blob.unlink(missing_ok=True)


def unpack_zip(archive: str | Path, target: str | Path, *, progress: bool = True) -> Path:
    """Extract `archive` so that its content ends up at `target`, atomically.

    A zip holding one top-level folder named like `target` (e.g. `Aquarium/...`) is unwrapped into it;
    any other zip becomes the content of `target`. Fails if `target` exists.
    """
    archive, target = Path(archive), Path(target)
    if target.exists():
        raise FileExistsError(f"{target} already exists; remove it to unpack again")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.unpack-", dir=target.parent))
    try:
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            for m in members:
                p = PurePosixPath(m.filename)
                if p.is_absolute() or ".." in p.parts or m.filename.startswith(("/", "\\")):
                    raise FetchError(f"{archive}: refusing unsafe member path {m.filename!r}")
            iterator = members
            if progress:
                from tqdm import tqdm

                iterator = tqdm(members, desc=f"unpack {archive.name}", unit="file")
            for m in iterator:
                zf.extract(m, tmp)
        entries = [p for p in tmp.iterdir() if p.name != "__MACOSX"]
        source = entries[0] if len(entries) == 1 and entries[0].is_dir() and entries[0].name == target.name else tmp
        source.chmod(0o755)  # mkdtemp makes the folder private
        source.rename(target)
    except zipfile.BadZipFile as e:
        raise FetchError(f"{archive}: not a valid zip archive ({e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def fetch_task(task, data_root: str | Path, *, endpoint: str | None = None, expected_sha256: str | None = None,
               keep_archive: bool = False, progress: bool = True, attempts: int = 3) -> FetchResult:
    """Download and unpack a downloadable task (one with `fetch_file`) under `data_root`.

    ODinW zips unpack to `<data_root>/odinw/<Name>/`; nothing is downloaded when that folder exists.
    """
    if task.fetch_file is None:
        raise ValueError(f"task {task.name!r} is not downloadable. {task.how_to_get()}")
    data_root = Path(data_root).expanduser()
    name = PurePosixPath(task.fetch_file).stem
    target = data_root / task.subdir.split("/", 1)[0] / name
    if target.is_dir():
        return FetchResult(target, None, False)
    cache = data_root / ".downloads"
    path, digest = download(task.fetch_file, cache, endpoint=endpoint, expected_sha256=expected_sha256,
                            attempts=attempts, progress=progress)
    unpack_zip(path, target, progress=progress)
    if not keep_archive:
        _discard(path)
    return FetchResult(target, digest, True)
