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


# ---------------------------------------------------------------- model files: nothing runs, one line

class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_PICKLE",))


def test_hostile_pickles_in_other_wrappers_never_run(tmp_path, monkeypatch):
    import pickle
    import warnings
    import zipfile

    import torch
    monkeypatch.chdir(tmp_path)
    with open("plain.pt", "wb") as f:   # a bare pickle stream (protocol 4), not a torch archive
        pickle.dump({"w": _Evil()}, f, protocol=4)
    torch.save({"w": _Evil()}, "legacy.pt", _use_new_zipfile_serialization=False)

    class Twice(torch.nn.Module):
        def forward(self, x):
            return x * 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(Twice()), "ts.pt", _extra_files={"evil.pkl": pickle.dumps(_Evil())})
    with zipfile.ZipFile("ts.pt") as zin, zipfile.ZipFile("ts_evil.pt", "w") as zout:
        for info in zin.infolist():   # TorchScript's data.pkl and constants.pkl replaced by a hostile pickle
            hostile = info.filename.endswith(("/data.pkl", "/constants.pkl"))
            zout.writestr(info, pickle.dumps(_Evil(), protocol=2) if hostile else zin.read(info.filename))
    for name, word in (("plain.pt", "not a PyTorch model file"), ("legacy.pt", "--trust-pickle"),
                       ("ts_evil.pt", "Unknown type name 'posix.system'")):
        code, _, err = run_cli("export", name, "--input-shape", "1,3,8,8", "-o", "o.onnx")
        _one_line(code, err, 3, word)   # torch's UserWarning/FutureWarning lines no longer come first
        assert not (tmp_path / "PWNED_BY_PICKLE").exists() and not (tmp_path / "o.onnx").exists()
    assert run_cli("export", "ts.pt", "--input-shape", "1,3,8,8", "-o", "o.onnx")[0] == 0   # extra files unread


# ---------------------------------------------------------------- .npz files that lie about their arrays

def _npz_member(path, member: bytes, name="x.npy", compress=False):
    import zipfile
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as z:
        z.writestr(name, member)
    return path


def _header(shape, descr="<f4"):
    import io
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


@pytest.mark.parametrize("make,word", [
    (lambda p: _npz_member(p, _header((10 ** 9, 3, 32, 32)) + bytes(64)), "declares shape (1000000000, 3, 32, 32)"),
    (lambda p: _npz_member(p, _header((10 ** 9, 3, 32, 32)) + bytes(64), compress=True), "holds 64 bytes"),
    (lambda p: _npz_member(p, _header((64, 3, 8, 8)) + bytes(64)), "truncated or corrupt"),
    (lambda p: _npz_member(p, _header((-64, 3, 8, 8)) + bytes(64)), "declares shape (-64, 3, 8, 8)"),
    (lambda p: _npz_member(p, _header((2 ** 62, 2 ** 62)) + bytes(64)), "truncated or corrupt"),
    (lambda p: _npz_member(p, b"hello", name="readme.txt"), "'readme.txt', which is not a numpy array"),
    (lambda p: np.savez(p, **{f"a{i}": np.zeros(1) for i in range(300)}), "holds 300 arrays"),
    (lambda p: np.savez(p, y=np.zeros(64, np.int64)), "has only labels (y), no inputs"),
])
def test_npz_that_lies_is_one_data_error(tmp_path, tiny_onnx, make, word):
    data = tmp_path / "d.npz"
    make(data)
    out = tmp_path / "q.onnx"
    code, _, err = run_cli("quantize", tiny_onnx, "--data", data, "-o", out)
    _one_line(code, err, 4, word)
    assert not out.exists()


def test_huge_finite_values_give_no_numpy_warning(tiny_onnx, tmp_path):
    from edgec.exporters.calibration import check_samples
    import warnings
    x = np.random.default_rng(0).random((32, 3, 16, 16)).astype(np.float32) * 1e30
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # was "overflow encountered in square" from a float32 std
        assert np.isfinite(check_samples(x, 32).std)


# ---------------------------------------------------------------- outputs that cannot be written

@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
def test_an_output_where_nothing_can_be_created(tmp_path):
    # access() says yes to root in /proc; the temporary's creation is what fails: one line, before any work
    from conftest import SMALL_ARCH
    from edgec.modelio import build_arch, save_model
    save_model(tmp_path / "m.pt", build_arch(SMALL_ARCH), SMALL_ARCH, (1, 3, 32, 32))
    for args in (["export", "{m}", "-o", "/proc/edgec-x.onnx"], ["build", "{m}", "-o", "/proc/edgec-x.edgec"],
                 ["data", "export", "builtin:digits", "-o", "/proc/edgec-d.npz"], ["keygen", "-o", "/proc/edgec-k"]):
        code, _, err = run_cli(*[a.format(m=tmp_path / "m.pt") for a in args])
        _one_line(code, err, 2, "/proc")
    code, _, err = run_cli("export", tmp_path / "m.pt", "-o", "/dev/null", "--force")
    _one_line(code, err, 8, "not a regular file")   # was an internal NotADirectoryError


