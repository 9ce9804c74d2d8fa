"""Pruning recurrent models (Conv1d front end -> GRU/LSTM -> Linear keyword spotters, trained a few steps): the convs
lose channels and the recurrent layer's input follows; its hidden size is pruned across every gate, layer and
direction, or kept and said why (a state input); the pruned model exports, quantizes to INT8, reloads from its
file; a GRUCell loop is a model error naming the layer."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import recurrent
from anyheads import write_case
from conftest import run_cli
from edgec.core.errors import ModelError
from edgec.modelio import LoadedModel, load_model
from edgec.prune import PruneConfig, prune_model

HERE = Path(__file__).resolve().parent
ARCH = f"{HERE / 'recurrent.py'}"


def _loaded(model):
    return LoadedModel(model.eval(), "checkpoint", "mem", arch="x", input_shape=(1, recurrent.SAMPLES))


@pytest.mark.parametrize("factory", [recurrent.gru, recurrent.gru2, recurrent.lstm, recurrent.bilstm2])
def test_dead_hidden_units_are_removed_exactly_across_every_gate(factory):
    """Half the hidden units of a trained model silenced (their rows in every gate of every layer, and the head's
    columns, zero): pruning removes exactly those, and the outputs do not change, so every gate's rows, the
    recurrent columns and the upper layers' input columns were cut at the same units."""
    model = recurrent.train(factory())
    h = model.rnn.hidden_size
    dead = torch.randperm(h, generator=torch.Generator().manual_seed(3))[:h // 2]
    gates = {nn.GRU: 3, nn.LSTM: 4}[type(model.rnn)]
    with torch.no_grad():
        for name, p in model.rnn.named_parameters():
            for g in range(gates):
                p[g * h + dead] = 0
        model.head.weight[:, dead] = 0
        if model.rnn.bidirectional:   # the output is [forward | backward]
            model.head.weight[:, dead + h] = 0
    x = torch.from_numpy(recurrent.keywords(64, seed=9)["audio"])
    with torch.no_grad():
        before = model(x)
    pruned, record = prune_model(_loaded(model), PruneConfig(ratio=0.5, ignore=("front",)))
    assert record["channels"]["rnn"] == {"hidden_size": [32, 16]} and record["recurrent"]["rnn"]["hidden"] == "pruned"
    assert pruned.head.in_features == 16 * (2 if model.rnn.bidirectional else 1)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), before, rtol=1e-4, atol=1e-5)


def test_a_state_input_keeps_the_hidden_size_and_says_why():
    import anymodels   # audio (N,T) + a GRU state (1,N,H) in, (probability, new state) out
    model = anymodels.audio_with_state().eval()
    loaded = LoadedModel(model, "checkpoint", "mem", arch="x")
    from edgec.data import Dataset
    from edgec.inputspec import declared_inputs
    data = Dataset({"audio": np.random.default_rng(0).standard_normal((8, 200)).astype(np.float32),
                    "state": np.zeros((1, 8, 16), np.float32)}, None, "mem")
    data.bind(declared_inputs(loaded))
    small, rec = prune_model(loaded, PruneConfig(ratio=0.5), data)
    assert rec["recurrent"]["gru"]["hidden"] == "kept" and "given an initial state" in rec["recurrent"]["gru"]["why"]
    out, state = small(torch.zeros(2, 200), torch.zeros(1, 2, 16))
    assert small.gru.input_size == 4 and state.shape == (1, 2, 16)


def test_a_cell_loop_is_a_model_error_naming_the_layer():
    with pytest.raises(ModelError, match=r"layer cell \(GRUCell\) holds weights it cannot resize"):
        prune_model(_loaded(recurrent.cell_loop()), PruneConfig(ratio=0.5))


@pytest.fixture(scope="module")
def spotter(tmp_path_factory):
    root = tmp_path_factory.mktemp("kws")
    write_case(root, recurrent.train(recurrent.gru()), recurrent.keywords, (("train.npz", 256, 2), ("val.npz", 200, 3)))
    return root


