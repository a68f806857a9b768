"""Where the model looked: Grad-CAM and the tf-keras-vis methods (TensorFlow, serving side).

Build one ``Explainer`` per loaded model and reuse it (it is shared between app sessions):

    explainer = Explainer(classifier)
    probs, heatmaps = explainer.gradcam(batch)                  # one forward pass
    explanation = explainer.explain(batch[:1], "scorecam", class_index=1)

Grad-CAM at the card's target layer of a model whose head is global average pooling and a Dense layer
(``models.head_weights``) needs no backward pass: the gradient of logit c is ``W[:, c] / (h * w)`` at
every position, so Grad-CAM is CAM from the feature map and the Dense weights, and the classifier's
one forward pass (on its engine, OpenVINO or TensorFlow) gives both the prediction and the map.
Other heads and other layers use our compiled ``tf.function``: one forward and one backward pass,
traced once per (model, layer) because the input signature is fixed and the class index is a tensor.
The score is the chosen class's *logit* (the models output logits).
Grad-CAM++ and LayerCAM at that target layer come from the same pass too: with a gradient that is
constant over positions, tf-keras-vis's Grad-CAM++ alphas are all ``1 / (h * w)`` and its weights
``exp(score) * ReLU(W[:, c])``, and LayerCAM weights each position by ``ReLU(W[:, c])``: both are
CAM with the class's positive Dense weights only (equal to tf-keras-vis after normalisation; tested).
Elsewhere (other layers, other heads), and for Score-CAM and SmoothGrad, they come from
tf-keras-vis 0.8.7, built once per model.
Every heatmap is float32 (S, S) in [0, 1] at the model's input size: raw maps are resized
bilinearly and min-max normalised per image (a constant map becomes all zeros).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np

from cxr_core import models

if TYPE_CHECKING:  # imported where used: the one-pass methods need neither (cxr_core.models.load)
    import keras
    import tensorflow as tf

METHODS = ("gradcam", "gradcam++", "scorecam", "layercam", "smoothgrad")
# The methods that the classifier's one forward pass gives at the target layer of a GAP + Dense head.
ONE_PASS_METHODS = ("gradcam", "gradcam++", "layercam")
# Faster Score-CAM: only the 64 feature channels with the largest spatial variance are masked in,
# i.e. 64 extra forward passes per image (a few seconds for DenseNet169 at 224 px on a CPU).
SCORECAM_MAX_N = 64
SMOOTHGRAD_SAMPLES = 20
SMOOTHGRAD_NOISE = 0.2  # noise std as a fraction of the image's value range

# The layer that ends each dense block / stage, by architecture family; group 1 names the stage.
_STAGE_PATTERNS = {
    "densenet": r"conv(\d+)_block\d+_concat",
    "resnet": r"conv(\d+)_block\d+_out",
    "vgg": r"block(\d+)_conv\d+",
    "inception": r"mixed(\d+)",
    "tiny": r"tiny_relu(\d+)",
}


@dataclass(frozen=True)
class Explanation:
    """One image's heatmap: float32 (S, S) in [0, 1] for ``class_index``; ``layer`` None for SmoothGrad."""

    heatmap: np.ndarray
    method: str
    class_index: int
    layer: str | None


def cam_from_features(features: np.ndarray, weights: np.ndarray, classes: np.ndarray,
                      positive: bool = False) -> np.ndarray:
    """Grad-CAM for a GAP + Dense head: ReLU(sum_k features[..., k] * W[k, c] / (h * w)), float32 (N, h, w).

    ``features`` float32 (N, h, w, K), ``weights`` the Dense kernel (K, C), ``classes`` int (N,).
    ``positive``: only the channels whose weight is positive (Grad-CAM++ and LayerCAM for this head,
    up to a positive factor per image that normalisation removes).
    """
    n, h, w, _ = features.shape
    chosen = weights[:, classes].T.astype(np.float64) / (h * w)  # (N, K): the mean gradient per channel
    if positive:
        chosen = np.maximum(chosen, 0.0)
    maps = np.einsum("nhwk,nk->nhw", features.astype(np.float64), chosen)
    return np.maximum(maps, 0.0).astype(np.float32)


