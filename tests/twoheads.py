"""A small detector with two heads, as `--arch tests/twoheads.py:detector[?width=N]`: a class (3 logits) and a box
(cx, cy, w, h in [0, 1]) for one bright rectangle on a noisy 16x16 image; the class is the rectangle's shape (wide,
tall, square). Real learnable data, labels on both outputs (`y:output_0` class ids, `y:output_1` boxes)."""
import numpy as np
import torch
from torch import nn

SIDE, CLASSES = 16, 3


class Detector(nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Flatten(), nn.Linear(2 * width * 16, 4 * width), nn.ReLU())
        self.cls, self.box = nn.Linear(4 * width, CLASSES), nn.Linear(4 * width, 4)

    def forward(self, image):
        h = self.body(image)
        return self.cls(h), torch.sigmoid(self.box(h))


def detector(width: int = 8):
    torch.manual_seed(0)
    return Detector(int(width))


def scenes(n: int, seed: int = 0) -> dict:
    g = np.random.default_rng(seed)
    y = g.integers(0, CLASSES, n)
    sizes = np.array([[9, 4], [4, 9], [6, 6]])[y] + g.integers(-1, 2, (n, 2))   # (w, h) by class
    x0 = g.integers(0, SIDE - sizes[:, 0] + 1)
    y0 = g.integers(0, SIDE - sizes[:, 1] + 1)
    img = 0.3 * g.standard_normal((n, 1, SIDE, SIDE)).astype(np.float32)
    for i in range(n):
        img[i, 0, y0[i]:y0[i] + sizes[i, 1], x0[i]:x0[i] + sizes[i, 0]] += 1.0
    box = np.stack([x0 + sizes[:, 0] / 2, y0 + sizes[:, 1] / 2, sizes[:, 0], sizes[:, 1]], 1) / SIDE
    return {"image": img, "y:output_0": y.astype(np.int64), "y:output_1": box.astype(np.float32)}


def train(model: nn.Module, steps: int = 150, n: int = 1024) -> nn.Module:
    d = scenes(n, seed=1)
    x, y, box = (torch.from_numpy(d[k]) for k in ("image", "y:output_0", "y:output_1"))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        i = torch.randint(0, n, (32,), generator=g)
        logits, b = model(x[i])
        loss = nn.functional.cross_entropy(logits, y[i]) + 10 * nn.functional.mse_loss(b, box[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def scores(model: nn.Module, d: dict) -> tuple[float, float]:
    """(class accuracy, box mean absolute error) on scenes `d`."""
    with torch.no_grad():
        logits, box = model(torch.from_numpy(d["image"]))
    return (float((logits.argmax(1).numpy() == d["y:output_0"]).mean()),
            float(np.abs(box.numpy() - d["y:output_1"]).mean()))
