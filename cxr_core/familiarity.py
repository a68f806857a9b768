"""The familiarity check: is this film like the films the model was trained on?

A classifier gives confident probabilities for anything, including a film from a scanner, a
hospital or a patient group it never saw. This module measures how far a film's penultimate
features (the global-average-pooled target-layer map, the vector the ``logits`` layer reads)
lie from the training films' features, and flags a film past a threshold fitted on the
validation split.

Model: class-conditional Gaussians with one shared covariance (the Mahalanobis detector of
Lee et al., NeurIPS 2018), estimated as probabilistic PCA so that it stays small and
well-conditioned with ~1,700-dimensional features and a few thousand films: the top ``k``
principal directions of the within-class scatter keep their own variances, the remaining
directions share their mean variance. The distance of a film is the smallest over classes of

    d^2(x) = sum_i (u_i . (x - mu_c))^2 / lambda_i  +  |residual of x - mu_c outside span(u)|^2 / sigma^2

reported as ``sqrt(d^2 / D)`` (D = feature dimension), so that a typical training film sits
near 1 whatever the architecture. Cost per film: one (D x k) product, well under a millisecond.

The fitted model is ``familiarity.npz`` in the model folder; the card's ``familiarity`` entry
holds its sha256 (checked on load, like the weights), the threshold and how it was fitted.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FILE = "familiarity.npz"
COMPONENTS = 256  # principal directions kept with their own variance (fewer when there are fewer films)
PERCENTILE = 99.0  # of the validation distances: the default threshold (about 1 % of in-distribution films flagged)
WARNING = "Unlike the films this model was trained on: treat the result as unreliable."


@dataclass(frozen=True)
class Familiarity:
    """A fitted familiarity model: class means (C, D), directions (D, k), their variances (k,), residual variance."""

    means: np.ndarray
    components: np.ndarray
    variances: np.ndarray
    residual_variance: float
    threshold: float = float("inf")

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    def distance(self, features: np.ndarray) -> np.ndarray:
        """Distances (N,) float64 of pooled features (N, D); smaller is more familiar (~1 for training films).

        Non-finite features give +inf (never familiar).
        """
        x = np.asarray(features, dtype=np.float64)
        if x.ndim == 1:
            x = x[None]
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected features (N, {self.dim}), got shape {x.shape}")
        best = np.full(len(x), np.inf)
        for mu in self.means:
            centred = x - mu
            proj = centred @ self.components  # (N, k)
            inside = (proj**2 / self.variances).sum(axis=1)
            residual = (centred**2).sum(axis=1) - (proj**2).sum(axis=1)
            d2 = inside + np.maximum(residual, 0.0) / self.residual_variance
            best = np.minimum(best, d2)
        out = np.sqrt(best / self.dim)
        out[~np.isfinite(x).all(axis=1)] = np.inf
        return out

    def flags(self, distances: np.ndarray) -> np.ndarray:
        """True where a distance is past the threshold (unfamiliar), bool (N,)."""
        d = np.asarray(distances, dtype=np.float64)
        return ~(d <= self.threshold) | ~np.isfinite(d)

    def with_threshold(self, threshold: float) -> Familiarity:
        return Familiarity(self.means, self.components, self.variances, self.residual_variance, float(threshold))

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, means=self.means.astype(np.float32), components=self.components.astype(np.float32),
                 variances=self.variances.astype(np.float64), residual_variance=np.float64(self.residual_variance),
                 threshold=np.float64(self.threshold))
        return buffer.getvalue()


def fit(features: np.ndarray, labels: np.ndarray, components: int = COMPONENTS) -> Familiarity:
    """Fit on the training split's pooled features (N, D) float and int labels (N,); no threshold yet."""
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels).astype(int)
    if x.ndim != 2 or len(x) != len(y) or len(x) < 3:
        raise ValueError(f"need features (N, D) with N >= 3 matching labels, got {x.shape} and {y.shape}")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or inf")
    classes = np.unique(y)
    if len(x) - len(classes) < 2:  # the within-class scatter needs two films more than classes
        raise ValueError(f"need at least {len(classes) + 2} training films for {len(classes)} classes, got {len(x)}")
    means = np.stack([x[y == c].mean(axis=0) for c in classes])
    centred = x - means[np.searchsorted(classes, y)]
    n, d = centred.shape
    k = int(min(components, d - 1, n - len(classes) - 1))
    # Eigen-decomposition of the within-class scatter through an SVD of the centred data.
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    eig = s**2 / max(n - len(classes), 1)
    floor = max(float(eig[0]) * 1e-6, 1e-12)
    variances = np.maximum(eig[:k], floor)
    rest = eig[k:]
    tail = d - k  # directions beyond the SVD's rank have zero scatter; they share the residual variance too
    residual = float(rest.sum() / tail) if tail > 0 else floor
    return Familiarity(means, vt[:k].T.copy(), variances, max(residual, floor))


