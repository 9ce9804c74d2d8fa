"""Every model format loads; every bad file is one clear error; a hostile pickle never runs."""
import os
import re

import pytest
import torch
import torchvision

from conftest import run_cli
from edgec.core.errors import ModelError
from edgec.modelio import build_arch, load_model, save_model

ARCH = "torchvision:resnet18?num_classes=10"


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("resnet")
    m = torchvision.models.resnet18(num_classes=10).eval()
    return d, m


def _same(a, b, shape=(2, 3, 32, 32)):
    x = torch.randn(shape)
    with torch.no_grad():
        return torch.allclose(a(x), b(x), atol=1e-5)


def test_state_dict_and_wrappers(resnet):
    d, m = resnet
    torch.save(m.state_dict(), d / "sd.pt")
    torch.save({"state_dict": {"module." + k: v for k, v in m.state_dict().items()}, "epoch": 3}, d / "ddp.pt")
    torch.save({"model": m.state_dict()}, d / "model.pt")
    for name in ("sd.pt", "ddp.pt", "model.pt"):
        loaded = load_model(d / name, ARCH)
        assert loaded.kind == "checkpoint" and loaded.eager
        assert _same(loaded.module, m)


def test_torchscript_and_exported(resnet):
    d, m = resnet
    torch.jit.save(torch.jit.trace(m, torch.randn(1, 3, 32, 32)), d / "ts.pt")
    ts = load_model(d / "ts.pt")
    assert ts.kind == "torchscript" and not ts.eager and _same(ts.module, m)
    torch.export.save(torch.export.export(m, (torch.randn(1, 3, 32, 32),)), d / "prog.pt2")
    ep = load_model(d / "prog.pt2")
    assert ep.kind == "exported" and ep.input_shape == (1, 3, 32, 32)
    assert _same(ep.module, m, (1, 3, 32, 32))


def test_edgec_file_roundtrip_with_changed_structure(tmp_path):
    # channel counts that differ from the architecture's defaults are replayed from the file
    m = build_arch("edgec.models.zoo:digits_cnn?width=16")
    conv = m[0][0]
    m[0][0] = torch.nn.Conv2d(3, 16, 3, padding=1, bias=False)
    m[0][0].weight.data = conv.weight.data.clone()
    save_model(tmp_path / "m.pt", m, "edgec.models.zoo:digits_cnn?width=16", (1, 3, 32, 32),
               history=[{"stage": "test"}])
    raw = torch.load(tmp_path / "m.pt", weights_only=True)  # loadable without unpickling code
    assert raw["format"] == "edgec.model/1"
    loaded = load_model(tmp_path / "m.pt")
    assert loaded.input_shape == (1, 3, 32, 32) and loaded.meta["history"] == [{"stage": "test"}]
    assert _same(loaded.module, m.eval())


class Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_PICKLE",))


def test_hostile_pickle_never_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"state_dict": {}, "payload": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ModelError, match="--trust-pickle"):
        load_model(tmp_path / "evil.pt", ARCH)
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()


def test_full_module_needs_trust(tmp_path, resnet):
    _, m = resnet
    torch.save(m, tmp_path / "full.pt")
    with pytest.raises(ModelError, match="pickled Python objects"):
        load_model(tmp_path / "full.pt")
    assert load_model(tmp_path / "full.pt", trust_pickle=True).kind == "pickle"


@pytest.mark.parametrize("setup,arch,message", [
    (lambda p: None, ARCH, "not found"),
    (lambda p: p.write_bytes(b""), ARCH, "empty"),
    (lambda p: p.write_text("this is not a model"), ARCH, "not a PyTorch model file"),
    (lambda p: torch.save({"a": 1, "b": "x"}, p), ARCH, "not a model"),
])
def test_bad_files(tmp_path, setup, arch, message):
    path = tmp_path / "bad.pt"
    setup(path)
    with pytest.raises(ModelError, match=message):
        load_model(path, arch)


def test_random_bytes_are_not_called_a_pickle(tmp_path):
    # torch's weights-only loader refuses any byte stream; only a refused import is a pickle that could run code,
    # so random bytes must not be told to retry with --trust-pickle
    path = tmp_path / "noise.bin"
    path.write_bytes(bytes(range(256)) * 16)
    with pytest.raises(ModelError, match="not a PyTorch model file") as e:
        load_model(path)
    assert "trust-pickle" not in str(e.value) and "pickled" not in str(e.value)


def test_an_onnx_file_is_pointed_to_quantize(tmp_path):
    path = tmp_path / "m.onnx"
    torch.onnx.export(torch.nn.Linear(4, 2).eval(), (torch.zeros(1, 4),), str(path), dynamo=False)
    with pytest.raises(ModelError, match=r"is an ONNX model.*edgec quantize") as e:
        load_model(path)
    assert "trust-pickle" not in str(e.value)


