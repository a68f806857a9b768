"""The Classify page driven through streamlit.testing.v1.AppTest with a tiny model and real files."""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import plotly_spec
import pydicom
import pytest
from conftest import DATA, DICOM, familiar_films
from PIL import Image
from streamlit.testing.v1 import AppTest

from cxr_core import card, imaging, models, overlay, pipeline, preprocess, report, viewer
from cxr_core.errors import UNEXPECTED
from cxr_core.explain import Explainer

PAGE = str(Path(__file__).resolve().parents[1] / "pages" / "classify.py")
KERMANY = DATA / "kermany/train/PNEUMONIA/person1_bacteria_1.jpeg"
CHEST_DICOMS = [
    "fo-dicom/CR-MONO1-10-chest.dcm",
    "pydicom-data/RG1_J2KI.dcm",
    "pylibjpeg-data/RG1_JLSN.dcm",
    "pylibjpeg-data/966_fixed.dcm",
    "pylibjpeg-data/JPEG2KLossless_1s_1f_u_16_16.dcm",
    "torchxrayvision/1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm",
    "torchxrayvision/Fake_MONOHR1.dcm",
]
SECRETS = {"PatientName": "Doe^Jane^Secret", "PatientID": "PID-424242", "PatientBirthDate": "19700101",
           "AccessionNumber": "ACC-777313", "InstitutionName": "St Elsewhere Hospital"}


@pytest.fixture()
def models_root(tmp_path, tiny_model_dir, monkeypatch) -> Path:
    root = tmp_path / "models"
    shutil.copytree(tiny_model_dir, root / tiny_model_dir.name)
    monkeypatch.setenv("CXR_MODELS_DIR", str(root))
    return root


def _page() -> AppTest:
    return AppTest.from_file(PAGE, default_timeout=120).run()


def _upload(at: AppTest, name: str, data: bytes) -> AppTest:
    uploaders = [w for w in at.get("file_uploader") if w.key == "classify_upload"]
    assert uploaders, f"the page shows no uploader; its messages: {[e.value for e in at.error + at.info]}"
    uploaders[0].set_value((name, data, "application/octet-stream"))
    return at.run()


def _shown_probabilities(at: AppTest) -> dict[str, str]:
    table = at.table[0].value
    return dict(zip(table["Class"], table["Probability"], strict=True))


def _shown(at: AppTest) -> tuple[np.ndarray, np.ndarray]:
    """The viewer's film (uint8 grey levels) and right pane (the wash, RGB) as the page sent them."""
    spec = plotly_spec.viewer(at)
    return plotly_spec.film(spec), plotly_spec.right_pane(spec)


def _heat_title(at: AppTest) -> str:
    return plotly_spec.titles(plotly_spec.viewer(at))[1]


def _rendered_text(at: AppTest) -> str:
    """Every element's protobuf as text: what the browser would receive (tables included).

    Pixel data (the viewer's base64 arrays and PNGs) is left out: random base64 text holds short
    words such as 'Doe' by chance, and it encodes pixels, not tags.
    """
    texts, pending = [], [at._tree]
    while pending:
        node = pending.pop()
        pending.extend(getattr(node, "children", {}).values())
        proto = getattr(node, "proto", None)
        if proto is not None:
            texts.append(str(proto))
    for table in at.table:
        texts.append(table.value.to_csv())
    return re.sub(r'bdata[^A-Za-z0-9]*[A-Za-z0-9+/=\\]*|base64,[A-Za-z0-9+/=\\]*', "<pixels>", "\n".join(texts))


def _no_exception(at: AppTest) -> None:
    assert [e.value for e in at.exception] == []


