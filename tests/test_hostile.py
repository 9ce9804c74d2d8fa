"""Hostile and careless inputs not covered elsewhere (test_user_errors, test_modelio, test_package): each is one
`edgec: error:` line with the documented exit code, nothing written, nothing read from outside the model's folder.

Each row was an internal error, a second (ORT log) line, a silent wrong result or a read outside the package
before."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from conftest import copy_package, run_cli
from edgec.core.errors import ort_cause


def _errors(stderr):
    return [line for line in stderr.splitlines() if not line.startswith("[edgec]")]


def _one_line(code, stderr, want_code, *words):
    errors = _errors(stderr)
    assert code == want_code, stderr
    assert len(errors) == 1 and errors[0].startswith("edgec: error: "), stderr
    for word in words:
        assert word in errors[0], stderr
    assert "internal error" not in stderr and "Traceback" not in stderr


def _save(graph, path, opsets=(("", 17),)):
    import onnx
    from onnx import helper
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _gemm_with_external_weight(path, location):
    """x[N,8] -> Gemm with a weight whose bytes live in an external file at `location`."""
    from onnx import TensorProto, helper, numpy_helper
    w = numpy_helper.from_array(np.ones((10, 8), np.float32), "w")
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(320))):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    vi = helper.make_tensor_value_info
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)], "g",
                              [vi("x", TensorProto.FLOAT, ["N", 8])], [vi("y", TensorProto.FLOAT, ["N", 10])], [w])
    return _save(graph, path)


@pytest.fixture()
def outside(tmp_path):
    """A secret next to (not inside) the model's folder, and three models that point at it."""
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(80, dtype=np.float32).tobytes())
    models = tmp_path / "models"
    models.mkdir()
    os.symlink(secret, models / "w.bin")
    return {"absolute": _gemm_with_external_weight(models / "abs.onnx", str(secret)),
            "dotdot": _gemm_with_external_weight(models / "up.onnx", "../secret.bin"),
            "symlink": _gemm_with_external_weight(models / "link.onnx", "w.bin"),
            "data": _npz(tmp_path / "x.npz", x=np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32))}


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink"])
def test_external_data_outside_the_models_folder_is_refused(outside, tmp_path, kind):
    model = outside[kind]
    code, _, err = run_cli("bench", model, "--runs", "3", "--no-inspect")
    _one_line(code, err, 3, "external data only from regular files inside the model's folder")
    out = tmp_path / "q.onnx"
    code, _, err = run_cli("quantize", model, "--data", outside["data"], "-o", out)
    _one_line(code, err, 3, "inside the model's folder")
    assert not out.exists()


def test_custom_domain_op_names_the_domain(tmp_path):
    from onnx import TensorProto, helper
    vi = helper.make_tensor_value_info
    graph = helper.make_graph([helper.make_node("Evil", ["x"], ["y"], domain="com.evil")], "g",
                              [vi("x", TensorProto.FLOAT, ["N", 4])], [vi("y", TensorProto.FLOAT, ["N", 4])])
    model = _save(graph, tmp_path / "custom.onnx", (("", 17), ("com.evil", 1)))
    code, _, err = run_cli("bench", model, "--runs", "3")
    _one_line(code, err, 3, "com.evil:Evil", "custom domain", "loads no custom-op library")


def test_a_model_without_outputs_or_inputs(tmp_path):
    from onnx import TensorProto, helper, numpy_helper
    vi = helper.make_tensor_value_info
    no_out = _save(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                                     [vi("x", TensorProto.FLOAT, ["N", 8])], []), tmp_path / "noout.onnx")
    const = numpy_helper.from_array(np.ones((1, 8), np.float32), "c")
    no_in = _save(helper.make_graph([helper.make_node("Relu", ["c"], ["y"])], "g", [],
                                    [vi("y", TensorProto.FLOAT, [1, 8])], [const]), tmp_path / "noin.onnx")
    data = _npz(tmp_path / "x.npz", x=np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32))
    code, _, err = run_cli("bench", no_out, "--runs", "3")
    _one_line(code, err, 3, "declares no outputs")
    for model, word in ((no_out, "no outputs"), (no_in, "no inputs")):
        code, _, err = run_cli("quantize", model, "--data", data, "-o", tmp_path / "q.onnx")
        _one_line(code, err, 3, word)   # was an internal error (ORT: "At least one output should be requested")
    assert not (tmp_path / "q.onnx").exists()


# ---------------------------------------------------------------- token ids past the vocabulary

def _embedding_onnx(path, vocab=100):
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(
        [helper.make_node("Gather", ["emb", "ids"], ["e"]),
         helper.make_node("ReduceMean", ["e"], ["m"], axes=[1], keepdims=0),
         helper.make_node("MatMul", ["m", "fw"], ["y"])], "g",
        [vi("ids", TensorProto.INT64, ["N", 16])], [vi("y", TensorProto.FLOAT, ["N", 5])],
        [numpy_helper.from_array(rng.random((vocab, 8)).astype(np.float32), "emb"),
         numpy_helper.from_array(rng.random((8, 5)).astype(np.float32), "fw")])
    return _save(graph, path)


def _ids(path, bad_row=40, vocab=100):
    ids = np.random.default_rng(1).integers(0, vocab, (64, 16))
    ids[bad_row, 3] = 50 * vocab   # the first samples are fine: only a later batch meets it
    return _npz(path, ids=ids)