def calibrate(model: Familiarity, val_features: np.ndarray, percentile: float = PERCENTILE) -> Familiarity:
    """Set the threshold at ``percentile`` of the validation films' distances."""
    dist = model.distance(val_features)
    finite = dist[np.isfinite(dist)]
    if not len(finite):
        raise ValueError("no finite validation distance to set the familiarity threshold on")
    return model.with_threshold(float(np.percentile(finite, percentile)))


def save(model: Familiarity, folder: str | Path) -> Path:
    path = Path(folder) / FILE
    path.write_bytes(model.to_bytes())
    return path


# A DenseNet169's model is ~1.7 MB (2 x 1664 means, 1664 x 256 directions); 256 MB leaves room for any sane
# architecture while a forged file that would inflate to gigabytes is refused before it is read.
MAX_BYTES = 256 * 1024 * 1024


def load(path: str | Path) -> Familiarity:
    """Read a ``familiarity.npz``: numbers only (no pickled objects), sizes bounded and shapes consistent.

    Raises ValueError naming what is wrong with the file.
    """
    import zipfile

    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            inflated = sum(member.file_size for member in archive.infolist())
    except zipfile.BadZipFile as exc:
        raise ValueError(f"{path.name} is not a familiarity file (not an .npz archive)") from exc
    if inflated > MAX_BYTES:
        raise ValueError(f"{path.name} would take {inflated / 2**20:.0f} MB (at most {MAX_BYTES // 2**20} MB)")
    with np.load(path, allow_pickle=False) as data:
        model = Familiarity(data["means"].astype(np.float64), data["components"].astype(np.float64),
                            data["variances"].astype(np.float64), float(data["residual_variance"]),
                            float(data["threshold"]))
    m, u, v = model.means, model.components, model.variances
    if m.ndim != 2 or u.ndim != 2 or v.ndim != 1 or u.shape != (m.shape[1], v.shape[0]) or not len(m):
        raise ValueError(f"{path.name} has inconsistent shapes: means {m.shape}, components {u.shape}, "
                         f"variances {v.shape}")
    numbers = np.concatenate([m.ravel(), u.ravel(), v, [model.residual_variance, model.threshold]])
    if not np.isfinite(numbers).all() or (v <= 0).any() or model.residual_variance <= 0 or model.threshold <= 0:
        raise ValueError(f"{path.name} holds non-finite or non-positive variances or threshold")
    return model


def rates(flags: np.ndarray, groups: list[str] | np.ndarray | None = None) -> dict:
    """Flag rate overall and per group (e.g. per source): {"n", "flagged", "rate", "by_group": {...}}."""
    f = np.asarray(flags, dtype=bool)
    out = {"n": int(f.size), "flagged": int(f.sum()), "rate": float(f.mean()) if f.size else None}
    if groups is not None:
        g = np.asarray([str(v) for v in groups])  # a missing source (None) is a group of its own, not a TypeError
        out["by_group"] = {name: {"n": int((g == name).sum()), "flagged": int(f[g == name].sum()),
                                  "rate": float(f[g == name].mean())} for name in sorted(set(g.tolist()))}
    return out