def test_real_jpeg_shows_the_probabilities_cxr_core_gives(models_root):
    at = _upload(_page(), KERMANY.name, KERMANY.read_bytes())
    _no_exception(at)
    classifier = models.load(models_root / "tiny-pneumonia")
    expected = pipeline.classify(classifier, Explainer(classifier), KERMANY.read_bytes(), KERMANY.name)
    shown = _shown_probabilities(at)
    assert shown == {n: f"{p:.4f}" for n, p in zip(expected.prediction.class_names,
                                                    expected.prediction.probabilities, strict=True)}
    assert f"Decision: :{'red' if expected.prediction.positive else 'blue'}[{expected.prediction.decision}]" in [
        m.value.replace("### ", "") for m in at.markdown]
    shown = viewer.display_copy(imaging.load(KERMANY.read_bytes()).pixels, expected.heatmap)
    film, wash = _shown(at)  # the viewer shows the film and its wash from the right pixels
    np.testing.assert_array_equal(film, shown.film)
    assert wash.shape == (*film.shape, 3)  # the overlay has the film's shape
    np.testing.assert_array_equal(wash, overlay.overlay(shown.film / np.float32(255), shown.heatmap, "jet", 0.4))
    assert at.selectbox(key="explain_class").value == expected.class_index
    assert [b.label for b in at.download_button] == ["Download report (PNG)", "Download report (PDF)"]
    assert at.warning[0].value == card.RESEARCH_USE


def test_a_rescored_card_shows_its_own_probabilities_not_the_cached_ones(models_root):
    """``training rescore`` keeps the weights and writes a new temperature into the card: the same upload, shown
    again in the same session, gets the new card's probabilities (the page's cache is keyed on the card too)."""
    folder = models_root / "tiny-pneumonia"
    at = _upload(_page(), KERMANY.name, KERMANY.read_bytes())
    _no_exception(at)
    before = _shown_probabilities(at)
    rescored = card.read(folder)
    rescored.temperature = rescored.temperature * 4
    card.save(rescored, folder)
    at.run()
    _no_exception(at)
    classifier = models.load(folder)
    expected = pipeline.classify(classifier, Explainer(classifier), KERMANY.read_bytes(), KERMANY.name)
    after = _shown_probabilities(at)
    assert after == {n: f"{p:.4f}" for n, p in expected.prediction.as_dict().items()} and after != before


def _key(at: AppTest) -> str:
    """The shown image's key (content hash + weights hash), which keys its window widgets."""
    if "explain_image" not in at.session_state:  # the page stopped before the image: say what it showed
        shown = [e.value for e in (*at.exception, *at.error, *at.sidebar.error, *at.info)]
        raise AssertionError(f"the page shows no classified image; it shows {shown}")
    return at.session_state["explain_image"]


def test_switching_method_class_opacity_and_colormap_redraws_the_overlay(models_root):
    at = _upload(_page(), KERMANY.name, KERMANY.read_bytes())
    probabilities = _shown_probabilities(at)
    seen = [_shown(at)[1]]
    at.selectbox(key="cam_method").set_value("layercam").run()
    _no_exception(at)
    seen.append(_shown(at)[1])
    explain = at.selectbox(key="explain_class")
    explain.set_value(1 - explain.value).run()
    _no_exception(at)
    seen.append(_shown(at)[1])
    at.slider(key="cam_opacity").set_value(0.9).run()
    seen.append(_shown(at)[1])
    at.selectbox(key="cam_colormap").set_value("viridis").run()
    seen.append(_shown(at)[1])
    assert len({w.tobytes() for w in seen}) == 5
    assert _shown_probabilities(at) == probabilities  # the explanation never changes the prediction
    assert _heat_title(at).startswith("LayerCAM for")


def test_a_new_image_explains_its_own_called_class_again(models_root):
    classifier = models.load(models_root / "tiny-pneumonia")
    explainer = Explainer(classifier)
    top = pipeline.classify(classifier, explainer, KERMANY.read_bytes(), KERMANY.name).class_index
    # Another image with the same top class, so that a kept choice and a reset differ.
    other = next(p for p in sorted((KERMANY.parent.parent / "NORMAL").iterdir())[:40]
                 if pipeline.classify(classifier, explainer, p.read_bytes(), p.name).class_index == top)
    at = _upload(_page(), KERMANY.name, KERMANY.read_bytes())
    first_key = _key(at)
    at.selectbox(key="explain_class").set_value(1 - top).run()
    assert at.selectbox(key="explain_class").value == 1 - top
    at = _upload(at, other.name, other.read_bytes())
    _no_exception(at)
    expected = pipeline.classify(classifier, explainer, other.read_bytes(), other.name)
    assert _key(at) != first_key and at.selectbox(key="explain_class").value == expected.class_index == top
    assert _heat_title(at).endswith(f"for {expected.prediction.class_names[expected.class_index]}")


