"""The example PyTorch models: a tabular MLP and a sequence LSTM, trained on synthetic data.

They exist to exercise the neural path of the build end to end (torch source,
ONNX export, INT8 quantisation, TensorRT) on models shaped like the real ones:
48 features through 256-256 for the MLP, 32 steps of 16 features through a
64-unit LSTM. The sigmoid lives inside each module, so ``forward`` returns the
positive-class probability that the engine contract serves; training uses the
``logits`` method instead, for a numerically stable loss.

Training is fixed-seed and runs on one torch thread, so a rebuild reproduces
the same weights and each model trains in about 2-3 s on a 2-core CPU. One
thread, not two: measured on the shared 2-core hosts, two OpenMP threads next
to any other busy process made the MLP take 12-216 s instead of 2 (the threads
wait on each other whenever one is descheduled), while one thread stayed at 3 s.
"""

from __future__ import annotations

import torch
from torch import nn

from build_engines.examples.data import Split
from build_engines.sources.neural import torch_threads

_BATCH = 256
_LEARNING_RATE = 1e-3
_TRAIN_THREADS = 1


class MLP(nn.Module):
    """``n_features -> hidden -> hidden -> 1`` with ReLU, ending in a sigmoid."""

    def __init__(self, n_features: int, hidden: int = 256) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(n_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 1),
        )

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.body(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(x))


class SequenceLSTM(nn.Module):
    """One batch-first LSTM layer; its last hidden state goes through a linear head and sigmoid.

    Input ``[n, steps, n_features]``, output ``[n, 1]``. Exported with the
    TorchScript exporter this is a single ONNX ``LSTM`` op, which ONNX Runtime
    can quantise dynamically.
    """

    def __init__(self, n_features: int, hidden: int = 64) -> None:
        super().__init__()
        self.lstm = nn.LSTM(n_features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        _, (h_n, _) = self.lstm(x)
        out: torch.Tensor = self.head(h_n[-1])
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(x))


def _fit(module: MLP | SequenceLSTM, split: Split, *, seed: int, epochs: int) -> MLP | SequenceLSTM:
    """Adam on binary cross-entropy over the module's logits, fixed-seed shuffles."""
    x = torch.from_numpy(split.x_train)
    y = torch.from_numpy(split.y_train).to(torch.float32).reshape(-1, 1)
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam(module.parameters(), lr=_LEARNING_RATE)
    loss_fn = nn.BCEWithLogitsLoss()
    module.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), _BATCH):
            idx = order[start : start + _BATCH]
            optimiser.zero_grad()
            loss = loss_fn(module.logits(x[idx]), y[idx])
            loss.backward()
            optimiser.step()
    return module.eval()


def train_mlp(split: Split, *, seed: int = 7, epochs: int = 8, hidden: int = 256) -> nn.Module:
    """Train the example MLP on ``split`` (from :func:`~build_engines.examples.data.tabular`).

    Returns the module in eval mode; ``forward`` maps ``[n, n_features]`` to a
    probability ``[n, 1]``.
    """
    with torch_threads(_TRAIN_THREADS):
        torch.manual_seed(seed)
        module = MLP(split.x_train.shape[1], hidden)
        return _fit(module, split, seed=seed, epochs=epochs)


def train_lstm(split: Split, *, seed: int = 11, epochs: int = 10, hidden: int = 64) -> nn.Module:
    """Train the example LSTM on ``split`` (from :func:`~build_engines.examples.data.sequences`).

    Returns the module in eval mode; ``forward`` maps ``[n, steps, n_features]``
    to a probability ``[n, 1]``.
    """
    with torch_threads(_TRAIN_THREADS):
        torch.manual_seed(seed)
        module = SequenceLSTM(split.x_train.shape[2], hidden)
        return _fit(module, split, seed=seed, epochs=epochs)
