"""Adapters on the Hub: push (HTTP, against a local fake Hub), pull through huggingface_hub's cache, offline use.

The fake Hub is a real HTTP server on 127.0.0.1 that speaks the few routes huggingface_hub uses (create repo,
create branch, preupload, commit, resolve). Uploads are asserted on what it received; downloads run
huggingface_hub's own `hf_hub_download`, which lays out the cache (blobs, snapshots, refs) that offline mode reads.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import pytest
import torch
from safetensors import safe_open

from adapt.adapter import save_adapter
from adapt.serve.testing import image_bytes, random_adapter, tiny_base
from backbone.checkpoints import save_model
from backbone.processor import GLIPProcessor
from tests._coco_helpers import write_coco

REPO = "me/fish-task"
CATEGORIES = ["fish", "shark"]


class FakeHub(ThreadingHTTPServer):
    """Repositories in memory: {repo_id: {"private", "refs": {name: commit}, "commits": {commit: {path: bytes}}}}."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _HubHandler)
        self.repos: dict[str, dict] = {}
        self.received: list[tuple[str, str, dict, bytes]] = []  # method, path, headers (lower-case names), body
        self.endpoint = f"http://127.0.0.1:{self.server_address[1]}"

    def stop(self) -> None:
        """Stop serving and close the socket, so that connections are refused at once."""
        self.shutdown()
        self.server_close()

    def add_repo(self, repo_id: str, files: dict[str, bytes], branch: str = "main") -> str:
        repo = self.repos.setdefault(repo_id, {"private": False, "refs": {}, "commits": {}})
        return _commit(repo, branch, files)


def _commit(repo: dict, branch: str, files: dict[str, bytes]) -> str:
    parent = repo["commits"].get(repo["refs"].get(branch), {})
    tree = {**parent, **files}
    oid = hashlib.sha1(json.dumps(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in tree.items())).encode()
                       + branch.encode()).hexdigest()
    repo["commits"][oid] = tree
    repo["refs"][branch] = oid
    return oid


