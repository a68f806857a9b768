"""The instructor page (AppTest): CAM methods, layers, occlusion and perturbations for a real image,
bad uploads, images from the held-out split and the data root, and the confident-error gallery."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
from app_models import evaluated_model, labelled_folder
from streamlit.testing.v1 import AppTest

import ui
from cxr_core import imaging, models, preprocess, probe
from cxr_core.card import RESEARCH_USE

PAGE = str(Path(__file__).resolve().parents[1] / "pages" / "instructor.py")
SECTIONS = ("One image, several CAM methods", "Grad-CAM at a chosen layer", "Occlusion sensitivity",
            "How simple changes move the prediction")


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("data_root")
    images = labelled_folder(root / "eval", per_class=3)
    models_root = tmp_path_factory.mktemp("models_root")
    folder, predictions = evaluated_model(tiny_model_dir, models_root, images)
    return models_root, root, folder, predictions, models.load(folder)


def run_page(monkeypatch, models_root, root) -> AppTest:
    monkeypatch.setenv("CXR_MODELS_DIR", str(models_root))
    monkeypatch.setenv("CXR_DATA_ROOT", str(root))
    return AppTest.from_file(PAGE, default_timeout=180).run()


def captions(at: AppTest) -> list[str]:
    return [c for img in at.image for c in img.captions]


def test_all_sections_for_an_uploaded_radiograph(env, monkeypatch, data_dir):
    models_root, root, _, _, classifier = env
    at = run_page(monkeypatch, models_root, root)
    assert at.warning[0].value == RESEARCH_USE
    path = data_dir / "kermany" / "train" / "PNEUMONIA" / "person1000_bacteria_2931.jpeg"
    at.file_uploader(key="instructor_upload").set_value((path.name, path.read_bytes(), "image/jpeg")).run()
    assert not at.exception and not at.error
    assert [s for s in SECTIONS if s not in [h.value for h in at.subheader]] == []
    pixels = imaging.load(path.read_bytes(), path.name).pixels
    expected = classifier.predict_pixels([pixels])[0]
    assert f"P(PNEUMONIA) = {expected.probabilities[1]:.3f}" in " ".join(c.value for c in at.caption)
    shown = captions(at)
    assert shown[:4] == ["Grad-CAM", "Grad-CAM++", "LayerCAM", "SmoothGrad"]
    assert "Grad-CAM at relu" in shown
    table = [d.value for d in at.dataframe if "kind" in d.value.columns][0]
    rows = probe.perturbation_table(classifier, pixels)
    assert table["kind"].tolist() == [r["kind"] for r in rows]
    assert table["PNEUMONIA"].tolist() == pytest.approx([r["PNEUMONIA"] for r in rows], abs=1e-6)

    at.checkbox(key="instructor_scorecam").check()
    at.checkbox(key="instructor_occlusion").check().run()
    assert not at.exception
    shown = captions(at)
    assert shown[:5] == ["Grad-CAM", "Grad-CAM++", "Score-CAM", "LayerCAM", "SmoothGrad"]
    index = expected.probabilities.index(expected.top_probability)
    drop = probe.occlusion(classifier, preprocess.prepare(pixels, 64), index, patch=8)
    name = classifier.card.class_names[index]
    # the map's own figures: each pixel's mean change over the patches covering it (the largest rise is -min)
    assert (f"Largest mean drop in P({name}) at a pixel, over the patches that cover it when hidden: "
            f"{float(drop.max()):.3f}" if drop.max() > 0 else
            f"Hiding patches lowers P({name}) nowhere on average: the map is blank (the largest mean rise at a "
            f"pixel is {max(0.0, -float(drop.min())):.3f})") in shown

    at.select_slider(key="instructor_layer").set_value("tiny_relu0").run()
    assert "Grad-CAM at tiny_relu0" in captions(at)


def test_a_very_wide_image_gets_every_section_not_a_traceback(env, monkeypatch):
    """A 2000 x 4 strip was drawn at 512 x 1 and halved by st.image to 0 rows: ValueError, and the layer,
    occlusion and perturbation sections never came."""
    import io

    import numpy as np
    from PIL import Image

    models_root, root, _, _, _ = env
    at = run_page(monkeypatch, models_root, root)
    strip = io.BytesIO()
    Image.fromarray(np.tile(np.linspace(0, 255, 2000, dtype=np.uint8), (4, 1))).save(strip, format="PNG")
    at.file_uploader(key="instructor_upload").set_value(("strip.png", strip.getvalue(), "image/png")).run()
    at.checkbox(key="instructor_occlusion").check().run()
    assert not at.exception
    assert [s for s in SECTIONS if s not in [h.value for h in at.subheader]] == []
    assert "Grad-CAM at relu" in captions(at) and any(c.startswith(("Largest mean drop", "Hiding patches"))
                                                      for c in captions(at))


def test_the_page_gives_the_cautions_the_classify_page_gives(env, monkeypatch, data_dir):
    """A film that is not a chest (a dental DICOM) is flagged on the Instructor page as on the Classify page, with the
    same sentences (``report.cautions``); a chest film gets no not-a-chest caution."""
    from cxr_core import quality, report

    models_root, root, _, _, _ = env
    at = run_page(monkeypatch, models_root, root)
    dental = data_dir / "dicom" / "non_chest" / "CR-ModalitySequenceLUT.dcm"
    at.file_uploader(key="instructor_upload").set_value(("dental", dental.read_bytes(), "application/octet-stream"))
    at.run()
    assert not at.exception
    loaded = imaging.load(dental.read_bytes(), "dental")
    classifier = models.load(next(models_root.iterdir()))
    prediction = classifier.predict(preprocess.model_input(loaded.pixels, classifier.input_size))[0]
    expected = report.cautions(prediction, classifier.card, quality.assess(loaded, dental.read_bytes()), loaded.info)
    assert expected[0].startswith("Probably not a frontal chest radiograph")
    assert [w.value for w in at.warning if w.value in expected] == expected
    chest = data_dir / "kermany" / "train" / "NORMAL" / "IM-0115-0001.jpeg"
    at.file_uploader(key="instructor_upload").set_value(("chest.jpeg", chest.read_bytes(), "image/jpeg")).run()
    assert not at.exception and not [w for w in at.warning if w.value.startswith("Probably not")]


def test_dicom_upload_and_bad_files(env, monkeypatch, data_dir):
    models_root, root, _, _, _ = env
    at = run_page(monkeypatch, models_root, root)
    dicom = data_dir / "dicom" / "fo-dicom" / "CR-MONO1-10-chest.dcm"
    at.file_uploader(key="instructor_upload").set_value(("CR-MONO1", dicom.read_bytes(), "application/octet-stream"))
    at.run()
    assert not at.exception and not at.error and "Grad-CAM" in captions(at)
    bad = [("966.dcm", (data_dir / "dicom" / "pylibjpeg-data" / "966.dcm").read_bytes(),
            "The DICOM image data could not be decoded (JPEG 2000 Image Compression (Lossless Only))"),
           ("notes.txt", b"not an image at all", "This is a text file, not an image."),
           ("empty.png", b"", "The file is empty (0 bytes)")]
    for name, data, start in bad:
        with pytest.raises(imaging.UnreadableImageError) as raised:
            imaging.load(data, name)
        at.file_uploader(key="instructor_upload").set_value((name, data, "application/octet-stream")).run()
        assert not at.exception
        # The reader's own message for this file, word for word (what it is and what to do), not a generic one.
        assert [e.value for e in at.error] == [str(raised.value)], name
        assert str(raised.value).startswith(start), name
        assert "Most confident errors of the held-out split" in [h.value for h in at.header]


def test_image_from_the_held_out_split_and_from_the_data_root(env, monkeypatch):
    models_root, root, _, _, _ = env
    at = run_page(monkeypatch, models_root, root)
    at.radio(key="instructor_source").set_value("From the held-out split").run()
    assert not at.exception and not at.warning[1:] and "Grad-CAM" in captions(at)
    at.radio(key="instructor_source").set_value("From the data root").run()
    at.selectbox(key="instructor_folder").set_value("eval/NORMAL").run()
    assert not at.exception
    assert at.selectbox(key="instructor_file").value.name == "IM-0115-0001.jpeg"
    assert "Grad-CAM" in captions(at)


def test_the_held_out_list_is_narrowed_by_class_and_says_when_it_is_cut(env, monkeypatch, tmp_path):
    """The list offered only the split's first 500 rows, unannounced: for the shipped cxr3, covid19_radiography's
    COVID-19 and NORMAL films, and none of its PNEUMONIA films. A source and a class narrow it now, and a list
    still longer than 500 says so."""
    models_root, root, folder, _, _ = env
    own = tmp_path / "models"
    shutil.copytree(folder, own / folder.name)
    predictions = pd.read_csv(folder / "predictions.csv")
    many = pd.concat([predictions] * (600 // len(predictions) + 1), ignore_index=True)
    many["split"] = "test"
    many.to_csv(own / folder.name / "predictions.csv", index=False)
    at = run_page(monkeypatch, own, root)
    at.radio(key="instructor_source").set_value("From the held-out split").run()
    assert not at.exception
    assert any(f"The first 500 of these {len(many)} films are listed" in c.value for c in at.caption)
    assert len(at.selectbox(key="instructor_held_out").options) == 500
    wanted = sorted(many["true_class"].unique())[-1]
    at.selectbox(key="instructor_held_true_class").set_value(wanted).run()
    assert not at.exception
    options = at.selectbox(key="instructor_held_out").options
    chosen = many[many["true_class"] == wanted]
    assert len(options) == min(500, len(chosen)) and all(f"(true {wanted})" in o for o in options)


def test_names_that_are_not_utf8_are_listed_and_read(env, monkeypatch, tmp_path, data_dir):
    """A server folder and file whose names' bytes are not UTF-8 (e.g. Latin-1 from an old share)."""
    import os

    models_root, _, _, _, _ = env
    film = data_dir / "kermany" / "train" / "NORMAL" / "IM-0115-0001.jpeg"
    folder = os.path.join(os.fsencode(tmp_path), b"caf\xe9")
    os.mkdir(folder)
    shutil.copyfile(film, os.path.join(folder, b"r\xe9sum\xe9.jpeg"))
    at = run_page(monkeypatch, models_root, tmp_path)
    at.radio(key="instructor_source").set_value("From the data root").run()
    at.selectbox(key="instructor_folder").set_value(os.fsdecode(b"caf\xe9")).run()
    assert not at.exception
    assert at.selectbox(key="instructor_file").value.name == os.fsdecode(b"r\xe9sum\xe9.jpeg")
    assert "Grad-CAM" in captions(at)


