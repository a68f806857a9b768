"""The benchmark harness's bookkeeping (not its timings): which figures each target compares, what a missing
figure or a failed stage does, and which model the app figures are of."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from benchmarks import __main__ as bench
from benchmarks import app_render, check_targets, serving
from benchmarks import scoring as bench_scoring


def test_classify_and_batch_targets_compare_the_same_engine():
    # OpenVINO serves (classify 60 ms against its own 30 ms forward pass: 2x, over the 1.5x bound) while
    # TensorFlow's forward pass is slower (100 ms); against TensorFlow the path would look cheap (0.6x).
    figures = {"classify_ms_p50": 60.0, "forward_ms_p50": 100.0, "engine_forward_ms_p50": 30.0,
               "batch_images_per_s": 16.0, "forward_images_per_s": 12.0, "engine_forward_images_per_s": 20.0}
    targets = check_targets(figures)
    assert targets["classify_vs_forward"]["value"] == pytest.approx(2.0)
    assert targets["classify_vs_forward"]["pass"] is False
    assert targets["batch_vs_forward"]["value"] == pytest.approx(0.8)
    assert targets["batch_vs_forward"]["pass"] is False
    figures.update(classify_ms_p50=40.0, batch_images_per_s=18.0)
    targets = check_targets(figures)
    assert (targets["classify_vs_forward"]["pass"], targets["batch_vs_forward"]["pass"]) == (True, True)


def test_both_engines_memory_needs_both_engines():
    one = check_targets({"rss_both_engines_mb": 900.0, "rss_engines": ["tensorflow"]})
    assert one["rss_both_engines"] == {"rule": one["rss_both_engines"]["rule"], "value": None, "pass": None}
    two = check_targets({"rss_both_engines_mb": 1600.0, "rss_engines": ["openvino", "tensorflow"]})
    assert (two["rss_both_engines"]["value"], two["rss_both_engines"]["pass"]) == (1600.0, False)


def test_missing_films_are_refused_before_measuring(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(serving, "FOLDER", tmp_path)  # there, but without images
    with pytest.raises(bench.MissingData, match="the images in"):
        bench.check_data(bench.parse([]))
    monkeypatch.setattr(serving, "JPEG", tmp_path / "gone.jpeg")
    assert bench.main(["--app-only"]) == 2
    err = capsys.readouterr().err
    assert "gone.jpeg" in err and "../shared/data" in err


def test_a_failed_stage_keeps_the_other_figures_and_says_why():
    figures = {"forward_ms_p50": 70.0}
    bench.stage(figures, "rss_probe", lambda: bench.child("json.tool", "/no/such/file.json"))
    bench.stage(figures, "bombs", lambda: {"zeros_refuse_s": 0.0001})
    assert figures["forward_ms_p50"] == 70.0 and figures["zeros_refuse_s"] == 0.0001
    # The child's own error output, not only its exit status.
    assert "No such file" in figures["errors"]["rss_probe"]
    assert list(figures["errors"]) == ["rss_probe"]


def test_app_figures_are_of_the_measured_model_not_the_first_by_name(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(app_render, "CHROMIUM", sys.executable)  # any existing file: the browser branch
    monkeypatch.setattr(app_render, "_start_and_use", lambda _pw, models_dir, env, _t: seen.append(
        (models_dir, env)) or dict.fromkeys(("up", "render", "load", "warm", "first_upload", "switch"), 1.0)
        | {"errors": []})
    model = tmp_path / "models" / "zz-second-by-name"
    app_render.first_render(model)
    assert len(seen) == 2
    for models_dir, env in seen:
        assert models_dir == model.parent
        assert env["CXR_DEFAULT_MODEL"] == "zz-second-by-name"


def test_the_default_model_setting_picks_that_folder(monkeypatch):
    import ui

    folders = [Path("/m/a-first"), Path("/m/zz-second-by-name")]
    monkeypatch.setenv("CXR_DEFAULT_MODEL", "zz-second-by-name")
    assert ui.default_model(folders) == folders[1]


def test_scoring_ratios_without_a_steady_rate_are_none():
    # One slice only: every row shares a time, so there is no rate after the first slice.
    assert bench_scoring.steady_images_per_s(["2026-12-02T01:00:00.000", "2026-12-02T01:00:00.010"]) == 0.0
    assert bench_scoring._ratio(3.0, 0.0) is None
    assert bench_scoring._ratio(3.0, 2.0) == pytest.approx(1.5)
