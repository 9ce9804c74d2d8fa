"""Small models of every output kind on the embedded digits, really trained in seconds: the subjects of the
per-output checks (tests/test_metrics.py, benchmarks/sqnr_threshold.py).

  classify    10 logits
  score       the digit's value, one column (a regression)
  multi       two outputs: 4 quadrant intensities (regression) and 10 logits; labels belong to the second
  multilabel  4 sigmoid probabilities: even, >= 5, prime, has a loop (0, 6, 8, 9)
  embed       32-D unit vectors (trained through a classifier head that is not exported)
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

KINDS = ("classify", "score", "multi", "multilabel", "embed")
_ATTRIBUTES = np.array([[d % 2 == 0, d >= 5, d in (2, 3, 5, 7), d in (0, 6, 8, 9)] for d in range(10)], np.float32)


class KindNet(nn.Module):
    def __init__(self, kind: str, width: int = 16):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; one of {KINDS}")
        self.kind = kind
        self.trunk = nn.Sequential(  # the digits are 8x8 images upsampled to 32x32: pool back first (fast)
            nn.AvgPool2d(4), nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
            nn.Linear(2 * width * 16, 64), nn.ReLU())
        heads = {"classify": 10, "score": 1, "multi": 10, "multilabel": 4, "embed": 32}
        self.head = nn.Linear(64, heads[kind])
        if kind == "multi":
            self.box = nn.Linear(64, 4)
        if kind == "embed":
            self.classifier = nn.Linear(32, 10)

    def forward(self, x):
        h = self.trunk(x)
        out = self.head(h)
        if self.kind == "multi":
            return self.box(h), out
        if self.kind == "multilabel":
            return torch.sigmoid(out)
        if self.kind == "embed":
            return F.normalize(out, dim=1)
        if self.kind == "score":
            return out * 3 + 4.5  # the digit's value, trained standardized
        return out

    def loss(self, x, y):
        h = self.trunk(x)
        out = self.head(h)
        if self.kind == "classify":
            return F.cross_entropy(out, y)
        if self.kind == "score":
            return F.mse_loss(out[:, 0], (y.float() - 4.5) / 3)
        if self.kind == "multi":
            quadrants = F.adaptive_avg_pool2d(x.mean(1, keepdim=True), 2).flatten(1)
            return F.cross_entropy(out, y) + 10 * F.mse_loss(self.box(h), quadrants)
        if self.kind == "multilabel":
            return F.binary_cross_entropy_with_logits(out, torch.from_numpy(_ATTRIBUTES)[y])
        return F.cross_entropy(self.classifier(F.normalize(out, dim=1)) * 10, y)


def train_kind(kind: str, x: np.ndarray, y: np.ndarray, epochs: int = 8, seed: int = 0) -> KindNet:
    """Adam, batch 32, a few epochs: well under a second per epoch on the digits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: more threads only add contention (2 threads were 6x slower here)
    try:
        return _train(kind, x, y, epochs, seed)
    finally:
        torch.set_num_threads(threads)


def _train(kind, x, y, epochs, seed) -> KindNet:
    torch.manual_seed(seed)
    model = KindNet(kind)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(np.asarray(x, np.float32)), torch.from_numpy(np.asarray(y, np.int64))
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=g).split(32):
            opt.zero_grad()
            model.loss(xt[idx], yt[idx]).backward()
            opt.step()
    return model.eval()