def test_an_unforeseen_failure_is_a_message_and_a_failing_method_falls_back_to_gradcam(models_root, monkeypatch,
                                                                                      tmp_path):
    import audit

    monkeypatch.setenv("CXR_AUDIT_DIR", str(tmp_path / "audit"))
    real = pipeline.classify
    failing = {"gradcam", "layercam"}

    def classify(*args, method="gradcam", **kwargs):
        if method in failing:
            raise RuntimeError("engine fault")
        return real(*args, method=method, **kwargs)

    monkeypatch.setattr(pipeline, "classify", classify)
    films = sorted((KERMANY.parent.parent / "NORMAL").iterdir())[-2:]  # files no other test caches
    at = _upload(_page(), films[0].name, films[0].read_bytes())
    _no_exception(at)
    assert [e.value for e in at.error] == [UNEXPECTED.format(kind="RuntimeError")]
    assert [(x["action"], x["counts"]) for x in audit.read(tmp_path / "audit")] == [
        ("classify", {"images": 1, "failed": 1})]  # the film was read, though not classified: on record

    failing.discard("gradcam")  # the decision and Grad-CAM work; LayerCAM fails
    at = _upload(at, films[1].name, films[1].read_bytes())
    _no_exception(at)
    assert at.error == [] and _heat_title(at).startswith("Grad-CAM for")
    at.selectbox(key="cam_method").set_value("layercam").run()
    _no_exception(at)
    assert len(at.error) == 1 and at.error[0].value.startswith("LayerCAM could not be computed"), at.error
    assert _heat_title(at).startswith("Grad-CAM for") and len(_shown_probabilities(at)) == 2


@pytest.mark.parametrize("name", CHEST_DICOMS)
def test_real_dicoms_show_deidentified_metadata(models_root, name):
    at = _upload(_page(), Path(name).stem, (DICOM / name).read_bytes())  # extension-less upload
    _no_exception(at)
    assert [e.value for e in at.error] == []
    fields = dict(zip(at.table[1].value["Field"], at.table[1].value["Value"], strict=True))
    header = pydicom.dcmread(DICOM / name, stop_before_pixels=True, force=True)
    assert fields["Modality"] == header.Modality
    assert fields["PhotometricInterpretation"] == header.PhotometricInterpretation
    assert fields["Size (width x height)"] == f"{header.Columns} x {header.Rows}"
    film, wash = _shown(at)
    assert max(film.shape) == min(1024, max(header.Rows, header.Columns)) and wash.shape == (*film.shape, 3)
    assert at.slider(key=f"center_{_key(at)}") is not None


def test_patient_tags_never_reach_the_page(models_root):
    ds = pydicom.dcmread(DICOM / CHEST_DICOMS[-2])
    for tag, value in SECRETS.items():
        setattr(ds, tag, value)
    buffer = io.BytesIO()
    ds.save_as(buffer)
    at = _upload(_page(), "anonymous", buffer.getvalue())
    _no_exception(at)
    assert len(at.table) == 2  # probabilities and the metadata panel were drawn
    text = _rendered_text(at)
    assert "CHEST" in text and card.RESEARCH_USE in text  # both tables and plain elements are searched
    for value in SECRETS.values():
        assert value not in text
        assert value.split("^")[0] not in text


def test_window_slider_and_presets_change_the_shown_image(models_root):
    at = _upload(_page(), "chest.dcm", (DICOM / CHEST_DICOMS[0]).read_bytes())
    key = _key(at)
    probabilities, original = _shown_probabilities(at), _shown(at)[0]
    assert at.slider(key=f"center_{key}").value == 550 and at.slider(key=f"width_{key}").value == 1024
    at.slider(key=f"width_{key}").set_value(300.0).run()
    _no_exception(at)
    narrowed = _shown(at)[0]
    assert not np.array_equal(narrowed, original)
    at.selectbox(key=f"preset_{key}").set_value("Bone").run()
    bone = _shown(at)[0]
    assert not np.array_equal(bone, original) and not np.array_equal(bone, narrowed)
    assert at.slider(key=f"width_{key}").value == pytest.approx(512.0)
    assert _shown_probabilities(at) == probabilities  # the model always sees the default window


