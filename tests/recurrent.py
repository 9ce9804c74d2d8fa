"""Small recurrent keyword spotters, as `--arch tests/recurrent.py:FACTORY` factories: a Conv1d front end on (N, T)
audio, a GRU or LSTM (one layer, two layers, bidirectional), a Linear classifier on the last step; a GRUCell loop
that cannot be pruned; and synthetic "keywords" (a tone burst whose pitch band is the class) to train them on."""
import numpy as np
import torch
from torch import nn

SAMPLES, CLASSES = 160, 4


class Spotter(nn.Module):
    def __init__(self, cell: str = "gru", layers: int = 1, bidirectional: bool = False, hidden: int = 32):
        super().__init__()
        self.front = nn.Sequential(nn.Conv1d(1, 16, 9, stride=4), nn.BatchNorm1d(16), nn.ReLU(),
                                   nn.Conv1d(16, 24, 5, stride=2), nn.ReLU())
        self.rnn = (nn.GRU if cell == "gru" else nn.LSTM)(24, hidden, num_layers=layers, batch_first=True,
                                                          bidirectional=bidirectional)
        self.head = nn.Linear(hidden * (2 if bidirectional else 1), CLASSES)

    def forward(self, audio):
        out, _ = self.rnn(self.front(audio.unsqueeze(1)).transpose(1, 2))
        return self.head(out[:, -1])


class CellLoop(nn.Module):
    """The same spotter stepping a GRUCell in Python: not one layer torch-pruning (or edgec) can resize."""

    def __init__(self, hidden: int = 32):
        super().__init__()
        self.front, self.cell = nn.Conv1d(1, 16, 9, stride=8), nn.GRUCell(16, hidden)
        self.head = nn.Linear(hidden, CLASSES)

    def forward(self, audio):
        f = torch.relu(self.front(audio.unsqueeze(1)))
        h = f.new_zeros(len(audio), self.cell.hidden_size)
        for t in range(f.shape[2]):
            h = self.cell(f[:, :, t], h)
        return self.head(h)


def gru():
    torch.manual_seed(0)
    return Spotter("gru")


def gru2():
    torch.manual_seed(0)
    return Spotter("gru", layers=2)


def bilstm2():
    torch.manual_seed(0)
    return Spotter("lstm", layers=2, bidirectional=True)


def lstm():
    torch.manual_seed(0)
    return Spotter("lstm")


def cell_loop():
    torch.manual_seed(0)
    return CellLoop()


def keywords(n: int, seed: int = 0) -> dict:
    """{"audio": (n, 160) float32, "y": class ids}: a tone whose pitch band is the class, random phase, in noise."""
    g = np.random.default_rng(seed)
    y = g.integers(0, CLASSES, n)
    t = np.arange(SAMPLES, dtype=np.float32)
    freq = (0.02 + 0.05 * y + g.uniform(0, 0.02, n))[:, None]
    audio = np.sin(2 * np.pi * freq * t + g.uniform(0, 6.3, (n, 1))) + 0.3 * g.standard_normal((n, SAMPLES))
    return {"audio": audio.astype(np.float32), "y": y.astype(np.int64)}


def train(model: nn.Module, steps: int = 60, n: int = 512) -> nn.Module:
    """A few Adam steps on fresh keywords: enough for well above chance, and weights that are not random."""
    data = keywords(n, seed=1)
    x, y = torch.from_numpy(data["audio"]), torch.from_numpy(data["y"])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, n, (32,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def accuracy(model: nn.Module, data: dict) -> float:
    with torch.no_grad():
        return float((model(torch.from_numpy(data["audio"])).argmax(1).numpy() == data["y"]).mean())
