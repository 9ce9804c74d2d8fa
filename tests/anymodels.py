"""Small models that are not image classifiers, as `--arch tests/anymodels.py:FACTORY` factories: audio with a
recurrent state that carries the batch on axis 1, a token-ids + mask transformer, and a plain (N,T) model."""
import math

import torch
from torch import nn


class AudioWithState(nn.Module):
    """forward(audio (N,T) float, state (1,N,H) float) -> (speech probability (N,1), new state (1,N,H))."""

    def __init__(self, hidden: int = 16):
        super().__init__()
        self.frame = nn.Conv1d(1, 8, 8, stride=4)
        self.gru = nn.GRU(8, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, audio, state):
        f = torch.relu(self.frame(audio.unsqueeze(1))).transpose(1, 2)
        out, new_state = self.gru(f, state)
        return torch.sigmoid(self.head(out[:, -1])), new_state


class Attention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads, self.qkv, self.out = heads, nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, h, bias):
        n, t, d = h.shape
        q, k, v = self.qkv(self.norm1(h)).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(d // self.heads) + bias
        h = h + self.out((att.softmax(-1) @ v).transpose(1, 2).reshape(n, t, d))
        return h + self.ff(self.norm2(h))


class TinyText(nn.Module):
    """forward(ids (N,L) int64, mask (N,L) int64) -> logits (N, classes): a few pre-norm attention layers."""

    def __init__(self, vocab: int = 50, d: int = 32, layers: int = 2, classes: int = 3, max_len: int = 32):
        super().__init__()
        self.emb, self.pos = nn.Embedding(vocab, d), nn.Parameter(torch.randn(1, max_len, d) * 0.02)
        self.layers = nn.ModuleList(Attention(d, 4) for _ in range(layers))
        self.head = nn.Linear(d, classes)

    def forward(self, ids, mask):
        h = self.emb(ids) + self.pos[:, :ids.shape[1]]
        bias = (1.0 - mask[:, None, None, :].to(h.dtype)) * -1e4
        for layer in self.layers:
            h = layer(h, bias)
        m = mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1).clamp(min=1.0))


class Waveform(nn.Module):
    """forward(x (N,T) float) -> logits (N, classes)."""

    def __init__(self, classes: int = 2):
        super().__init__()
        self.body = nn.Sequential(nn.Conv1d(1, 8, 9, stride=2), nn.ReLU(), nn.Conv1d(8, 16, 9, stride=2), nn.ReLU(),
                                  nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(16, classes))

    def forward(self, x):
        return self.body(x.unsqueeze(1))


def audio_with_state():
    torch.manual_seed(0)
    return AudioWithState()


def tiny_text():
    torch.manual_seed(0)
    return TinyText()


def waveform():
    torch.manual_seed(0)
    return Waveform()
