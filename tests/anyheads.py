"""Small models for the CLI's any-task paths, as `--arch tests/anyheads.py:FACTORY` factories, and the real
(synthetic but learnable) data they are trained on: labels follow a fixed rule of the inputs, so a trained model
scores well and a broken INT8 copy does not."""
import numpy as np
import torch
from torch import nn

FEATURES, TAGS = 16, 5


class TagsAndValue(nn.Module):
    """forward(x (N,16) float) -> (tags: 5 sigmoid probabilities (N,5), value: 2 regression targets (N,2))."""

    def __init__(self, hidden: int = 64, wide: int = 256):
        super().__init__()
        # a narrow first layer next to wide ones: the FP32 fallback may keep it (a small share of the weights)
        self.body = nn.Sequential(nn.Linear(FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, wide), nn.ReLU(),
                                  nn.Linear(wide, hidden), nn.ReLU())
        self.tags, self.value = nn.Linear(hidden, TAGS), nn.Linear(hidden, 2)

    def forward(self, x):
        h = self.body(x)
        return torch.sigmoid(self.tags(h)), self.value(h)


class IdsMask(nn.Module):
    """forward(ids (N,L) int64, mask (N,L) int64) -> logits (N,3): embedding, masked mean, an MLP (prunable)."""

    def __init__(self, vocab: int = 40, d: int = 32, hidden: int = 64, classes: int = 3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, classes))

    def forward(self, ids, mask):
        m = mask.unsqueeze(-1).to(torch.float32)
        h = (self.emb(ids) * m).sum(1) / m.sum(1).clamp(min=1.0)
        return self.mlp(h)


def tags_and_value():
    torch.manual_seed(0)
    return TagsAndValue()


def ids_mask():
    torch.manual_seed(0)
    return IdsMask()


def tags_data(n: int, seed: int = 0) -> dict:
    """x and its labels: tag j is on when x_j > 0.3, the values are sum(x[:8]) and x_0 - x_1."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, FEATURES)).astype(np.float32)
    tags = (x[:, :TAGS] > 0.3).astype(np.float32)
    value = np.stack([x[:, :8].sum(1), x[:, 0] - x[:, 1]], 1).astype(np.float32)
    return {"x": x, "y:output_0": tags, "y:output_1": value}


def ids_data(n: int, seed: int = 0, length: int = 12) -> dict:
    """ids + mask and class labels: the class is the id range (0-12, 13-25, 26-39) most real tokens fall in."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 40, size=(n, length)).astype(np.int64)
    lengths = rng.integers(4, length + 1, size=n)
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int64)
    counts = np.stack([((ids // 13 == c) & (mask == 1)).sum(1) for c in range(3)], 1)
    y = counts.argmax(1).astype(np.int64)
    return {"ids": ids * mask, "mask": mask, "y": y}


def _fit(model: nn.Module, n: int, loss, steps: int) -> nn.Module:
    """A few hundred seeded Adam steps on random batches of 128 of the n samples; `loss(i)` of a batch's indices."""
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(steps):
        value = loss(torch.randint(0, n, (128,), generator=torch.Generator().manual_seed(step)))
        opt.zero_grad()
        value.backward()
        opt.step()
    return model.eval()


def train_tags(steps: int = 300) -> nn.Module:
    """TagsAndValue trained with BCE on tags, MSE on values."""
    model = tags_and_value()
    d = tags_data(2048, seed=1)
    x, tags, value = (torch.from_numpy(d[k]) for k in ("x", "y:output_0", "y:output_1"))

    def loss(i):
        p, v = model(x[i])
        return nn.functional.binary_cross_entropy(p, tags[i]) + nn.functional.mse_loss(v, value[i])
    return _fit(model, len(x), loss, steps)


def train_ids(steps: int = 300) -> nn.Module:
    model = ids_mask()
    d = ids_data(2048, seed=1)
    ids, mask, y = (torch.from_numpy(d[k]) for k in ("ids", "mask", "y"))
    return _fit(model, len(ids), lambda i: nn.functional.cross_entropy(model(ids[i], mask[i]), y[i]), steps)


def write_case(root, model: nn.Module, data, sizes) -> tuple:
    """The model's state_dict and one npz per (name, samples, seed) of `data(n, seed=)` under root: paths."""
    torch.save(model.state_dict(), root / "model.pt")
    paths = []
    for name, n, seed in sizes:
        with open(root / name, "wb") as f:
            np.savez(f, **data(n, seed=seed))
        paths.append(root / name)
    return root / "model.pt", *paths