class _HubHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass

    def _reply(self, status: int, body: bytes | dict = b"", headers: dict | None = None, head: bool = False):
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        self.send_response(status)
        for key, value in {"Content-Length": str(len(data)), **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def _record(self) -> bytes:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.received.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body))
        return body

    def do_POST(self):
        body, hub = self._record(), self.server
        parts = [unquote(p) for p in self.path.split("?")[0].strip("/").split("/")]
        if parts == ["api", "validate-yaml"]:  # the client checks a README's metadata before committing it
            return self._reply(200, {"errors": [], "warnings": []})
        if parts == ["api", "repos", "create"]:
            payload = json.loads(body)
            repo_id = f"{payload['organization']}/{payload['name']}"
            if repo_id in hub.repos:
                return self._reply(409, {"error": "You already created this model repo"})
            hub.repos[repo_id] = {"private": payload.get("visibility") == "private" or payload.get("private") is True,
                                  "refs": {}, "commits": {}}
            _commit(hub.repos[repo_id], "main", {".gitattributes": b"*.safetensors filter=lfs\n"})
            return self._reply(200, {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id})
        if len(parts) >= 6 and parts[:2] == ["api", "models"]:
            repo_id, action, revision = f"{parts[2]}/{parts[3]}", parts[4], "/".join(parts[5:])
            repo = hub.repos.get(repo_id)
            if repo is None:
                return self._reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
            if action == "branch":
                if revision in repo["refs"]:
                    return self._reply(409, {"error": "Reference already exists"})
                repo["refs"][revision] = repo["refs"]["main"]
                return self._reply(200, {})
            if action == "preupload":
                files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                         for f in json.loads(body)["files"]]
                return self._reply(200, {"files": files})
            if action == "commit":
                if revision not in repo["refs"]:
                    return self._reply(404, {"error": "Revision not found"}, {"X-Error-Code": "RevisionNotFound"})
                lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                files = {line["value"]["path"]: base64.b64decode(line["value"]["content"])
                         for line in lines if line["key"] == "file"}
                oid = _commit(repo, revision, files)
                return self._reply(200, {"commitUrl": f"{hub.endpoint}/{repo_id}/commit/{oid}", "commitOid": oid})
        return self._reply(404, {"error": f"unexpected route {self.path}"})

    def _resolve(self, head: bool):
        self._record()
        parts = [unquote(p) for p in self.path.split("?")[0].strip("/").split("/")]
        repo = self.server.repos.get("/".join(parts[:2]))
        if repo is None or len(parts) < 5 or parts[2] != "resolve":
            return self._reply(404, b"", {"X-Error-Code": "RepoNotFound"}, head)
        revision, path = parts[3], "/".join(parts[4:])
        oid = repo["refs"].get(revision, revision if revision in repo["commits"] else None)
        if oid is None:
            return self._reply(404, b"", {"X-Error-Code": "RevisionNotFound"}, head)
        if path not in repo["commits"][oid]:
            return self._reply(404, b"", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": oid}, head)
        data = repo["commits"][oid][path]
        self._reply(200, data, {"X-Repo-Commit": oid, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}, head)

    def do_HEAD(self):
        self._resolve(head=True)

    def do_GET(self):
        self._resolve(head=False)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A running fake Hub, with huggingface_hub pointed at it and its cache in tmp (what HF_ENDPOINT,
    HF_HUB_CACHE and HF_HUB_OFFLINE set at import)."""
    from huggingface_hub import constants

    server = FakeHub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        server.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny base file, another base, an evaluated prompt-tune adapter on the first, an image and a COCO task."""
    root = tmp_path_factory.mktemp("hub")
    base = tiny_base()
    save_model(base, root / "tiny.safetensors")
    save_model(tiny_base(seed=1), root / "other.safetensors")
    adapter = random_adapter(base, GLIPProcessor.from_config(base.config), "fish-task", CATEGORIES)
    adapter.base_model = str(root / "tiny.safetensors")
    adapter.training = {"shots": 10, "seed": 3, "steps": 120, "lr": 0.01, "batch_size": 4}
    adapter.evaluation = {"zero_shot": {"AP": 4.5, "AP50": 9.25}, "tuned": {"AP": 21.5, "AP50": 40.75}}
    save_adapter(adapter, root / "fish-task.safetensors")
    (root / "photo.png").write_bytes(image_bytes(96, 64, seed=2))
    (root / "noise.safetensors").write_bytes((root / "tiny.safetensors").read_bytes())  # a model, no adapter
    for split in ("train", "valid"):
        write_coco(root / "export" / split)
    (root / "fish.yaml").write_text("data: export\n")
    return root


def run_cli(monkeypatch, capsys, *args, code: int = 0) -> tuple[str, str]:
    from adapt.cli import main

    monkeypatch.setattr(sys, "argv", ["adapt", *map(str, args)])
    monkeypatch.delenv("ADAPT_DEBUG", raising=False)
    try:
        main()
        status = 0
    except SystemExit as exit_info:
        status = exit_info.code or 0
    out, err = capsys.readouterr()
    assert status == code, err
    if code:
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and "Traceback" not in err, err
        return out, lines[0]
    return out, err


def test_references_follow_the_hub_uri_grammar():
    from adapt.hub import HubError, parse_ref

    assert parse_ref("hf://me/task") == parse_ref(Path("hf://me/task"))  # pathlib's folded "hf:/" still works
    ref = parse_ref("hf://me/task@refs/pr/3/aquarium")
    assert (ref.repo_id, ref.revision) == ("me/task", "refs/pr/3")
    assert ref.path_in_repo == "aquarium/adapter_model.safetensors"
    ref = parse_ref("hf://me/task@v2/a/b.safetensors")
    assert (ref.revision, ref.subfolder, ref.filename) == ("v2", "a", "b.safetensors")
    for bad, needle in (("hf://datasets/me/x", "model repositories"), ("hf://me", "OWNER/NAME")):
        with pytest.raises(HubError, match=needle):
            parse_ref(bad)


@pytest.mark.parametrize("command", [["push"], ["adapters", "pull"], ["adapters", "inspect"], ["adapters", "merge"],
                                     ["predict"], ["eval"], ["export"]])
def test_every_command_that_takes_an_adapter_says_it_takes_a_hub_reference(command, monkeypatch, capsys):
    out, _ = run_cli(monkeypatch, capsys, *command, "--help")
    assert "hf://OWNER/NAME" in out


def test_local_dir_writes_the_adapter_its_config_and_a_card(files, tmp_path, monkeypatch, capsys):
    from huggingface_hub import ModelCard

    out, _ = run_cli(monkeypatch, capsys, "push", files / "fish-task.safetensors", REPO, "--local-dir", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "adapter_config.json",
                                                          "adapter_model.safetensors"]
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == (files / "fish-task.safetensors").read_bytes()
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    with safe_open(str(files / "fish-task.safetensors"), framework="pt") as handle:
        header = handle.metadata()
    json_keys = {"categories", "category_tokens", "lora_config", "training", "evaluation"}
    for key, value in header.items():  # every header entry, JSON ones decoded
        assert config[key] == (json.loads(value) if key in json_keys else value), key
    assert [c["name"] for c in config["categories"]] == CATEGORIES and config["training"]["shots"] == 10
    assert config["base_source"].startswith("a local checkpoint file")
    assert config["adapter_sha256"] == hashlib.sha256((files / "fish-task.safetensors").read_bytes()).hexdigest()
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "glip-adapt" and card.data.pipeline_tag == "object-detection"
    assert {(r.metric_type, r.metric_value) for r in card.data.eval_results} == {("AP", 21.5), ("AP50", 40.75)}
    assert "fish, shark" in card.text and "| zero-shot base | 4.5 | 9.25 |" in card.text
    assert f"adapt predict --adapter hf://{REPO} photo.jpg" in card.text and f"{tmp_path}" in out


def test_a_hub_base_is_named_in_the_card_metadata(files, tmp_path):
    from huggingface_hub import ModelCard

    from adapt.adapter import load_adapter
    from adapt.hub import model_card
    from backbone.checkpoints import HUB_REPO

    adapter = load_adapter(files / "fish-task.safetensors")
    adapter.base_model = "glip-t"
    card = ModelCard(str(model_card(adapter, REPO)))
    assert card.data.base_model == HUB_REPO and "glip_tiny_model_o365_goldg_cc_sbu.pth" in card.text
    adapter.base_model = "glip-nano"
    assert model_card(adapter, REPO).data.base_model is None  # embedded in the package: no Hub repository


def test_push_uploads_exactly_the_local_dir_files(files, hub, tmp_path, monkeypatch, capsys):
    local = tmp_path / "local"
    run_cli(monkeypatch, capsys, "push", files / "fish-task.safetensors", REPO, "--local-dir", local)
    out, _ = run_cli(monkeypatch, capsys, "push", files / "fish-task.safetensors", REPO, "--private",
                     "--revision", "v1")
    assert hub.repos[REPO]["private"] and "commit" in out
    [commit] = [body for method, path, _, body in hub.received if path.startswith(f"/api/models/{REPO}/commit/")]
    lines = [json.loads(line) for line in commit.decode().splitlines()]
    sent = {line["value"]["path"]: base64.b64decode(line["value"]["content"])
            for line in lines if line["key"] == "file"}
    assert sent == {p.name: p.read_bytes() for p in local.iterdir()}
    writes = [(path, headers) for method, path, headers, _ in hub.received if method == "POST"]
    assert [path for path, _ in writes] == [
        "/api/repos/create", f"/api/models/{REPO}/branch/v1", "/api/validate-yaml",
        f"/api/models/{REPO}/preupload/v1", f"/api/models/{REPO}/commit/v1"]
    assert [path for path, headers in writes if headers.get("authorization") != "Bearer hf_test_token"] == []
    tree = hub.repos[REPO]["commits"][hub.repos[REPO]["refs"]["v1"]]
    assert "adapter_model.safetensors" in tree and "adapter_model.safetensors" not in \
        hub.repos[REPO]["commits"][hub.repos[REPO]["refs"]["main"]]  # the branch, not main


def test_pull_lands_in_a_server_folder_and_then_resolves_offline(files, hub, tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    from adapt.hub import open_adapter

    data = (files / "fish-task.safetensors").read_bytes()
    oid = hub.add_repo(REPO, {"aquarium/adapter_model.safetensors": data}, branch="v1")
    ref = f"hf://{REPO}@v1/aquarium"
    run_cli(monkeypatch, capsys, "adapters", "pull", ref, "--to", tmp_path / "server")
    assert (tmp_path / "server" / "fish-task.safetensors").read_bytes() == data  # named by its task
    run_cli(monkeypatch, capsys, "adapters", "pull", ref, "--to", tmp_path / "server", "--name", "fish2")
    assert (tmp_path / "server" / "fish2.safetensors").read_bytes() == data
    cache = Path(constants.HF_HUB_CACHE) / "models--me--fish-task"  # laid out by huggingface_hub itself
    assert (cache / "refs" / "v1").read_text() == oid
    assert (cache / "snapshots" / oid / "aquarium" / "adapter_model.safetensors").read_bytes() == data
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    before = len(hub.received)
    assert open_adapter(ref).read_bytes() == data
    out, _ = run_cli(monkeypatch, capsys, "adapters", "inspect", ref)
    assert "fish-task" in out and "prompt.hidden" in out
    assert len(hub.received) == before  # offline: not one request
    _, line = run_cli(monkeypatch, capsys, "adapters", "inspect", f"hf://{REPO}@v2/aquarium", code=2)
    assert f"hf://{REPO}@v2/aquarium is not in the local Hugging Face cache" in line and "HF_HUB_OFFLINE" in line


def test_errors_are_one_line(files, hub, tmp_path, monkeypatch, capsys):
    hub.add_repo("me/model-only", {"adapter_model.safetensors": (files / "noise.safetensors").read_bytes(),
                                   "weights.bin": b"x"})
    hub.add_repo("me/fish", {"adapter_model.safetensors": (files / "fish-task.safetensors").read_bytes()})
    image = files / "photo.png"
    cases = [(["adapters", "inspect", "hf://me/missing"], "repository 'me/missing' not found"),
             (["adapters", "inspect", "hf://me/fish@nope"], "has no revision 'nope'"),
             (["adapters", "inspect", "hf://me/fish/sub"], "has no sub/adapter_model.safetensors"),
             (["predict", image, "--adapter", "hf://me/model-only"], "hf://me/model-only is not a glip-adapt adapter"),
             (["predict", image, "--adapter", "hf://me/fish", "--base", files / "other.safetensors"],
              "hf://me/fish was trained on base"),
             (["push", files / "fish-task.safetensors", "me"], "is not OWNER/NAME"),
             (["adapters", "pull", "hf://me/fish", "--to", tmp_path, "--name", "Bad Name"], "invalid adapter name")]
    for args, needle in cases:
        _, line = run_cli(monkeypatch, capsys, *args, code=2)
        assert needle in line, (args, line)
    (tmp_path / "fish-task.safetensors").write_bytes(b"another adapter")
    _, line = run_cli(monkeypatch, capsys, "adapters", "pull", "hf://me/fish", "--to", tmp_path, code=2)
    assert "exists and holds another adapter" in line


def test_eval_export_and_merge_open_hub_references(files, hub, monkeypatch, capsys, tmp_path):
    from adapt.adapter import read_merged
    from adapt.export import load_task

    hub.add_repo(REPO, {"adapter_model.safetensors": (files / "fish-task.safetensors").read_bytes()})
    reports = []
    for adapter in (files / "fish-task.safetensors", f"hf://{REPO}"):
        report = tmp_path / f"{len(reports)}.json"
        run_cli(monkeypatch, capsys, "eval", "--task", files / "fish.yaml", "--adapter", adapter, "--report", report)
        metrics = json.loads(report.read_text())["metrics"]
        metrics.pop("seconds_per_image")
        reports.append(metrics)
    assert reports[0] == reports[1]
    model, adapter = load_task(f"hf://{REPO}")
    assert adapter.category_names == CATEGORIES
    run_cli(monkeypatch, capsys, "adapters", "merge", f"hf://{REPO}", "--out", tmp_path / "merged.safetensors")
    assert read_merged(tmp_path / "merged.safetensors").category_names == CATEGORIES


@pytest.mark.slow
def test_round_trip_push_pull_offline_predict_gives_the_same_detections(files, hub, tmp_path, monkeypatch, capsys):
    """push (HTTP) -> download into a fresh cache -> a new process with HF_HUB_OFFLINE=1 predicts from the cache,
    with the same detections as `adapt predict` on the original file."""
    from huggingface_hub import constants

    run_cli(monkeypatch, capsys, "push", files / "fish-task.safetensors", REPO)
    cache = tmp_path / "fresh-cache"  # the other machine's
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    run_cli(monkeypatch, capsys, "adapters", "pull", f"hf://{REPO}")  # once, online
    original = tmp_path / "original.json"
    run_cli(monkeypatch, capsys, "predict", files / "photo.png", "--adapter", files / "fish-task.safetensors",
            "--threshold", "0", "--json", original)
    pulled = tmp_path / "pulled.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_ENDPOINT": "http://127.0.0.1:9",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    hub.stop()  # nothing to reach
    proc = subprocess.run([sys.executable, "-m", "adapt.cli", "predict", str(files / "photo.png"), "--adapter",
                           f"hf://{REPO}", "--threshold", "0", "--json", str(pulled)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    a, b = json.loads(original.read_text()), json.loads(pulled.read_text())
    assert len(a) == len(b) > 0
    assert [r["category_id"] for r in a] == [r["category_id"] for r in b]
    torch.testing.assert_close(torch.tensor([r["bbox"] + [r["score"]] for r in a]),
                               torch.tensor([r["bbox"] + [r["score"]] for r in b]), rtol=1e-4, atol=1e-4)


def test_detections_to_supervision():
    sv = pytest.importorskip("supervision")
    from backbone.outputs import Detections

    dets = Detections(boxes=torch.tensor([[1.0, 2.0, 11.0, 22.0], [5.0, 5.0, 9.0, 9.0], [0.0, 0.0, 4.0, 3.0]]),
                      scores=torch.tensor([0.9, 0.2, 0.6]), labels=torch.tensor([1, 0, 1]),
                      categories=["fish", "shark"])
    converted = dets.to_supervision()
    assert isinstance(converted, sv.Detections) and len(converted) == 3
    assert converted.data["class_name"].tolist() == ["shark", "fish", "shark"]
    coco = dets.to_coco(0)  # the independent path: x, y, w, h records
    assert converted.xyxy.tolist() == [[r["bbox"][0], r["bbox"][1], r["bbox"][0] + r["bbox"][2],
                                        r["bbox"][1] + r["bbox"][3]] for r in coco]
    assert converted.class_id.tolist() == [r["category_id"] - 1 for r in coco]  # COCO ids are 1-based
    kept = converted[converted.confidence > 0.5]  # supervision's own filtering carries class_name along
    assert kept.data["class_name"].tolist() == ["shark", "shark"]
    assert kept.confidence.tolist() == pytest.approx([0.9, 0.6])
    empty = dets.select(torch.zeros(3, dtype=torch.bool)).to_supervision()
    assert len(empty) == 0 and empty.xyxy.shape == (0, 4)