def test_truncated_checkpoint(tmp_path, resnet):
    _, m = resnet
    torch.save(m.state_dict(), tmp_path / "ok.pt")
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(ModelError, match="truncated or corrupt"):
        load_model(tmp_path / "cut.pt", ARCH)


def test_arch_errors(tmp_path, resnet):
    _, m = resnet
    torch.save(m.state_dict(), tmp_path / "sd.pt")
    with pytest.raises(ModelError, match="pass --arch"):
        load_model(tmp_path / "sd.pt")
    with pytest.raises(ModelError, match="does not fit --arch.*num_classes"):
        load_model(tmp_path / "sd.pt", "torchvision:resnet18")
    with pytest.raises(ModelError, match="has no model 'resnet_nope'"):
        load_model(tmp_path / "sd.pt", "torchvision:resnet_nope")
    with pytest.raises(ModelError, match="not a spec"):
        load_model(tmp_path / "sd.pt", "resnet18")
    with pytest.raises(ModelError, match="cannot import"):
        load_model(tmp_path / "sd.pt", "no_such_package_xyz:build")


def test_arch_from_python_file(tmp_path, resnet):
    _, m = resnet
    (tmp_path / "arch.py").write_text(
        "import torchvision\ndef build(classes=1000):\n    return torchvision.models.resnet18(num_classes=classes)\n")
    torch.save(m.state_dict(), tmp_path / "sd.pt")
    loaded = load_model(tmp_path / "sd.pt", f"{tmp_path / 'arch.py'}:build?classes=10")
    assert _same(loaded.module, m)


# ---------------------------------------------------------------- the arch spec stored in an edgec model file

def _edgec_file_with_arch(tmp_path, arch):
    """An edgec model file whose stored spec is `arch` (weights of digits_cnn; the spec is what is tested)."""
    m = build_arch("edgec.models.zoo:digits_cnn")
    path = tmp_path / "m.pt"
    save_model(path, m, arch, (1, 3, 32, 32))
    return path


@pytest.mark.parametrize("spec", ["os:system?command=touch {marker}", "{evil}:build"])
def test_arch_from_a_file_never_runs_by_default(tmp_path, monkeypatch, spec):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "MARKER"
    evil = tmp_path / "evil_arch.py"
    evil.write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
                    "from edgec.models.zoo import digits_cnn as build\n")
    spec = spec.format(marker=marker, evil=evil)
    path = _edgec_file_with_arch(tmp_path, spec)
    with pytest.raises(ModelError, match="pass --arch") as e:
        load_model(path)
    assert spec in str(e.value) and not marker.exists()
    code, _, stderr = run_cli("build", path, "-o", tmp_path / "o.edgec")
    assert code == 3 and "--arch" in stderr and not marker.exists() and not (tmp_path / "o.edgec").exists()


def test_arch_from_a_file_runs_when_the_user_names_it(tmp_path):
    marker = tmp_path / "MARKER"
    evil = tmp_path / "my_arch.py"
    evil.write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
                    "from edgec.models.zoo import digits_cnn as build\n")
    path = _edgec_file_with_arch(tmp_path, f"{evil}:build")
    loaded = load_model(path, f"{evil}:build")  # the same spec on the command line is the opt-in
    assert loaded.kind == "edgec" and marker.exists()


def test_builtin_arch_from_a_file_needs_no_opt_in(tmp_path):
    path = _edgec_file_with_arch(tmp_path, "edgec.models.zoo:digits_cnn")
    assert load_model(path).arch == "edgec.models.zoo:digits_cnn"


def test_conflicting_arch_is_refused(tmp_path):
    path = _edgec_file_with_arch(tmp_path, "edgec.models.zoo:digits_cnn")
    with pytest.raises(ModelError, match="records its own architecture.*drop --arch"):
        load_model(path, "torchvision:resnet18")
    assert load_model(path, "edgec.models.zoo:digits_cnn").kind == "edgec"  # the same spec is fine
    ts = tmp_path / "ts.pt"
    torch.jit.save(torch.jit.script(load_model(path).module), ts)
    with pytest.raises(ModelError, match="carries its own architecture"):
        load_model(ts, "torchvision:resnet18")


@pytest.mark.parametrize("body,message", [
    ("raise RuntimeError('no GPU here')\n", "importing .* raised RuntimeError: no GPU here"),
    ("def build():\n    raise ValueError('bad width')\n", r"build\(\) raised ValueError: bad width"),
    ("def build():\n    return 42\n", "returned int, not a torch.nn.Module"),
    ("import sys\nsys.exit(0)\n", "raised SystemExit"),
    ("def build(:\n", "raised SyntaxError"),
])
def test_user_arch_failures_are_model_errors(tmp_path, body, message):
    (tmp_path / "arch.py").write_text(body)
    torch.save(build_arch("edgec.models.zoo:digits_cnn").state_dict(), tmp_path / "sd.pt")
    code, _, stderr = run_cli("build", tmp_path / "sd.pt", "--arch", f"{tmp_path / 'arch.py'}:build",
                              "-o", tmp_path / "o.edgec")
    assert code == 3, stderr
    assert re.search(message, stderr) and len(stderr.strip().splitlines()) == 1, stderr
    assert not (tmp_path / "o.edgec").exists()


