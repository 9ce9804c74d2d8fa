"""FLOPs per sample: torch's counter, plus the gate matmuls of an LSTM, which it counts as 0 (GRU, RNN and cells it counts)."""
from __future__ import annotations

import torch
from torch import nn

from edgec.metrics import count_flops


class SpeakerEncoder(nn.Module):
    """Resemblyzer's shape: a 3-layer LSTM over (T, 40) mels, its last hidden state through a Linear."""

    def __init__(self):
        super().__init__()
        self.lstm, self.linear = nn.LSTM(40, 64, 3, batch_first=True), nn.Linear(64, 32)

    def forward(self, x):
        _, (h, _) = self.lstm(x)
        return self.linear(h[-1])


def test_lstm_and_gru_layers_count_their_gate_matmuls():
    linear = 2 * 64 * 32
    lstm = 160 * 2 * 4 * 64 * ((40 + 64) + 2 * (64 + 64))   # 160 steps, 3 layers
    assert count_flops(SpeakerEncoder(), (1, 160, 40)) == linear + lstm   # torch alone: the Linear's 4 kFLOPs
    gru = nn.GRU(8, 16, batch_first=True, bidirectional=True)
    assert count_flops(gru, (1, 10, 8)) == 10 * 2 * 2 * 3 * 16 * (8 + 16)   # 10 steps, 2 directions
    assert count_flops(nn.LSTMCell(8, 16), (1, 8)) == 2 * 4 * 16 * (8 + 16)
    conv = nn.Sequential(nn.Conv1d(1, 4, 3))   # nothing recurrent: torch's count, unchanged
    assert count_flops(conv, (1, 1, 10)) == 2 * 4 * 3 * 8