def test_a_film_that_cannot_be_read_again_at_a_new_window_stays_shown_at_its_own(models_root, monkeypatch):
    """The film is read again for each display window; if that fails (memory, a decoder), the page says so and
    shows it at the window it was read with instead of a traceback."""
    at = _upload(_page(), "chest.dcm", (DICOM / CHEST_DICOMS[0]).read_bytes())
    original = _shown(at)[0]
    real = imaging.load

    def no_second_read(data, name="", window=None, **kwargs):
        if window is not None:
            raise imaging.UnreadableImageError("out of memory while decoding the image (test)")
        return real(data, name, window=window, **kwargs)

    monkeypatch.setattr(imaging, "load", no_second_read)
    at.slider(key=f"width_{_key(at)}").set_value(333.0).run()
    _no_exception(at)
    assert any("could not be shown at this window" in w.value for w in at.warning)
    np.testing.assert_array_equal(_shown(at)[0], original)


def test_viewer_shows_the_windowed_dicom_and_its_stored_values(models_root):
    data = (DICOM / CHEST_DICOMS[0]).read_bytes()
    at = _upload(_page(), "chest.dcm", data)
    at.slider(key=f"width_{_key(at)}").set_value(300.0).run()
    _no_exception(at)
    spec = plotly_spec.viewer(at)
    windowed = imaging.load(data, window=(550.0, 300.0)).pixels  # 440 x 440: shown pixel for pixel
    np.testing.assert_array_equal(plotly_spec.film(spec), np.rint(windowed * 255).astype(np.uint8))
    assert plotly_spec.right_pane(spec).shape == (440, 440, 3)
    ds = pydicom.dcmread(DICOM / CHEST_DICOMS[0], force=True)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian  # a raw dataset without a meta header
    stored = ds.pixel_array * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    np.testing.assert_array_equal(plotly_spec.array(spec["data"][0]["customdata"]), stored)


def test_the_report_draws_the_heatmap_as_the_viewer_shows_it(models_root, monkeypatch):
    """The report's heatmap is what the user looked at: the colour wash by default, the contour lines (and a
    caption naming their levels) once the viewer is set to them; it used to be a wash whatever the viewer showed."""
    from streamlit.delta_generator import DeltaGenerator

    makers: list = []
    real_button = DeltaGenerator.download_button
    monkeypatch.setattr(DeltaGenerator, "download_button", lambda self, label, data, **kw: makers.append(data)
                        or real_button(self, label, data, **kw))
    rendered: list = []
    real_render = report.render
    monkeypatch.setattr(report, "render", lambda **kw: rendered.append(kw) or real_render(**kw))

    def report_pane() -> tuple[float, str]:
        """The share of the report's heatmap pixels left as the grey film, and the caption's drawing note."""
        assert makers[-2]()[:8] == b"\x89PNG\r\n\x1a\n"  # the PNG report (the button before the PDF's)
        kw = rendered[-1]
        same = np.all(kw["overlay_rgb"] == overlay.to_rgb(kw["image"]), axis=-1)
        return float(same.mean()), kw["drawn_as"]

    at = _upload(_page(), KERMANY.name, KERMANY.read_bytes())
    _no_exception(at)
    grey, note = report_pane()
    assert grey < 0.2 and note == ""  # the wash tints nearly every pixel
    at.radio(key="cam_mode").set_value("contours").run()
    at.multiselect(key="cam_levels").set_value([0.3, 0.6]).run()
    _no_exception(at)
    grey, note = report_pane()
    assert 0.5 < grey < 1.0 and note == " (contour lines at 30, 60 %)"  # lines, and the film between them