def test_a_new_image_is_explained_for_its_called_class(env, monkeypatch, data_dir):
    models_root, root, _, _, classifier = env
    films = [data_dir / "kermany" / "train" / c / n for c, n in (("NORMAL", "IM-0115-0001.jpeg"),
                                                               ("PNEUMONIA", "person1000_bacteria_2931.jpeg"))]
    called = [classifier.predict_pixels([imaging.load(f).pixels])[0].decision for f in films]
    at = run_page(monkeypatch, models_root, root)
    for film, decision in zip(films, called, strict=True):
        at.file_uploader(key="instructor_upload").set_value((film.name, film.read_bytes(), "image/jpeg")).run()
        assert not at.exception and at.selectbox(key="instructor_class").value == decision
        other = "NORMAL" if called[1] == "PNEUMONIA" else "PNEUMONIA"  # a choice the next film must not inherit
        at.selectbox(key="instructor_class").set_value(other).run()


def test_a_data_root_that_is_not_a_folder_is_a_message(env, monkeypatch, tmp_path):
    models_root, _, _, _, _ = env
    at = run_page(monkeypatch, models_root, tmp_path / "no-such-root")
    at.radio(key="instructor_source").set_value("From the data root").run()
    assert not at.exception
    assert any("CXR_DATA_ROOT is set to" in e.value and "not a folder" in e.value for e in at.error), at.error