def normalize(maps: np.ndarray, size: int) -> np.ndarray:
    """Raw maps (N, h, w) -> float32 (N, size, size) in [0, 1]: bilinear resize, per-map min-max."""
    out = np.empty((len(maps), size, size), dtype=np.float32)
    for i, m in enumerate(np.asarray(maps, dtype=np.float32)):
        if not np.isfinite(m).all():  # an overflow (Grad-CAM++'s exp of a large score): not a blank "no evidence" map
            raise ValueError("the heatmap holds non-finite values (a numerical overflow)")
        m = cv2.resize(m, (size, size), interpolation=cv2.INTER_LINEAR) if m.shape != (size, size) else m
        lo, hi = float(m.min()), float(m.max())
        out[i] = (m - lo) / (hi - lo) if hi > lo else 0.0
    return np.clip(out, 0.0, 1.0)


class _QuietModel:
    """The model as tf-keras-vis sees it, with Score-CAM's ``model.predict`` progress bar turned off."""

    def __init__(self, model: keras.Model):
        self._model = model

    def __getattr__(self, name: str) -> object:
        return getattr(self._model, name)

    def __call__(self, *args, **kwargs):
        return self._model(*args, **kwargs)

    def predict(self, x, batch_size: int | None = None, **kwargs) -> np.ndarray:
        return self._model.predict(x, batch_size=batch_size, verbose=0)


