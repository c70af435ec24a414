"""Synthetic, labelled-as-synthetic training data for the example models.

Real market data arrives with the feature engine (issue 5). Until then the
examples train on a fixed-seed latent-factor process: correlated features, a
non-linear, interacting signal and noise, so that predicted probabilities
spread across (0, 1) with a realistic share near 0.5 — the rows where cheap
engines flip decisions. Every array is float32 and C-contiguous, as served.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
I8 = npt.NDArray[np.int8]

N_TABULAR_FEATURES = 48
SEQ_STEPS = 32
SEQ_FEATURES = 16


@dataclass(frozen=True)
class Split:
    """Train / validation (held-out, also calibration) / test rows."""

    x_train: F32
    y_train: I8
    x_valid: F32
    y_valid: I8


def _split(x: F32, y: I8, valid_share: float) -> Split:
    cut = int(len(x) * (1.0 - valid_share))
    return Split(x[:cut], y[:cut], x[cut:], y[cut:])


def tabular(
    n_rows: int = 40_000,
    n_features: int = N_TABULAR_FEATURES,
    *,
    seed: int = 7,
    valid_share: float = 0.25,
    classes: int = 2,
) -> Split:
    """Rows of ``n_features`` correlated features and a binary label.

    ``classes=3``: the same rows labelled 0/1/2 (down/flat/up) by the noisy
    signal's terciles instead of its sign (the multiclass benchmark's data).
    """
    rng = np.random.default_rng(seed)
    n_factors = 6
    loadings = rng.normal(size=(n_factors, n_features))
    factors = rng.normal(size=(n_rows, n_factors))
    x = factors @ loadings / np.sqrt(n_factors) + 0.6 * rng.normal(size=(n_rows, n_features))
    w = rng.normal(size=n_features) / np.sqrt(n_features)
    signal = (
        x @ w
        + 0.8 * np.tanh(x[:, 0] * x[:, 1])
        - 0.5 * (x[:, 2] > 0.3) * x[:, 3]
        + 0.3 * np.sin(2.0 * x[:, 4])
    )
    noisy = signal + 0.7 * rng.normal(size=n_rows)
    if classes == 3:
        y = np.digitize(noisy, np.quantile(noisy, [1 / 3, 2 / 3])).astype(np.int8)
    else:
        y = (noisy > 0).astype(np.int8)
    return _split(np.ascontiguousarray(x, dtype=np.float32), y, valid_share)


def sequences(
    n_seqs: int = 8_000,
    steps: int = SEQ_STEPS,
    n_features: int = SEQ_FEATURES,
    *,
    seed: int = 11,
    valid_share: float = 0.25,
) -> Split:
    """AR(1) feature paths ``[n, steps, n_features]`` and a label on their recent drift."""
    rng = np.random.default_rng(seed)
    phi = rng.uniform(0.5, 0.95, size=n_features)
    eps = rng.normal(size=(n_seqs, steps, n_features))
    x = np.empty_like(eps)
    x[:, 0] = eps[:, 0]
    for t in range(1, steps):  # offline data generation, not a serving path
        x[:, t] = phi * x[:, t - 1] + np.sqrt(1 - phi**2) * eps[:, t]
    w = rng.normal(size=n_features) / np.sqrt(n_features)
    recent = x[:, -8:].mean(axis=1) @ w
    trend = (x[:, -1] - x[:, 0]) @ w
    y = (recent + 0.5 * np.tanh(trend) + 0.4 * rng.normal(size=n_seqs) > 0).astype(np.int8)
    return _split(np.ascontiguousarray(x, dtype=np.float32), y, valid_share)
