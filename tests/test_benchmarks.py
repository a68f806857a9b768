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


def test_the_tf_keras_vis_speedup_compares_tensorflow_with_tensorflow():
    # OpenVINO serves at 40 ms; TensorFlow's path takes 100 ms and tf-keras-vis 1200 ms: 12x, not 30x.
    figures = {"tfkv_gradcam_ms_p50": 1200.0, "classify_ms_p50": 40.0, "engine": "OpenVINO 2026.4.1 · f32",
               "engines": {"tensorflow": {"classify_ms_p50": 100.0}, "openvino": {"classify_ms_p50": 40.0}}}
    assert check_targets(figures)["tfkv_speedup"]["value"] == pytest.approx(12.0)
    # No TensorFlow figure and OpenVINO serving: not measured, rather than compared across engines.
    del figures["engines"]
    assert check_targets(figures)["tfkv_speedup"]["value"] is None
    figures.update(engine="TensorFlow 2.21.0 · f32", classify_ms_p50=100.0)
    assert check_targets(figures)["tfkv_speedup"]["value"] == pytest.approx(12.0)


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


def test_the_steady_rate_starts_when_every_worker_has_finished_its_first_slice():
    def at(*seconds_rows):
        return [f"2026-12-02T10:00:{s:06.3f}+00:00" for s, rows in seconds_rows for _ in range(rows)]

    # One worker, slices of 64 every 10 s: 64 rows per 10 s after the first.
    one = at((10, 64), (20, 64), (30, 64), (40, 64))
    assert bench_scoring.steady_images_per_s(one) == pytest.approx(6.4)
    # Two workers side by side, 64 rows per slice each, slices ending 1 s apart: 128 rows per 10 s once both have
    # finished their first (counting the second worker's first slice after the first ending would give 9.6 /s).
    two = at((10, 64), (11, 64), (20, 64), (21, 64))
    assert bench_scoring.steady_images_per_s(two, workers=2) == pytest.approx(128 / 10)
    assert bench_scoring.steady_images_per_s(at((10, 64), (11, 64)), workers=2) == 0.0  # no slice after both


def test_a_bomb_that_was_read_instead_of_refused_fails_its_target():
    refused = {"bomb_peak_extra_mb": 20.0, "bombs_accepted": [], "zeros_refuse_s": 0.001, "zeros_accepted": False}
    targets = check_targets(refused)
    assert (targets["bomb_memory"]["pass"], targets["zeros_refuse"]["pass"]) == (True, True)
    read = {**refused, "bombs_accepted": ["20 frames of 4096x4096 (320 MB)"], "zeros_accepted": True}
    targets = check_targets(read)
    assert (targets["bomb_memory"]["pass"], targets["zeros_refuse"]["pass"]) == (False, False)