def test_each_threshold_is_a_tick_on_its_own_bar(models_root):
    """The probability chart marks each class's threshold on that class's bar only (a line across the whole chart
    crossed every bar): the ticks sit at the card's thresholds, one per thresholded class, and the bars at the
    shown probabilities."""
    at = _upload(_page(), KERMANY.name, KERMANY.read_bytes())
    _no_exception(at)
    c = card.read(models_root / "tiny-pneumonia")
    (spec,) = [s for s in (json.loads(chart.proto.spec) for chart in at.get("plotly_chart"))
               if any(t["type"] == "bar" for t in s["data"])]
    bars = next(t for t in spec["data"] if t["type"] == "bar")
    shown = _shown_probabilities(at)
    assert list(bars["y"]) == list(c.class_names)
    assert [f"{x:.4f}" for x in plotly_spec.array(bars["x"])] == [shown[n] for n in c.class_names]
    (ticks,) = [t for t in spec["data"] if t.get("name") == "threshold"]
    assert list(ticks["y"]) == list(c.thresholds) and len(c.thresholds) >= 1
    np.testing.assert_allclose(plotly_spec.array(ticks["x"]), list(c.thresholds.values()))
    assert not spec["layout"].get("shapes")  # no line across the chart


def test_contour_mode_draws_lines_at_the_chosen_levels(models_root):
    at = _upload(_page(), KERMANY.name, KERMANY.read_bytes())
    at.radio(key="cam_mode").set_value("contours").run()
    at.multiselect(key="cam_levels").set_value([0.3, 0.6]).run()
    _no_exception(at)
    spec = plotly_spec.viewer(at)
    drawn = plotly_spec.lines(spec)
    assert list(drawn) == ["heatmap 30%", "heatmap 60%"]
    classifier = models.load(models_root / "tiny-pneumonia")
    result = pipeline.classify(classifier, Explainer(classifier), KERMANY.read_bytes(), KERMANY.name)
    shown = viewer.display_copy(result.image.pixels, result.heatmap)
    np.testing.assert_array_equal(plotly_spec.right_pane(spec), shown.film)  # the film is left unwashed
    offset = (shown.scale - 1) / 2
    padded = np.pad(shown.heatmap, 1, constant_values=-1.0)  # outside the film counts as below any level
    for level, (x, y) in zip((0.3, 0.6), drawn.values(), strict=True):
        cols = np.rint((x - offset) / shown.scale).astype(int) + 1
        rows = np.rint((y - offset) / shown.scale).astype(int) + 1
        assert len(cols) > 4
        assert np.all(padded[rows, cols] >= level)  # every point is inside the region at its level...
        outside = np.minimum.reduce([padded[rows - 1, cols], padded[rows + 1, cols],
                                     padded[rows, cols - 1], padded[rows, cols + 1]])
        assert np.all(outside < level)  # ...and on its edge


@pytest.mark.parametrize(
    ("name", "data", "fragment"),
    [
        ("966.dcm", (DICOM / "pylibjpeg-data/966.dcm").read_bytes(), "could not be decoded"),
        ("empty.png", b"", "empty"),
        ("notes.png", b"Patient notes, not an image\n" * 20, "not"),
    ],
    ids=["corrupt-dicom", "empty", "text-as-png"],
)
def test_bad_files_give_the_clear_message_and_the_page_keeps_working(models_root, name, data, fragment):
    at = _upload(_page(), name, data)
    _no_exception(at)
    assert len(at.error) == 1 and fragment in at.error[0].value.lower()
    assert len(at.get("plotly_chart")) == 0
    at = _upload(at, KERMANY.name, KERMANY.read_bytes())
    _no_exception(at)
    assert [e.value for e in at.error] == []
    assert _shown(at)[1].ndim == 3 and len(_shown_probabilities(at)) == 2


def test_non_chest_dicom_shows_the_not_a_chest_warning(models_root):
    at = _upload(_page(), "teeth.dcm", (DICOM / "non_chest/CR-ModalitySequenceLUT.dcm").read_bytes())
    _no_exception(at)
    warnings = [w.value for w in at.warning if w.value.startswith("Probably not a frontal chest radiograph")]
    assert len(warnings) == 1 and "side" in warnings[0]
    assert any(e.label.startswith("How 'probably not a chest X-ray' is decided") for e in at.expander)


