"""Issue #11: no traceback reaches a CLI user. Every failure is one `error: ...` line with a next step, exit 2."""
import sys

import pytest

from adapt.serve.testing import faulty_adapter_bytes, image_bytes, random_adapter, tiny_base
from backbone.processor import GLIPProcessor


class Evil:  # an object torch's weights_only unpickler refuses
    pass


def run_cli(monkeypatch, capsys, *args) -> str:
    from adapt.cli import main

    monkeypatch.setattr(sys, "argv", ["adapt", *map(str, args)])
    monkeypatch.delenv("ADAPT_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err and "weights_only" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import torch

    from adapt.adapter import save_adapter
    from backbone.checkpoints import save_model

    root = tmp_path_factory.mktemp("cli")
    base = tiny_base()
    processor = GLIPProcessor.from_config(base.config)
    save_model(base, root / "tiny.safetensors")
    torch.save({"model": Evil()}, root / "evil.pth")
    (root / "bad.png").write_bytes(b"not an image at all")
    (root / "ok.png").write_bytes(image_bytes())
    for kind in ("p0_batch_2", "unnamed_category", "wrong_width"):
        (root / f"{kind}.safetensors").write_bytes(faulty_adapter_bytes(base, processor, kind))
    save_adapter(random_adapter(tiny_base(seed=1), processor, "other", ["cat"]), root / "other.safetensors")
    return root


def test_detect_with_a_pickle_base(monkeypatch, capsys, files):
    line = run_cli(monkeypatch, capsys, "detect", files / "ok.png", "--prompt", "cat", "--base", files / "evil.pth")
    assert "evil.pth" in line and "will not unpickle" in line and ".safetensors" in line


def test_detect_with_a_bad_image(monkeypatch, capsys, files):
    line = run_cli(monkeypatch, capsys, "detect", files / "bad.png", "--prompt", "cat", "--base",
                   files / "tiny.safetensors")
    assert "bad.png" in line and "image" in line


@pytest.mark.parametrize("kind,needle", [("p0_batch_2", "batch size 1"), ("unnamed_category", "has no name"),
                                         ("wrong_width", "another base")])
def test_predict_with_a_broken_adapter(monkeypatch, capsys, files, kind, needle):
    line = run_cli(monkeypatch, capsys, "predict", files / "ok.png", "--adapter", files / f"{kind}.safetensors",
                   "--base", files / "tiny.safetensors")
    assert needle in line


def test_other_base_message_does_not_advise_the_loaded_base(monkeypatch, capsys, files):
    line = run_cli(monkeypatch, capsys, "predict", files / "ok.png", "--adapter", files / "other.safetensors",
                   "--base", files / "tiny.safetensors")
    assert "fingerprint" in line and "--base tiny" not in line and "re-train" in line


def test_an_unexpected_error_is_one_line_too(monkeypatch, capsys, files):
    import backbone.detector

    def boom(*_args, **_kwargs):
        raise RuntimeError("something internal\nwith a second line")

    monkeypatch.setattr(backbone.detector.GLIPDetector, "from_pretrained", boom)
    line = run_cli(monkeypatch, capsys, "detect", files / "ok.png", "--prompt", "cat")
    assert "RuntimeError: something internal with a second line" in line and "ADAPT_DEBUG=1" in line


def test_serve_refuses_a_device_this_machine_lacks(monkeypatch, capsys, files):
    line = run_cli(monkeypatch, capsys, "serve", "--adapters", files, "--device", "cpu", "--dtype", "float16")
    assert "float16 runs on CUDA only" in line
