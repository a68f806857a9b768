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

__version__ = "0.1.0"