def test_real_chest_film_has_no_not_a_chest_warning(models_root):
    at = _upload(_page(), KERMANY.name, KERMANY.read_bytes())
    assert not [w for w in at.warning if w.value.startswith("Probably not")]


def _kermany_batch():
    """The test film as the tiny models' input (64 px)."""
    return preprocess.to_batch([preprocess.prepare(imaging.load(KERMANY).pixels, 64)])


def test_low_confidence_warning_follows_the_card(models_root):
    folder = models_root / "tiny-pneumonia"
    edited = card.read(folder)
    edited.low_confidence = 0.999
    card.save(edited, folder)  # an edit made on purpose is written again by card.save, with its hash
    at = _upload(_page(), KERMANY.name, KERMANY.read_bytes())
    lows = [w.value for w in at.warning if w.value.startswith("Low confidence")]
    assert len(lows) == 1 and "below the 99.9% this model asks for" in lows[0]
    top = models.load(folder).probabilities(_kermany_batch())[0]
    assert f"the most probable class, {edited.class_names[int(np.argmax(top))]}, has" in lows[0]


def test_a_class_called_though_another_is_more_probable_is_said_on_the_page(models_root):
    """A threshold below the other class's probability calls PNEUMONIA though NORMAL is more probable: the page
    says so beside the decision (and the report gets the sentence); with the top class called it says nothing."""
    folder = models_root / "tiny-pneumonia"
    p = models.load(folder).probabilities(_kermany_batch())[0]
    low, high = sorted((0, 1), key=lambda i: p[i])  # the less and the more probable class on this film
    names = ("NORMAL", "PNEUMONIA")
    edited = card.read(folder)
    edited.low_confidence = 0.0
    edited.negative_class = names[high]
    edited.thresholds = {names[low]: float(p[low]) * 0.99}  # the less probable class reaches its threshold
    card.save(edited, folder)
    at = _upload(_page(), KERMANY.name, KERMANY.read_bytes())
    said = [w.value for w in at.warning if "is called because its probability" in w.value]
    assert len(said) == 1 and said[0].startswith(f"{names[low]} is called") and \
        f"although {names[high]} is more probable ({p[high]:.1%})" in said[0], said
    edited.thresholds = {names[low]: min(1.0, float(p[low]) * 1.01)}  # now it does not: the top class is called
    card.save(edited, folder)
    at = _upload(_page(), KERMANY.name, KERMANY.read_bytes())
    assert not [w for w in at.warning if "is called because its probability" in w.value]


def test_no_models_gives_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("CXR_MODELS_DIR", str(tmp_path / "nothing-here"))
    at = _page()
    _no_exception(at)
    assert "No models found" in at.sidebar.error[0].value
    assert at.info[0].value.startswith("Choose a working model")
    assert len(at.file_uploader) == 0


def test_tampered_model_gives_a_clear_message(tmp_path, tiny_model_dir, monkeypatch):
    folder = tmp_path / "models" / "tampered"
    shutil.copytree(tiny_model_dir, folder)
    weights = folder / card.WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes() + b"\0")
    monkeypatch.setenv("CXR_MODELS_DIR", str(folder.parent))
    at = _page()
    _no_exception(at)
    assert "does not match its model card" in at.sidebar.error[0].value
    assert len(at.file_uploader) == 0


def test_invalid_card_gives_a_clear_message(tmp_path, monkeypatch):
    folder = tmp_path / "models" / "broken"
    folder.mkdir(parents=True)
    (folder / card.CARD_FILE).write_text("{not json")
    monkeypatch.setenv("CXR_MODELS_DIR", str(folder.parent))
    at = _page()
    _no_exception(at)
    assert "not valid JSON" in at.sidebar.error[0].value