def test_cli_prunes_a_gru_spotter_which_exports_quantizes_and_reloads(spotter, tmp_path):
    arch = f"{ARCH}:gru"
    pruned = tmp_path / "pruned.pt"
    code, stdout, stderr = run_cli("prune", spotter / "model.pt", "--arch", arch, "--data", spotter / "train.npz",
                                   "--ratio", "0.5", "--dry-run")
    assert code == 0, stderr
    assert "root rnn: rnn (out_channels), head (in_channels)" in stdout, stdout   # the GRU's hidden group
    assert "recurrent layer rnn (GRU): hidden size pruned" in stdout and not pruned.exists()
    code, stdout, stderr = run_cli("prune", spotter / "model.pt", "--arch", arch, "--data", spotter / "train.npz",
                                   "--ratio", "0.5", "-o", pruned, "--json")
    assert code == 0, stderr
    r = json.loads(stdout)
    assert r["channels"]["rnn"] == {"input_size": [24, 12], "hidden_size": [32, 16]}
    assert r["params_after"] < 0.4 * r["params_before"]
    small = load_model(pruned, arch).module   # replayed from the file's structure record: GRU resized, weights in
    assert (small.rnn.input_size, small.rnn.hidden_size, small.rnn.weight_hh_l0.shape) == (12, 16, (48, 16))

    code, stdout, stderr = run_cli("build", pruned, "--arch", arch, "--data", spotter / "train.npz",
                                   "--eval-data", spotter / "val.npz", "--distill", "--epochs", "2",
                                   "--bench-seconds", "0", "-o", tmp_path / "kws.edgec", "--json")
    assert code == 0, stderr
    m = json.loads(stdout)
    evaluate = next(s for s in m["stages"] if s["name"] == "evaluate")["metrics"]
    assert evaluate["gate"]["passed"] and evaluate["int8_accuracy"] > 80, evaluate
    ops = m["quantization"]["ops"]["by_type"]   # ONNX Runtime has no INT8 GRU kernel: the GRU stays FP32
    assert ops["Conv"] == {"int8": 2, "float": 0} and ops["Gemm"] == {"int8": 1, "float": 0}
    assert ops["GRU"] == {"int8": 0, "float": 1}
    import onnxruntime as ort
    sess = ort.InferenceSession(str(tmp_path / "kws.edgec" / "model.onnx"), providers=["CPUExecutionProvider"])
    val = recurrent.keywords(64, seed=3)
    got = sess.run(None, {sess.get_inputs()[0].name: val["audio"]})[0]
    assert (got.argmax(1) == val["y"]).mean() > 0.8


def test_build_prunes_a_two_layer_bidirectional_lstm_into_int8(tmp_path):
    torch.save(recurrent.train(recurrent.bilstm2()).state_dict(), tmp_path / "model.pt")
    for name, n, seed in (("train.npz", 256, 2), ("val.npz", 200, 3)):
        np.savez(tmp_path / name, **recurrent.keywords(n, seed=seed))
    code, stdout, stderr = run_cli("build", tmp_path / "model.pt", "--arch", f"{ARCH}:bilstm2", "--data",
                                   tmp_path / "train.npz", "--eval-data", tmp_path / "val.npz", "--prune", "0.5",
                                   "--distill", "--epochs", "2", "--bench-seconds", "0", "-o", tmp_path / "k.edgec",
                                   "--json")
    assert code == 0, stderr
    m = json.loads(stdout)
    prune = next(s for s in m["stages"] if s["name"] == "prune")["metrics"]
    assert prune["recurrent"] == {"rnn": {"type": "LSTM", "hidden": "pruned"}}
    assert prune["params_after"] < 0.3 * prune["params_before"]
    assert m["quantization"]["ops"]["by_type"]["LSTM"] == {"int8": 2, "float": 0}   # both layers' weights INT8
    assert next(s for s in m["stages"] if s["name"] == "evaluate")["metrics"]["gate"]["passed"]
