"""Drawing boxes and contact sheets, and the `adapt tasks` commands."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from adapt.cli_tasks import resolve_data_root, tasks_app
from tasks import CocoDetection
from tasks.visualize import contact_sheet, draw_boxes, draw_predictions, label_colour, render_samples
from tests._coco_helpers import write_coco

runner = CliRunner()


def test_draw_boxes_outlines_in_label_colour_and_keeps_input():
    image = Image.new("RGB", (100, 80), (0, 0, 0))
    out = draw_boxes(image, [[10, 30, 60, 70]], [2], ["a", "b", "c"], scores=[0.9], width=2)
    arr = np.asarray(out)
    assert tuple(arr[50, 10]) == label_colour(2)  # left edge
    assert tuple(arr[50, 35]) == (0, 0, 0)  # inside untouched
    assert tuple(arr[29, 12]) == label_colour(2) or tuple(arr[28, 12]) == label_colour(2)  # tag above the box
    assert np.asarray(image).max() == 0  # input not modified
    assert label_colour(0) != label_colour(1)


def test_predictions_respect_threshold_and_overlay_ground_truth():
    image = Image.new("RGB", (64, 64), (0, 0, 0))
    target = {"boxes": [[2, 2, 20, 20]], "labels": [0]}
    out = np.asarray(draw_predictions(image, [[30, 30, 60, 60], [5, 40, 25, 60]], [0.9, 0.1], [1, 1], ["x", "y"],
                                      score_threshold=0.3, target=target))
    assert tuple(out[45, 30]) == label_colour(1)  # kept prediction
    assert tuple(out[50, 5]) == (0, 0, 0)  # below threshold: not drawn
    assert any(tuple(out[y, 2]) == label_colour(0) for y in range(2, 20))  # dashed ground truth


def test_contact_sheet_layout():
    sheet = contact_sheet([Image.new("RGB", (50, 30), (255, 0, 0))] * 5, columns=3, cell=40)
    assert sheet.size == (3 * 44 + 4, 2 * 44 + 4)
    with pytest.raises(ValueError, match="at least one image"):
        contact_sheet([])


def test_render_samples_writes_png(tmp_path):
    ann = write_coco(tmp_path / "s")
    path = render_samples(CocoDetection(ann, ann.parent), 2, tmp_path / "out" / "sheet.png", cell=64)
    img = Image.open(path)
    assert img.format == "PNG" and img.size == (2 * 68 + 4, 64 + 16 + 8)


def test_data_root_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("ADAPT_DATA", str(tmp_path / "env"))
    assert resolve_data_root(None) == tmp_path / "env"
    assert resolve_data_root(tmp_path / "flag") == tmp_path / "flag"
    monkeypatch.delenv("ADAPT_DATA")
    assert resolve_data_root(None).parts[-3:] == (".cache", "glip-adapt", "data")


def test_cli_list_shows_odinw_and_icons(tmp_path):
    result = runner.invoke(tasks_app, ["list", "--root", str(tmp_path)])
    assert result.exit_code == 0, result.output
    for name in ("aquarium", "pothole", "thermal-dogs-and-people", "icons-aquarium", "icons-described"):
        assert f"\n{name} " in result.output
    assert "fetch" in result.output and "generate" in result.output
    only = runner.invoke(tasks_app, ["list", "--suite", "odinw13", "--root", str(tmp_path)])
    assert only.exit_code == 0 and "icons-aquarium" not in only.output and only.output.count("odinw13") == 13


def test_cli_show_and_errors(tmp_path):
    result = runner.invoke(tasks_app, ["show", "aquarium", "--root", str(tmp_path)])
    assert result.exit_code == 0
    assert "which is black and white" in result.output and "adapt tasks fetch aquarium" in result.output
    bad = runner.invoke(tasks_app, ["show", "aquarim", "--root", str(tmp_path)])
    assert bad.exit_code == 1 and "Did you mean: aquarium" in bad.output
    missing = runner.invoke(tasks_app, ["show", "aquarium", "--render", "2", "--root", str(tmp_path)])
    assert missing.exit_code == 1 and "adapt tasks fetch aquarium" in missing.output
    nofetch = runner.invoke(tasks_app, ["fetch", "icons-aerial", "--root", str(tmp_path)])
    assert nofetch.exit_code == 1 and "adapt tasks generate icons-aerial" in nofetch.output


def test_cli_generate_and_render(tmp_path, monkeypatch):
    result = runner.invoke(tasks_app, ["generate", "icons-described", "--root", str(tmp_path),
                                       "--train", "4", "--valid", "2", "--test", "2"])
    assert result.exit_code == 0, result.output
    assert "icons-described: generated" in result.output
    again = runner.invoke(tasks_app, ["generate", "icons-described", "--root", str(tmp_path),
                                      "--train", "4", "--valid", "2", "--test", "2"])
    assert "already present" in again.output
    out = tmp_path / "sheet.png"
    shown = runner.invoke(tasks_app, ["show", "icons-described", "--render", "3", "--out", str(out), "--cell", "96",
                                      "--root", str(tmp_path)])
    assert shown.exit_code == 0, shown.output
    assert out.is_file() and Image.open(out).size[0] > 96 and "3 samples of train" in shown.output
    unknown = runner.invoke(tasks_app, ["generate", "aquarium", "--root", str(tmp_path)])
    assert unknown.exit_code == 1 and "not icon tasks" in unknown.output


def test_cli_generate_writes_pretraining_corpus(tmp_path):
    result = runner.invoke(tasks_app, ["generate", "icons-thermal", "--root", str(tmp_path), "--train", "2",
                                       "--valid", "1", "--test", "1", "--pretrain-corpus", "3", "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "icons" / "pretrain-corpus-seed1" / "annotations.json").is_file()