def test_familiarity_warns_on_a_film_unlike_the_training_films(familiar_model_dir, tmp_path, monkeypatch):
    root = tmp_path / "models"
    shutil.copytree(familiar_model_dir, root / familiar_model_dir.name)
    monkeypatch.setenv("CXR_MODELS_DIR", str(root))
    classifier = models.load(root / familiar_model_dir.name)
    # A flat grey square is nothing like a chest film: the page warns, with the distance it was given.
    grey = io.BytesIO()
    Image.fromarray(np.full((256, 256), 128, np.uint8)).save(grey, format="PNG")
    at = _upload(_page(), "grey.png", grey.getvalue())
    _no_exception(at)
    expected = classifier.predict_pixels([np.full((256, 256), 128 / 255, np.float32)])[0]
    assert expected.unfamiliar
    warned = [w.value for w in at.warning if w.value.startswith("Unlike the films this model was trained on")]
    assert len(warned) == 1 and f"distance {expected.familiarity:.4f}" in warned[0]
    assert warned[0].count("unreliable") == 1  # said once, not twice
    # One of the films the check was fitted on: no warning, the distance as a quiet caption.
    film = familiar_films()[1]
    at = _upload(_page(), film.name, film.read_bytes())
    seen = classifier.predict_pixels([imaging.load(film).pixels])[0]
    assert not seen.unfamiliar
    assert not [w for w in at.warning if w.value.startswith("Unlike the films")]
    assert any(f"distance {seen.familiarity:.4f}" in c.value and "within the range" in c.value for c in at.caption)


def test_dicom_fields_are_shown_as_plain_text_and_only_when_valid(models_root):
    """st.table renders Markdown: a Manufacturer of '![](http://...)' made the browser fetch an address whenever
    the film was viewed; a code string whose damaged length ran on into the next elements was shown whole."""
    ds = pydicom.dcmread(DICOM / CHEST_DICOMS[-2])
    ds.Manufacturer = "**ACME** ![x](http://127.0.0.1:9/t.png)"
    ds.BodyPartExamined = "CHEST\\Dr^Referring"  # not a code string: a damaged length ran on
    buffer = io.BytesIO()
    ds.save_as(buffer)
    at = _upload(_page(), "odd", buffer.getvalue())
    _no_exception(at)
    fields = dict(zip(at.table[1].value["Field"], at.table[1].value["Value"], strict=True))
    assert fields["Manufacturer"].startswith(
        r"\*\*ACME\*\* \!\[x\]\(http\:")
    assert fields["BodyPartExamined"] == "(not shown: not a valid value for this field)"
    assert "Referring" not in _rendered_text(at)


def test_the_report_carries_what_the_reader_changed(models_root, monkeypatch):
    """The page noted 'only the first of 3 frames is shown and classified', but the PNG/PDF report did not."""
    from streamlit.delta_generator import DeltaGenerator

    film = Image.open(DATA / "kermany" / "train" / "NORMAL" / "IM-0115-0001.jpeg").convert("L").resize((128, 128))
    frames = np.stack([np.asarray(film, np.uint16) * 16] * 3)
    ds = pydicom.dcmread(DICOM / CHEST_DICOMS[-2], stop_before_pixels=True)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.Rows = ds.Columns = 128
    ds.NumberOfFrames, ds.SamplesPerPixel, ds.PhotometricInterpretation = 3, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = frames.tobytes()
    ds["PixelData"].VR = "OW"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    makers: list = []
    real_button = DeltaGenerator.download_button  # the page's buttons sit in columns
    monkeypatch.setattr(DeltaGenerator, "download_button", lambda self, label, data, **kw: makers.append(data)
                        or real_button(self, label, data, **kw))
    at = _upload(_page(), "three.dcm", buffer.getvalue())
    _no_exception(at)
    assert any("only the first is shown and classified" in c.value for c in at.caption)
    said: list = []
    real_render = report.render
    monkeypatch.setattr(report, "render", lambda **kw: said.append(kw["warnings"]) or real_render(**kw))
    assert makers and makers[-1]()[:4] == b"%PDF"  # the PDF report, made as the browser would ask for it
    assert any(w == "Reading: Frames: 3 frames in the file: only the first is shown and classified." for w in said[0])