def test_a_folder_removed_after_it_was_listed_gives_a_message_not_a_traceback(env, monkeypatch):
    """The folder list is drawn, then the folder goes (another user, a cleanup job) before the page reads it."""
    from cxr_core import paths

    models_root, root, _, _, _ = env
    listed = paths.subfolders
    monkeypatch.setattr(paths, "subfolders", lambda folder: [*listed(folder), "gone-soon"])  # listed, not there
    at = run_page(monkeypatch, models_root, root)
    at.radio(key="instructor_source").set_value("From the data root").run()
    at.selectbox(key="instructor_folder").set_value("gone-soon").run()
    assert not at.exception
    assert any("does not exist" in e.value for e in at.error), [e.value for e in at.error]


def test_gallery_shows_the_most_confident_errors_and_says_when_a_file_is_missing(env, monkeypatch, tmp_path):
    _, root, folder, predictions, _ = env
    errors = probe.confident_errors(predictions, ["NORMAL", "PNEUMONIA"], k=8)
    assert len(errors) > 0
    # A second model folder whose predictions name one image that is not on disk.
    other = tmp_path / "models" / folder.name
    shutil.copytree(folder, other)
    missing = predictions.iloc[[0]].assign(path="NORMAL/gone.jpeg", true_class="NORMAL", p_NORMAL=0.0,
                                           p_PNEUMONIA=1.0, predicted_class="PNEUMONIA")
    pd.concat([predictions, missing]).to_csv(other / "predictions.csv", index=False)
    at = run_page(monkeypatch, tmp_path / "models", root)
    assert not at.exception
    gallery = [c for c in captions(at) if ": true " in c]
    # as plain text: a caption is Markdown, and a path from predictions.csv could carry a link or an image
    assert gallery == [ui.plain(f"{r.path}: true {r.true_class}, called {r.predicted_class} ({r.confidence:.2f})")
                       for r in errors.itertuples()]
    assert any("Cannot find NORMAL/gone.jpeg" in w.value for w in at.warning)