class Explainer:
    """Heatmaps for one ``models.Classifier``; thread-safe, builds its graphs lazily and once."""

    def __init__(self, classifier: models.Classifier):
        self.classifier = classifier
        self.size = classifier.input_size
        self.num_classes = classifier.card.num_classes
        self.target_layer = classifier.card.target_layer
        self._check_layer(self.target_layer)
        self._build_lock = threading.Lock()
        self._run_lock = threading.Lock()  # tf-keras-vis calls model.predict: one at a time
        self._gradcam_fns: dict[str, Callable] = {}
        self._visualizers: dict[str, object] = {}

    @property
    def model(self) -> keras.Model:
        """The Keras model (built on first use when the classifier is served from the engine cache)."""
        return self.classifier.model

    # --- validation -------------------------------------------------------------------------
    def layer_choices(self) -> list[str]:
        """The layer ending each dense block / stage, in model order; the card's target layer last."""
        family = next((f for f in _STAGE_PATTERNS if self.classifier.card.architecture.startswith(f)), None)
        stages: dict[str, str] = {}
        if family is not None:
            for layer in self.model.layers:
                match = re.fullmatch(_STAGE_PATTERNS[family], layer.name)
                if match:
                    stages[match.group(1)] = layer.name
        return [name for name in stages.values() if name != self.target_layer] + [self.target_layer]

    def one_pass(self, method: str, layer: str | None = None) -> bool:
        """Whether ``method`` at ``layer`` (None: the target layer) comes from the classifier's forward pass
        (CAM from the features and the GAP + Dense head), i.e. needs neither gradients nor the Keras model."""
        layer = layer or self.target_layer
        return method in ONE_PASS_METHODS and layer == self.classifier.feature_layer \
            and self.classifier.head is not None

    def _check_layer(self, layer: str) -> None:
        if layer is not None and layer == self.classifier.feature_layer:
            return  # a feature map of the model (checked when the classifier was made)
        try:
            shape = self.model.get_layer(layer).output.shape
        except ValueError:
            raise ValueError(f"layer {layer!r} is not in the model; choose one of {self.layer_choices()}") from None
        if len(shape) != 4:
            raise ValueError(f"layer {layer!r} has output shape {tuple(shape)}, not a 2-D feature map")

    def _check_batch(self, batch: np.ndarray) -> np.ndarray:
        batch = np.asarray(batch, dtype=np.float32)
        if batch.ndim != 4 or batch.shape[1:] != (self.size, self.size, 3):
            raise ValueError(f"expected a batch of shape (N, {self.size}, {self.size}, 3), got {batch.shape}")
        return batch

    def _check_class(self, class_index: int | None) -> None:
        if class_index is None:
            return
        if isinstance(class_index, bool) or not isinstance(class_index, int | np.integer):
            raise ValueError(f"class_index must be an int or None, got {class_index!r}")
        if not 0 <= class_index < self.num_classes:
            raise ValueError(f"class_index {class_index} is out of range for {self.num_classes} classes")

    def _class_vector(self, class_index: int | Sequence[int] | None, n: int) -> np.ndarray:
        """Per-image class indices as int32 (n,); -1 means the image's top class."""
        indices = [class_index] * n if class_index is None or np.ndim(class_index) == 0 else list(class_index)
        if len(indices) != n:
            raise ValueError(f"got {len(indices)} class indices for a batch of {n}")
        for c in indices:
            self._check_class(c)
        return np.array([-1 if c is None else int(c) for c in indices], dtype=np.int32)

    # --- compiled Grad-CAM ------------------------------------------------------------------
    def _gradcam_fn(self, layer: str) -> Callable:
        import keras
        import tensorflow as tf

        with self._build_lock:
            if layer not in self._gradcam_fns:
                grad_model = keras.Model(self.model.inputs, [self.model.get_layer(layer).output, self.model.output])
                spec = (tf.TensorSpec((None, self.size, self.size, 3), tf.float32), tf.TensorSpec((None,), tf.int32))

                # autograph=False: nothing here needs converting, and autograph parses and compiles Python
                # source, which raced with a Streamlit thread compiling at the same moment (Python 3.11).
                @tf.function(input_signature=spec, autograph=False)
                def run(images: tf.Tensor, classes: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
                    with tf.GradientTape() as tape:
                        features, logits = grad_model(images, training=False)
                        top = tf.argmax(logits, axis=-1, output_type=tf.int32)
                        chosen = tf.where(classes < 0, top, classes)
                        # Images are independent in inference mode, so the gradient of the summed
                        # scores gives each image the gradient of its own score.
                        score = tf.reduce_sum(tf.gather(logits, chosen, axis=1, batch_dims=1))
                    weights = tf.reduce_mean(tape.gradient(score, features), axis=(1, 2), keepdims=True)
                    cam = tf.nn.relu(tf.reduce_sum(features * weights, axis=-1))
                    return logits, cam

                self._gradcam_fns[layer] = run
            return self._gradcam_fns[layer]

    def raw_gradcam(
        self, batch: np.ndarray, class_index: int | Sequence[int] | None = None, layer: str | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Logits (N, C) and the un-normalised, un-resized ReLU'd Grad-CAM maps (N, h, w) at ``layer``.

        At the target layer of a GAP + Dense head: CAM from the classifier's one forward pass (its
        engine); otherwise ``compiled_gradcam``.
        """
        logits, cam, _ = self._raw(batch, class_index, layer)
        return logits, cam

    def _raw(self, batch: np.ndarray, class_index: int | Sequence[int] | None, layer: str | None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """``raw_gradcam`` plus the target-layer features of the same pass (None on the compiled path)."""
        batch = self._check_batch(batch)
        layer = layer or self.target_layer
        self._check_layer(layer)
        classes = self._class_vector(class_index, len(batch))
        if not self.one_pass("gradcam", layer):
            return (*self._compiled(batch, classes, layer), None)
        logits, features = self.classifier.forward(batch)
        chosen = np.where(classes < 0, np.argmax(logits, axis=-1), classes)
        return logits, cam_from_features(features, self.classifier.head, chosen), features

    def gradcam_predictions(
        self, batch: np.ndarray, class_index: int | Sequence[int] | None = None, layer: str | None = None
    ) -> tuple[list[models.Prediction], np.ndarray]:
        """Predictions (familiarity included) and heatmaps float32 (N, S, S) in [0, 1].

        At the target layer of a GAP + Dense head both come from one forward pass; on the compiled path
        (another layer) the prediction comes from one more forward pass of the classifier (its engine), and
        ``class_index`` None explains that prediction's top class.
        """
        if not self.one_pass("gradcam", layer or self.target_layer):
            # The compiled path's logits are TensorFlow's; the prediction is the serving engine's (as every page
            # shows it). Where they differ by a hair (bf16, two nearly tied classes) TensorFlow's top class is not
            # the engine's: so the map is drawn for the engine's top class, the one the prediction names.
            predictions = self.classifier.predict(self._check_batch(batch))
            if class_index is None:
                class_index = [int(np.argmax(p.probabilities)) for p in predictions]
            return predictions, normalize(self._raw(batch, class_index, layer)[1], self.size)
        logits, cam, features = self._raw(batch, class_index, layer)
        return self.classifier.predictions(logits, features), normalize(cam, self.size)

    def compiled_gradcam(
        self, batch: np.ndarray, class_index: int | Sequence[int] | None = None, layer: str | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``raw_gradcam`` by TensorFlow's gradient (forward and backward pass) whatever the head."""
        batch = self._check_batch(batch)
        layer = layer or self.target_layer
        self._check_layer(layer)
        return self._compiled(batch, self._class_vector(class_index, len(batch)), layer)

    def _compiled(self, batch: np.ndarray, classes: np.ndarray, layer: str) -> tuple[np.ndarray, np.ndarray]:
        import tensorflow as tf

        logits, maps = self._gradcam_fn(layer)(tf.constant(batch), tf.constant(classes))
        return np.asarray(logits, dtype=np.float64), np.asarray(maps, dtype=np.float32)

    def gradcam(
        self, batch: np.ndarray, class_index: int | Sequence[int] | None = None, layer: str | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Calibrated probabilities (N, C) and heatmaps float32 (N, S, S) in [0, 1] from one pass.

        ``class_index``: None (each image's top class), one index, or one per image.
        """
        logits, cam = self.raw_gradcam(batch, class_index, layer)
        return models.softmax(logits, self.classifier.card.temperature), normalize(cam, self.size)

    def warm_up(self, layer: str | None = None) -> None:
        """Run the first Grad-CAM now (engine warm-up or TF tracing: seconds for a DenseNet), not at first upload."""
        self.raw_gradcam(np.zeros((1, self.size, self.size, 3), np.float32), layer=layer)

    # --- tf-keras-vis methods ---------------------------------------------------------------
    def _visualizer(self, method: str) -> object:
        with self._build_lock:
            if method not in self._visualizers:
                from tf_keras_vis.gradcam_plus_plus import GradcamPlusPlus
                from tf_keras_vis.layercam import Layercam
                from tf_keras_vis.saliency import Saliency
                from tf_keras_vis.scorecam import Scorecam

                factory = {"gradcam++": GradcamPlusPlus, "scorecam": Scorecam, "layercam": Layercam,
                           "smoothgrad": Saliency}[method]
                self._visualizers[method] = factory(_QuietModel(self.model), clone=False)
            return self._visualizers[method]

    def explain(
        self, batch: np.ndarray, method: str = "gradcam", class_index: int | None = None, layer: str | None = None
    ) -> Explanation:
        """One image's heatmap by ``method`` (see METHODS) for ``class_index`` (None: top class)."""
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
        batch = self._check_batch(batch)
        if len(batch) != 1:
            raise ValueError(f"explain takes one image, got a batch of {len(batch)}")
        self._check_class(class_index)
        layer = layer or self.target_layer
        self._check_layer(layer)
        if method == "gradcam":
            logits, cam = self.raw_gradcam(batch, class_index, layer)
            index = int(np.argmax(logits[0])) if class_index is None else int(class_index)
            return Explanation(normalize(cam, self.size)[0], method, index, layer)
        if self.one_pass(method, layer):
            logits, features = self.classifier.forward(batch)
            index = int(np.argmax(logits[0])) if class_index is None else int(class_index)
            cam = cam_from_features(features, self.classifier.head, np.array([index]), positive=True)
            return Explanation(normalize(cam, self.size)[0], method, index, layer)
        index = int(np.argmax(self.classifier.logits(batch)[0])) if class_index is None else int(class_index)
        return Explanation(normalize(self.tf_keras_vis(batch, method, index, layer), self.size)[0], method, index,
                           None if method == "smoothgrad" else layer)

    def tf_keras_vis(self, batch: np.ndarray, method: str, index: int, layer: str) -> np.ndarray:
        """tf-keras-vis's raw map (1, h, w) (SmoothGrad: (1, S, S)) for one checked image and class."""
        from tf_keras_vis.utils.scores import CategoricalScore

        score = CategoricalScore(index)
        visualizer = self._visualizer(method)
        with self._run_lock:
            if method == "smoothgrad":
                return np.asarray(visualizer(score, batch, smooth_samples=SMOOTHGRAD_SAMPLES,
                                             smooth_noise=SMOOTHGRAD_NOISE, normalize_map=False))
            # seek_penultimate_conv_layer=False: otherwise tf-keras-vis replaces the layer by the
            # nearest Conv2D before it, which on DenseNet is a bottleneck conv, not the feature map.
            channels = int(self.model.get_layer(layer).output.shape[-1])
            options = {"max_N": min(SCORECAM_MAX_N, channels)} if method == "scorecam" else {}
            return np.asarray(visualizer(score, batch, penultimate_layer=layer, seek_penultimate_conv_layer=False,
                                         expand_cam=False, normalize_cam=False, **options))
