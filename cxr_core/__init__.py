"""cxr_core: the shared chest X-ray library used by the app and the training package.

Modules (import them directly, e.g. ``from cxr_core import imaging``):

- ``errors``     the exception types (``UnreadableImageError``, ``ModelCardError``)
- ``imaging``    reading JPEG/PNG/.../DICOM into float32 HxW in [0, 1]
- ``preprocess`` the single path from that array to the model input
- ``card``       the model card (``ModelCard``), saved as model_card.json
- ``models``     building, loading and predicting with the classifiers
- ``explain``    Grad-CAM and the tf-keras-vis methods (TensorFlow, serving side only)
- ``overlay``    drawing a heatmap over an image (numpy/OpenCV only)
- ``metrics``    evaluation metrics through scikit-learn

The training-side modules (imaging, preprocess, card, models, metrics) use numpy, PIL,
pydicom, OpenCV and Keras 3 only, never TensorFlow directly, so training runs under any
Keras backend. Nothing here imports streamlit.
"""

import logging as _logging
import warnings as _warnings

__version__ = "0.1.0"


_QUIET_MODULES = r"(pydicom|highdicom)(\.|$)"


def keep_dicom_values_out_of_logs() -> None:
    """Nothing pydicom or highdicom says reaches stderr or a log handler of this process (idempotent, cheap).

    Their warnings and log records quote the value they complain about ("Invalid value for VR UI: '...'"),
    and in a damaged file that value can run on into the patient's name and id (an element whose length
    swallows the elements after it). Printed, such a warning lands in the server's log or a Ray worker's
    log file. The user gets this library's own message instead (``errors.UnreadableImageError``).
    Called on import and again by ``imaging.load``: a ``warnings.catch_warnings`` block that was open
    when this package was imported (a test runner's, say) throws the filter away when it closes.
    """
    if not any(f[0] == "ignore" and f[3] is not None and f[3].pattern == _QUIET_MODULES for f in _warnings.filters):
        _warnings.filterwarnings("ignore", module=_QUIET_MODULES)
    for name in ("pydicom", "highdicom"):
        logger = _logging.getLogger(name)
        logger.propagate = False  # never up to the root logger's handlers
        if not logger.handlers:
            logger.addHandler(_logging.NullHandler())  # nor to logging's last-resort handler (stderr)


keep_dicom_values_out_of_logs()