def test_keygen_never_leaves_half_a_pair(tmp_path):
    (tmp_path / "b.pub").mkdir()
    code, _, err = run_cli("keygen", "-o", tmp_path / "b", "--force")
    _one_line(code, err, 2, "b.pub is a folder")   # was an internal IsADirectoryError after b.key was written
    assert not (tmp_path / "b.key").exists()
    assert run_cli("keygen", "-o", tmp_path / "a")[0] == 0
    before = (tmp_path / "a.key").read_bytes()
    assert run_cli("keygen", "-o", tmp_path / "a", "--force")[0] == 0
    assert (tmp_path / "a.key").read_bytes() != before and oct((tmp_path / "a.key").stat().st_mode)[-3:] == "600"
    assert oct((tmp_path / "a.pub").stat().st_mode)[-3:] == "644"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.key", "a.pub", "b.pub"]   # no temporaries left


# ---------------------------------------------------------------- NaN/Inf weights, diverged training, bad options

@pytest.fixture()
def small_model(tmp_path):
    from conftest import SMALL_ARCH
    from edgec.modelio import build_arch, save_model
    import torch
    torch.manual_seed(0)
    path = tmp_path / "m.pt"
    save_model(path, build_arch(SMALL_ARCH), SMALL_ARCH, (1, 3, 32, 32))
    return path


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_weights_are_refused_at_load(tmp_path, value):
    import torch
    from conftest import SMALL_ARCH
    from edgec.modelio import build_arch, save_model
    model = build_arch(SMALL_ARCH)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = value
    save_model(tmp_path / "bad.pt", model, SMALL_ARCH, (1, 3, 32, 32))
    for args in (["export", tmp_path / "bad.pt", "-o", tmp_path / "o.onnx"],   # was: "ONNX Runtime disagrees"
                 ["prune", tmp_path / "bad.pt", "--ratio", "0.5", "-o", tmp_path / "o.pt"]):   # was: exit 0
        code, _, err = run_cli(*args)
        _one_line(code, err, 3, "holds 1 NaN/Inf value(s)", "retrain or restore it")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt"]


def test_a_minus_inf_buffer_is_legitimate():
    import torch
    from edgec.modelio import check_finite_weights
    net = torch.nn.Linear(2, 2)
    net.register_buffer("mask", torch.full((2, 2), -float("inf")))
    check_finite_weights("m.pt", net)   # an attention mask of -inf loads
    net.mask[0, 0] = float("nan")
    with pytest.raises(Exception, match="buffer mask holds 1 NaN"):
        check_finite_weights("m.pt", net)


def test_nan_weights_in_an_onnx_model_are_refused_before_quantizing(tiny_onnx, tmp_path):
    import onnx
    from onnx import numpy_helper
    proto = onnx.load(str(tiny_onnx))
    w = numpy_helper.to_array(proto.graph.initializer[0]).copy()
    w.flat[0] = np.nan
    proto.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, proto.graph.initializer[0].name))
    onnx.save(proto, str(tmp_path / "nan.onnx"))
    data = _npz(tmp_path / "d.npz", x=np.random.default_rng(0).random((64, 3, 16, 16)).astype(np.float32))
    code, _, err = run_cli("quantize", tmp_path / "nan.onnx", "--data", data, "-o", tmp_path / "q.onnx")
    _one_line(code, err, 3, "initializer w holds 1 NaN/Inf value(s)")   # was an internal "scale issue"
    assert not (tmp_path / "q.onnx").exists()


def test_diverged_training_writes_no_model_of_nans(small_model, tmp_path, digits):
    data = _npz(tmp_path / "d.npz", x=np.asarray(digits[0].x[:96]), y=digits[0].y[:96])
    out = tmp_path / "s.pt"
    code, _, err = run_cli("distill", small_model, "--student", small_model, "--data", data, "--epochs", "1",
                           "--lr", "1e30", "-o", out)
    _one_line(code, err, 2, "training diverged in epoch 1", "lower --lr")   # was exit 0 and NaN weights
    assert not out.exists()


@pytest.mark.parametrize("args,word", [
    (["distill", "{m}", "--student", "{m}", "--weight-decay", "-1", "-o", "{out}"], "--weight-decay -1.0"),
    (["prune", "{m}", "--ratio", "0.5", "--steps", "100000", "-o", "{out}"], "--steps 100000 must be 1 to 100"),
    (["quantize", "{onnx}", "--std", "0,0,0", "-o", "{out}"], "--std 0.0,0.0,0.0"),
])
def test_options_that_ran_for_hours_or_crashed(small_model, tiny_onnx, tmp_path, args, word):
    out = tmp_path / "out"
    code, _, err = run_cli(*[a.format(m=small_model, onnx=tiny_onnx, out=out) for a in args])
    _one_line(code, err, 2, word)
    assert not out.exists()


