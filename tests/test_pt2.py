""".pt2 archives are read without running anything from them: hostile archives whose payload would create
a marker file are refused with a model error (exit 3) naming --trust-pickle, and the marker never appears."""
import io
import json
import os
import zipfile

import pytest
import torch
from torch import nn

from conftest import run_cli
from edgec.core.errors import ModelError
from edgec.pt2 import load_exported_program


class Payload:
    """Unpickling this runs `touch MARKER`."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class TwoInputs(nn.Module):
    """int64 ids + a float input, a buffer and a lifted constant: more than one float NCHW tensor."""
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.fc = nn.Linear(8, 3)
        self.register_buffer("scale", torch.tensor(2.0))

    def forward(self, ids, weight):
        return self.fc(self.emb(ids).mean(1)) * self.scale * weight


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("pt2") / "prog.pt2"
    batch = torch.export.Dim("batch", min=1, max=64)
    args = (torch.randint(0, 50, (2, 5)), torch.ones(2, 1))
    model = TwoInputs().eval()
    torch.export.save(torch.export.export(model, args, dynamic_shapes=({0: batch}, {0: batch})), path)
    return path, model, args


def rewrite(src, dst, edit):
    """Copy a .pt2 entry by entry; edit(name, data) -> new data (entries are named below the top folder)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            top, _, name = info.filename.partition("/")
            zout.writestr(info.filename, edit(name, zin.read(info.filename)))
    return dst


def pickled_payload(marker) -> bytes:
    buf = io.BytesIO()
    torch.save((Payload(marker),), buf)
    return buf.getvalue()


def weight_record(src, fqn) -> str:
    with zipfile.ZipFile(src) as z:
        config = next(n for n in z.namelist() if n.endswith("model_weights_config.json"))
        return "data/weights/" + json.loads(z.read(config))["config"][fqn]["path_name"]


def hostile(kind, src, dst, marker):
    record = weight_record(src, "fc.weight")

    def edit(name, data):
        if kind == "sample_inputs" and name == "data/sample_inputs/model.pt":
            return pickled_payload(marker)
        if kind == "pickled_weight":
            if name.endswith("model_weights_config.json"):
                cfg = json.loads(data)
                cfg["config"]["fc.weight"]["use_pickle"] = True
                return json.dumps(cfg).encode()
            if name == record:
                return pickled_payload(marker)
        if kind == "sympy" and name == "models/model.json":  # sympify evals shape expressions
            text = data.decode()
            start = text.index('"expr_str": "') + len('"expr_str": "')
            return (text[:start] + f"__import__('os').system('touch {marker}') or " + text[start:]).encode()
        if kind == "target" and name == "models/model.json":  # a graph node that calls os.system
            doc = json.loads(data)
            node = doc["graph_module"]["graph"]["nodes"][0]
            node["target"] = "torch.os.system"
            return json.dumps(doc).encode()
        if kind == "argname" and name == "models/model.json":  # keyword names become generated Python code
            doc = json.loads(data)
            doc["graph_module"]["graph"]["nodes"][0]["inputs"][0]["name"] = f"x=__import__('os').system('touch {marker}')"
            return json.dumps(doc).encode()
        return data
    rewrite(src, dst, edit)
    if kind == "native_code":  # AOTInductor payloads are shared libraries torch.export.load would dlopen
        with zipfile.ZipFile(dst, "a") as z:
            z.writestr("prog/data/aotinductor/model/model.so", b"\x7fELF")
    return dst


def test_safe_load_matches_torch(archive):
    path, model, args = archive
    program = load_exported_program(path)
    with torch.no_grad():
        assert torch.equal(program.module()(*args), model(*args))
    assert program.example_inputs[0][0].dtype == torch.int64


KINDS = ["sample_inputs", "pickled_weight", "sympy", "target", "argname", "native_code"]


@pytest.mark.parametrize("kind", KINDS)
def test_hostile_archive_is_refused(kind, archive, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "MARKER"
    path = hostile(kind, archive[0], tmp_path / "evil.pt2", marker)
    with pytest.raises(ModelError) as e:
        load_exported_program(path)
    assert not marker.exists()
    assert "\n" not in str(e.value)
    if kind in ("sample_inputs", "pickled_weight", "native_code"):
        assert "--trust-pickle" in str(e.value)


@pytest.mark.parametrize("kind", ["sample_inputs", "pickled_weight"])
def test_hostile_archive_build_exits_with_model_error(kind, archive, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "MARKER"
    path = hostile(kind, archive[0], tmp_path / "evil.pt2", marker)
    code, _, stderr = run_cli("build", path, "-o", tmp_path / "o.edgec", "--bench-seconds", "0")
    assert code == 3 and "--trust-pickle" in stderr and "Traceback" not in stderr
    assert not marker.exists() and not (tmp_path / "o.edgec").exists()


def test_trust_pickle_is_the_opt_in(archive, tmp_path, monkeypatch):
    # with --trust-pickle torch.export.load runs as torch ships it: the payload in the sample inputs runs
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "MARKER"
    path = hostile("sample_inputs", archive[0], tmp_path / "evil.pt2", marker)
    try:
        load_exported_program(path, trust_pickle=True)
    except Exception:  # noqa: BLE001 - the payload's tuple is not valid sample inputs; it ran anyway
        pass
    assert marker.exists()


def test_stride_zero_weight_is_refused(archive, tmp_path):
    # a 3x8 weight stored as one float and declared with stride 0 everywhere (the inflation trick)
    def edit(name, data):
        if name.endswith("model_weights_config.json"):
            cfg = json.loads(data)
            meta = cfg["config"]["fc.weight"]["tensor_meta"]
            meta["sizes"] = [{"as_int": 100000}, {"as_int": 100000}]
            meta["strides"] = [{"as_int": 0}, {"as_int": 0}]
            return json.dumps(cfg).encode()
        return data
    path = rewrite(archive[0], tmp_path / "inflate.pt2", edit)
    with pytest.raises(ModelError, match="declares 10,000,000,000 elements"):
        load_exported_program(path)