def test_token_ids_past_the_vocabulary_in_a_later_sample(tmp_path):
    model, bad = _embedding_onnx(tmp_path / "emb.onnx"), _ids(tmp_path / "ids.npz")
    good = _npz(tmp_path / "good.npz", ids=np.random.default_rng(2).integers(0, 100, (64, 16)))
    out = tmp_path / "q.onnx"
    for args in (["--data", bad], ["--data", good, "--eval-data", bad]):   # in calibration, then in the check
        code, _, err = run_cli("quantize", model, *args, "-o", out, "--fallback-seconds", "0")
        _one_line(code, err, 4, "Gather node", "idx=5000", "token ids within its vocabulary")
        assert "ONNXRuntimeError" not in err and "onnxruntime" not in err   # no ORT log line before it
        assert not out.exists()


def test_token_ids_past_the_vocabulary_in_the_export_check(tmp_path):
    (tmp_path / "net.py").write_text(
        "from torch import nn\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__(); self.emb = nn.Embedding(100, 8); self.fc = nn.Linear(8, 5)\n"
        "    def forward(self, ids):\n"
        "        return self.fc(self.emb(ids).mean(1))\n"
        "def build():\n    return Net()\n")
    import torch
    from edgec.modelio import build_arch
    arch = f"{tmp_path / 'net.py'}:build"
    torch.save(build_arch(arch).state_dict(), tmp_path / "sd.pt")
    out = tmp_path / "m.onnx"
    code, _, err = run_cli("export", tmp_path / "sd.pt", "--arch", arch, "--data", _ids(tmp_path / "ids.npz"),
                           "-o", out)
    _one_line(code, err, 4, "idx=5000", "vocabulary")
    assert not out.exists()


def test_the_torch_side_of_the_export_check_refusing_data_is_a_data_error():
    import torch
    from edgec.core.errors import DataError
    from edgec.exporters.onnx_export import _torch_on_data
    with pytest.raises(DataError, match="index out of range"):
        _torch_on_data(torch.nn.Embedding(10, 4), [np.array([[3, 99]])])


# ---------------------------------------------------------------- quantize checks labels as build does

@pytest.mark.parametrize("extra", [[], ["--task", "classify"], ["--label-output", "output"]])
def test_quantize_refuses_labels_outside_the_classes_before_any_work(tmp_path, extra):
    # were silently unused (no accuracy figure) or, with --label-output, blamed on a task "none"
    import sys
    sys.path.insert(0, os.path.dirname(__file__))
    from test_runtime_fixtures import make_conv_model
    model = make_conv_model(tmp_path / "m.onnx", hw=(8, 8))
    import onnx
    proto = onnx.load(str(model))
    proto.graph.output[0].name = proto.graph.node[-1].output[0] = "output"
    onnx.save(proto, str(model))
    x = np.random.default_rng(0).random((64, 3, 8, 8)).astype(np.float32)
    data = _npz(tmp_path / "d.npz", x=x, y=np.full(64, -1))
    out = tmp_path / "q.onnx"
    code, _, err = run_cli("quantize", model, "--data", data, "-o", out, *extra)
    _one_line(code, err, 4, "ids span -1..-1 for 10 columns")
    assert not out.exists() and "calibrat" not in err   # before calibration started


# ---------------------------------------------------------------- a package's model.onnx is its own

def test_bench_refuses_a_package_whose_model_is_a_symlink_or_swapped(built_package, tmp_path):
    secret = tmp_path / "elsewhere.onnx"
    shutil.copy(built_package[0] / "model.fp32.onnx", secret)
    linked = copy_package(built_package[0], tmp_path / "linked.edgec")
    (linked / "model.onnx").unlink()
    os.symlink(secret, linked / "model.onnx")
    code, _, err = run_cli("bench", linked, "--runs", "3", "--no-inspect")
    _one_line(code, err, 3, "model.onnx is a symlink", "a package holds its own files only")
    swapped = copy_package(built_package[0], tmp_path / "swapped.edgec")
    shutil.copy(secret, swapped / "model.onnx")
    manifest = (swapped / "manifest.json").read_bytes()
    code, _, err = run_cli("bench", swapped, "--runs", "3", "--no-inspect", "--record")
    _one_line(code, err, 3, "does not match its manifest", "edgec verify")
    assert (swapped / "manifest.json").read_bytes() == manifest   # --record wrote nothing for the wrong model
    good = copy_package(built_package[0], tmp_path / "good.edgec")
    assert run_cli("bench", good, "--runs", "3", "--no-inspect")[0] == 0


def test_ort_cause_keeps_the_reason_only():
    cases = {
        "[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running ConstantOfShape node. "
        "Name:'' Status Message: /onnxruntime_src/onnxruntime/core/framework/bfc_arena.cc:360 void* "
        "onnxruntime::BFCArena::AllocateRawInternal(size_t, bool, onnxruntime::Stream*) Failed to allocate memory "
        "for requested buffer of size 40000000000\n":
            "ConstantOfShape node (unnamed): Failed to allocate memory for requested buffer of size 40000000000",
        "[ONNXRuntimeError] : 1 : FAIL : tensorprotoutils.cc:1708 ValidateEmbeddedTensorProtoDataSizeAndShape "
        "Initializer 'w' declares a size of 4 bytes":
            "Initializer 'w' declares a size of 4 bytes",
        "[ONNXRuntimeError] : 1 : FAIL : Load model from /m.onnx failed:This is an invalid model. Error: the graph "
        "is not acyclic.": "This is an invalid model. Error: the graph is not acyclic.",
    }
    for text, want in cases.items():
        assert ort_cause(RuntimeError(text)) == want
    assert ort_cause(RuntimeError("")) == "RuntimeError"
    assert json.dumps(ort_cause(RuntimeError("a\nb"))) == '"a b"'