@pytest.mark.parametrize("args,code,word", [
    (["--ep", "cuda"], 6, "'cuda'"),                # was found only after every recipe had been trained
    (["--qat-epochs", "-1"], 2, "--qat-epochs -1"),   # was accepted: a qat-kd row with no training
    (["--bench-seconds", "-1"], 2, "--bench-seconds -1.0"),
])
def test_compare_checks_its_options_first(small_model, tmp_path, args, code, word):
    if args[0] == "--ep":
        import onnxruntime as ort
        if "CUDAExecutionProvider" in ort.get_available_providers():
            pytest.skip("this onnxruntime has CUDA")
    out = tmp_path / "cmp"
    got, _, err = run_cli("compare", small_model, "-o", out, "--recipes", "fp32,qat-kd", *args)
    _one_line(got, err, code, word)
    assert not out.exists()


# ---------------------------------------------------------------- data hooks that never end or exit

def test_a_data_hook_that_never_ends_or_exits(tiny_onnx, tmp_path, monkeypatch):
    from edgec.core.memory import rss_mb
    (tmp_path / "hook.py").write_text(
        "import numpy as np, sys\n"
        "def endless():\n"
        "    while True:\n"
        "        yield {'x': np.random.rand(64, 3, 16, 16).astype(np.float32)}\n"
        "def exits():\n"
        "    sys.exit(3)\n")
    out = tmp_path / "q.onnx"
    code, _, err = run_cli("quantize", tiny_onnx, "--data", f"{tmp_path / 'hook.py'}:exits", "-o", out)
    _one_line(code, err, 4, "failed: SystemExit: 3")   # was exit 3 and no message at all
    monkeypatch.setenv("EDGEC_MEMORY_MB", str(int(rss_mb()) + 100))   # a small box: the hook may hand ~50 MB
    code, _, err = run_cli("quantize", tiny_onnx, "--data", f"{tmp_path / 'hook.py'}:endless", "-o", out)
    _one_line(code, err, 4, "an endless generator?")   # was a hang until the memory ran out
    assert not out.exists()


def test_recording_into_a_signed_package_says_the_signature_is_void(built_package, tmp_path):
    pkg = copy_package(built_package[0], tmp_path / "signed.edgec")
    assert run_cli("keygen", "-o", tmp_path / "k")[0] == 0
    assert run_cli("sign", pkg, "--key", tmp_path / "k.key")[0] == 0
    code, _, err = run_cli("bench", pkg, "--runs", "3", "--no-inspect", "--record")
    assert code == 0 and "was signed; recording changed its manifest" in err and "sign it again" in err, err
    assert run_cli("verify", pkg, "--key", tmp_path / "k.pub")[0] == 9   # what the warning said
    assert run_cli("sign", pkg, "--key", tmp_path / "k.key")[0] == 0
    assert run_cli("verify", pkg, "--key", tmp_path / "k.pub")[0] == 0


def test_a_model_file_recording_a_huge_builtin_architecture(tmp_path):
    # the spec of an edgec file builds without an opt-in when it is built-in: its options could ask for 486 GB
    import torch
    from conftest import SMALL_ARCH
    from edgec.modelio import build_arch, save_model
    save_model(tmp_path / "m.pt", build_arch(SMALL_ARCH), SMALL_ARCH, (1, 3, 32, 32))
    obj = torch.load(tmp_path / "m.pt", weights_only=True)
    obj["arch"] = SMALL_ARCH + "?width=30000"
    torch.save(obj, tmp_path / "wide.pt")
    code, _, err = run_cli("export", tmp_path / "wide.pt", "-o", tmp_path / "o.onnx")
    _one_line(code, err, 3, "builds 486.0 GB of weights", "width=30000")   # was the kernel's OOM kill
    assert not (tmp_path / "o.onnx").exists()


def test_bench_refuses_absurd_thread_counts(tiny_onnx):
    code, _, err = run_cli("bench", tiny_onnx, "--threads", "100000", "--runs", "3", "--no-inspect")
    _one_line(code, err, 2, "--threads 100000 is far more")   # ORT started them all: the run hung, unkillable
    assert run_cli("bench", tiny_onnx, "--threads", "2", "--runs", "3", "--no-inspect")[0] == 0


def test_the_export_check_never_passes_on_outputs_that_overflow(tmp_path):
    import torch
    from edgec.core.errors import DataError
    from edgec.exporters.onnx_export import check_onnx_against_torch, export_onnx
    net = torch.nn.Linear(4, 2)
    with torch.no_grad():
        net.weight.fill_(1e30)   # finite weights, finite inputs: the outputs overflow to inf
    export_onnx(net.eval(), torch.zeros(1, 4), tmp_path / "m.onnx")
    x = np.full((4, 4), 1e10, np.float32)
    x[:, 1] = -1e10   # 1e40 - 1e40: NaN in torch and ONNX Runtime alike
    with pytest.raises(DataError, match="NaN/Inf value"):   # was a pass: a NaN error is never over a tolerance
        check_onnx_against_torch(net, tmp_path / "m.onnx", x)
    class Masked(torch.nn.Module):
        def forward(self, x):
            return torch.where(x > 0, x, torch.full_like(x, -float("inf")))
    export_onnx(Masked().eval(), torch.zeros(1, 4), tmp_path / "masked.onnx")
    check = check_onnx_against_torch(Masked(), tmp_path / "masked.onnx", np.eye(4, dtype=np.float32))
    assert check["samples"] == 4   # the same -inf in the same places agrees; the rest is compared