def test_model_without_predictions_explains_the_missing_gallery(tiny_model3_dir, monkeypatch, tmp_path, env):
    _, root, _, _, _ = env
    shutil.copytree(tiny_model3_dir, tmp_path / tiny_model3_dir.name)
    at = run_page(monkeypatch, tmp_path, root)
    assert not at.exception
    assert any("no predictions.csv" in i.value for i in at.info)


@pytest.mark.parametrize("column", ["predicted_class", "path"])
def test_predictions_that_do_not_fit_the_card_give_a_message_not_a_traceback(env, monkeypatch, tmp_path, column):
    """A predictions.csv of another version (a column missing): the gallery says so; without paths the held-out
    picker says so too."""
    _, root, folder, predictions, _ = env
    other = tmp_path / "models" / folder.name
    shutil.copytree(folder, other)
    predictions.drop(columns=[column]).to_csv(other / "predictions.csv", index=False)
    at = run_page(monkeypatch, tmp_path / "models", root)
    assert not at.exception
    assert any("does not fit its card" in w.value and column in w.value for w in at.warning), \
        [w.value for w in at.warning]
    if column == "path":
        at.radio(key="instructor_source").set_value(at.radio(key="instructor_source").options[1]).run()
        assert not at.exception and any("has no path or true_class column" in w.value for w in at.warning)


def test_a_failing_method_or_prediction_is_a_message_and_the_rest_stands(env, monkeypatch, data_dir, tmp_path):
    import audit
    from cxr_core import explain as explain_lib

    monkeypatch.setenv("CXR_AUDIT_DIR", str(tmp_path / "audit"))

    models_root, root, _, _, _ = env
    original = explain_lib.Explainer.explain
    original_layers = explain_lib.Explainer.layer_choices

    def smoothgrad_breaks(self, batch, method, *args, **kwargs):
        if method == "smoothgrad":
            raise RuntimeError("a native library failed")
        return original(self, batch, method, *args, **kwargs)

    monkeypatch.setattr(explain_lib.Explainer, "explain", smoothgrad_breaks)
    path = data_dir / "kermany" / "train" / "NORMAL" / "IM-0125-0001.jpeg"  # a film no other test explains (cache)
    at = run_page(monkeypatch, models_root, root)
    at.file_uploader(key="instructor_upload").set_value((path.name, path.read_bytes(), "image/jpeg")).run()
    assert not at.exception
    assert [e.value for e in at.error] == ["SmoothGrad could not be computed (unexpected RuntimeError); the rest "
                                           "of the page stands. Try another image, or report it if it keeps failing."]
    assert captions(at)[:3] == ["Grad-CAM", "Grad-CAM++", "LayerCAM"]
    assert [s for s in SECTIONS if s not in [h.value for h in at.subheader]] == []

    # Listing the layers builds the Keras model when predictions came from the engine cache: its failure cost the
    # rest of the page (occlusion, the gallery) a traceback.
    monkeypatch.setattr(explain_lib.Explainer, "layer_choices", lambda self: (_ for _ in ()).throw(MemoryError()))
    at.run()
    assert not at.exception
    assert any(e.value.startswith("The layer list could not be computed (unexpected MemoryError)") for e in at.error)
    assert "Occlusion sensitivity" in [h.value for h in at.subheader]
    assert "Most confident errors of the held-out split" in [h.value for h in at.header]
    monkeypatch.setattr(explain_lib.Explainer, "layer_choices", original_layers)

    def predict_breaks(self, batch):
        raise RuntimeError("a native library failed")

    monkeypatch.setattr(models.Classifier, "predict", predict_breaks)
    other = data_dir / "kermany" / "train" / "NORMAL" / "IM-0122-0001.jpeg"
    at.file_uploader(key="instructor_upload").set_value((other.name, other.read_bytes(), "image/jpeg")).run()
    assert not at.exception
    assert any(e.value.startswith("The prediction for this image could not be computed") for e in at.error)
    assert [(x["action"], x["counts"]) for x in audit.read(tmp_path / "audit")][-1] == (
        "classify", {"images": 1, "failed": 1})  # the film was read: on record though not classified
    assert "Most confident errors of the held-out split" in [h.value for h in at.header]


def test_the_gallery_of_held_out_films_is_audited_once(env, monkeypatch, tmp_path):
    import audit

    models_root, root, _, _, _ = env
    monkeypatch.setenv("CXR_AUDIT_DIR", str(tmp_path / "audit"))
    at = run_page(monkeypatch, models_root, root)
    assert not at.exception
    shown = [c for c in captions(at) if ": true " in c]
    at.run()
    lines = audit.read(tmp_path / "audit")
    assert [(x["action"], x["source"], x["counts"]) for x in lines] == [
        ("classify", "held_out", {"images": len(shown)})] and shown