# ---------------------------------------------------------------- files that inflate

def test_decompression_bomb_is_refused(tmp_path):
    import zipfile
    sd = build_arch("edgec.models.zoo:digits_cnn").state_dict()
    sd["extra"] = torch.zeros(4 * 2**20)  # 16 MB of zeros: deflates to a few KB
    torch.save(sd, tmp_path / "plain.pt")
    with zipfile.ZipFile(tmp_path / "plain.pt") as zin, zipfile.ZipFile(tmp_path / "bomb.pt", "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, zin.read(info.filename), compress_type=zipfile.ZIP_DEFLATED)
    assert (tmp_path / "bomb.pt").stat().st_size < 2**20  # torch.load itself would read it
    with pytest.raises(ModelError, match="decompression bomb"):
        load_model(tmp_path / "bomb.pt", "edgec.models.zoo:digits_cnn")


def _edgec_obj(tmp_path):
    path = _edgec_file_with_arch(tmp_path, "edgec.models.zoo:digits_cnn")
    return torch.load(path, weights_only=True)


def test_stride_zero_weight_is_refused(tmp_path):
    # one stored float declared as a 10 x 200000 classifier (8 MB here; 10**5 times more costs nothing more)
    obj = _edgec_obj(tmp_path)
    obj["state_dict"]["9.weight"] = torch.zeros(1).expand(10, 200000)
    obj["structure"]["9"]["in_features"] = 200000
    torch.save(obj, tmp_path / "inflate.pt")
    assert (tmp_path / "inflate.pt").stat().st_size < 2**20
    with pytest.raises(ModelError, match="declares 2,000,000 elements .* stores 1"):
        load_model(tmp_path / "inflate.pt")
    torch.save(obj["state_dict"], tmp_path / "sd.pt")  # the same trick in a plain state_dict
    with pytest.raises(ModelError, match="stores 1"):
        load_model(tmp_path / "sd.pt", "edgec.models.zoo:digits_cnn")


@pytest.mark.parametrize("edit,message", [
    (lambda o: o["structure"]["9"].update(in_features=10**12), "not a channel count"),
    (lambda o: o["structure"]["9"].update(forward="x"), "not a channel count"),
    (lambda o: o["structure"].update({"9": 5}), "not a channel count"),
    (lambda o: o.update(structure=[1, 2]), "not a mapping"),
    (lambda o: (o["structure"]["9"].update(in_features=128),
                o["state_dict"].update({"9.weight": torch.zeros(10, 128)})), "not a channel count"),
    (lambda o: o.update(input_shape=[1, 3, -1, 10**9]), "input_shape"),
    (lambda o: o.update(state_dict=[1]), "state_dict of tensors"),
    (lambda o: o.pop("arch"), "architecture spec"),
])
def test_malformed_structure_is_refused(tmp_path, edit, message):
    obj = _edgec_obj(tmp_path)
    edit(obj)
    torch.save(obj, tmp_path / "bad.pt")
    with pytest.raises(ModelError, match=message):
        load_model(tmp_path / "bad.pt")


def test_a_training_checkpoint_loads_its_one_state_dict_and_leaves_out_loose_loss_tensors(resnet, capsys):
    """Resemblyzer's pretrained.pt: {"step", "model_state", "optimizer_state"}, and model_state holds the GE2E
    loss's similarity_weight/bias beside the layers. The one tensor dict is the state_dict; top-level tensors of
    no layer are left out with a note; a layer's weight that does not belong stays an error."""
    d, m = resnet
    state = {**m.state_dict(), "similarity_weight": torch.tensor([10.0]), "similarity_bias": torch.tensor([-5.0])}
    torch.save({"step": 1000, "model_state": state, "optimizer_state": {"state": {}, "param_groups": [{"lr": 1e-4}]}},
               d / "train.pt")
    loaded = load_model(d / "train.pt", ARCH)
    assert _same(loaded.module, m)
    assert "similarity_weight" in capsys.readouterr().err
    torch.save({"a": m.state_dict(), "b": m.state_dict()}, d / "two.pt")
    with pytest.raises(ModelError, match="several state_dicts \\(a, b\\)"):
        load_model(d / "two.pt", ARCH)
    torch.save({"step": 3, "note": "x"}, d / "none.pt")
    with pytest.raises(ModelError, match="keys: step, note"):
        load_model(d / "none.pt", ARCH)
    torch.save({**m.state_dict(), "layer5.0.weight": torch.zeros(3)}, d / "extra_layer.pt")
    with pytest.raises(ModelError, match="1 unexpected"):
        load_model(d / "extra_layer.pt", ARCH)
