"""The package contract on packages made by the real writer: schemas, typed records, verify hardening, signing.

Every tamper case runs with and without a signature: integrity alone catches what breaks the manifest's own
consistency (an extra file, a symlink, a name outside the folder); only a signature catches a consistent rewrite
(a swapped model with its hash recomputed, a file deleted with its entry, an edited accuracy figure)."""
import json
import os
import stat
import subprocess
import sys

import jsonschema
import pytest

from conftest import BLOCKER, copy_package, run_cli
from edgec.core.package import MANIFEST_FILE, SIGNATURE_FILE, Manifest, file_record, read_manifest
from edgec.core.records import json_schema



def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if not line.startswith("[edgec]")]
    assert len(lines) == 1 and lines[0].startswith("edgec: error: ") and "Traceback" not in stderr, stderr
    return lines[0]


def edit_manifest(pkg, change):
    path = pkg / MANIFEST_FILE
    m = json.loads(path.read_text())
    change(m)
    path.write_text(json.dumps(m, indent=2))


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    assert run_cli("keygen", "-o", d / "release")[0] == 0
    assert run_cli("keygen", "-o", d / "other")[0] == 0
    return d / "release.key", d / "release.pub", d / "other.pub"


# ---------------------------------------------------------------- schemas and typed records

def test_every_writer_matches_its_schema(built_package, tmp_path, capsys):
    pkg = copy_package(built_package[0], tmp_path / "cnn.edgec")
    built = json.loads((pkg / MANIFEST_FILE).read_text())
    jsonschema.validate(built, json_schema("manifest"))
    assert Manifest.from_json(built).to_json() == built                       # one typed record, lossless
    code, stdout, stderr = run_cli("bench", pkg, "--runs", "20", "--warmup", "2", "--json", "--record")
    assert code == 0, stderr
    jsonschema.validate(json.loads(stdout), json_schema("bench"))
    recorded = json.loads((pkg / MANIFEST_FILE).read_text())
    jsonschema.validate(recorded, json_schema("manifest"))
    code, stdout, _ = run_cli("inspect", pkg, "--json")
    assert code == 0 and json.loads(stdout) == recorded


def test_schema_and_reader_refuse_the_old_shapes(built_package):
    old = json.loads((built_package[0] / MANIFEST_FILE).read_text())
    old["input"] = old.pop("inputs")[0]                                       # what the builder used to write
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(old, json_schema("manifest"))
    flat = json.loads((built_package[0] / MANIFEST_FILE).read_text())
    flat["latency"]["cpu"] = {"latency_ms": {"p50": 1.0}}                    # a bench result where a record goes
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(flat, json_schema("manifest"))


@pytest.mark.parametrize("case, needle", [
    ("files-a-list", "manifest.files: expected an object"),
    ("inputs-missing", "manifest.inputs is missing"),
    ("shape-a-string", "manifest.inputs[0].shape: expected a list"),
    ("deep", "nests deeper than"),
    ("very-deep", "not valid JSON"),
    ("huge", "over the 16 MiB"),
    ("not-json", "not valid JSON"),
    ("schema", "expected 'edgec.manifest/1'"),
])
def test_malformed_manifest_is_one_line(built_package, tmp_path, case, needle):
    pkg = copy_package(built_package[0], tmp_path / "bad.edgec")
    path = pkg / MANIFEST_FILE
    m = json.loads(path.read_text())
    if case == "files-a-list":
        m["files"] = list(m["files"])
    elif case == "inputs-missing":
        del m["inputs"]
    elif case == "shape-a-string":
        m["inputs"][0]["shape"] = "1x3x32x32"
    elif case == "schema":
        m["schema"] = "edgec.package/1"
    if case in ("deep", "very-deep"):   # below and far beyond what Python's JSON parser itself survives
        n = 200 if case == "deep" else 100_000
        path.write_text(json.dumps(m)[:-1] + ', "x": ' + "[" * n + "]" * n + "}")
    elif case == "huge":
        path.write_text(json.dumps({**m, "pad": "x" * (17 << 20)}))
    elif case == "not-json":
        path.write_text("{ not json")
    else:
        path.write_text(json.dumps(m))
    for command in ("verify", "inspect"):
        code, _, stderr = run_cli(command, pkg)
        assert code == 9 and needle in one_error_line(stderr), (command, stderr)


def test_missing_package_is_not_found_and_json_reports_failures(tmp_path, built_package):
    code, stdout, stderr = run_cli("verify", tmp_path / "nope.edgec", "--json")
    assert code == 3 and "not found" in one_error_line(stderr)
    doc = json.loads(stdout)
    assert doc["schema"] == "edgec.verify/1" and doc["ok"] is False and doc["exit_code"] == 3
    (tmp_path / "empty").mkdir()
    assert run_cli("verify", tmp_path / "empty")[0] == 3 and run_cli("inspect", tmp_path / "nope")[0] == 3
    pkg = copy_package(built_package[0], tmp_path / "x.edgec")
    (pkg / "extra.txt").write_text("x")
    code, stdout, stderr = run_cli("verify", pkg, "--json")
    assert code == 9 and json.loads(stdout)["ok"] is False and "extra.txt" in json.loads(stdout)["error"]
    (pkg / "extra.txt").unlink()
    code, stdout, _ = run_cli("verify", pkg, "--json")
    assert code == 0 and json.loads(stdout)["ok"] and json.loads(stdout)["inputs"][0]["shape"] == [1, 3, 32, 32]


def test_inspect_escapes_control_characters(built_package, tmp_path):
    pkg = copy_package(built_package[0], tmp_path / "evil.edgec")

    def evil(m):
        m["source"]["path"] = "model\x1b[2J\x1b]0;pwned\x07.pt"
        m["inputs"][0]["name"] = "in\x1b[31mput"
        m["stages"][0]["name"] = "load\r\nFAKE ok: verified"
    edit_manifest(pkg, evil)
    code, stdout, stderr = run_cli("inspect", pkg)
    assert code == 0, stderr
    assert "\x1b" not in stdout and "\x07" not in stdout and "\r" not in stdout and "\\x1b" in stdout
    assert "\nFAKE" not in stdout
    from edgec.core.report import render_markdown
    text = render_markdown(read_manifest(pkg))
    assert "\x1b" not in text and "\x07" not in text


# ---------------------------------------------------------------- tampering, with and without a signature

def _swap_model(pkg):
    """Another valid model in place of model.onnx, its hash recomputed in the manifest."""
    (pkg / "model.onnx").write_bytes((pkg / "model.fp32.onnx").read_bytes())
    edit_manifest(pkg, lambda m: m["files"].update({"model.onnx": file_record(pkg / "model.onnx").to_json()}))


def _delete_with_entry(pkg):
    (pkg / "report.md").unlink()
    edit_manifest(pkg, lambda m: m["files"].pop("report.md"))


def _edit_accuracy(pkg):
    edit_manifest(pkg, lambda m: m["metrics"]["int8"].update(accuracy=99.99))


def _extra_file(pkg):
    (pkg / "payload.sh").write_text("echo pwned\n")


def _outward_symlink(pkg, outside):
    """report.md replaced by a symlink to a file outside with the same bytes: the hash still matches."""
    outside.write_bytes((pkg / "report.md").read_bytes())
    (pkg / "report.md").unlink()
    os.symlink(outside, pkg / "report.md")


def _dotdot_entry(pkg, outside):
    outside.write_text("host\n")
    rel = os.path.relpath(outside, pkg)
    assert rel.startswith("..")
    edit_manifest(pkg, lambda m: m["files"].update({rel: file_record(outside).to_json()}))


TAMPER = {  # case -> (exit code without a signature, what the one line says)
    "swapped model + recomputed hash": (_swap_model, 0, None),
    "deleted file + entry": (_delete_with_entry, 0, None),
    "edited accuracy figure": (_edit_accuracy, 0, None),
    "extra file": (_extra_file, 9, "payload.sh is not listed in the manifest"),
    "outward symlink": (_outward_symlink, 9, "report.md is a symlink"),
    "../ entry": (_dotdot_entry, 9, "is a path, not a file name"),
}


@pytest.mark.parametrize("signed", [False, True], ids=["integrity", "signed"])
@pytest.mark.parametrize("case", list(TAMPER))
def test_tampering(built_package, keys, tmp_path, case, signed):
    key, pub, _ = keys
    pkg = copy_package(built_package[0], tmp_path / "p.edgec")
    if signed:
        assert run_cli("sign", pkg, "--key", key)[0] == 0
        assert run_cli("verify", pkg, "--key", pub)[0] == 0
    tamper, unsigned_code, needle = TAMPER[case]
    if tamper in (_outward_symlink, _dotdot_entry):
        tamper(pkg, tmp_path / "outside.txt")
    else:
        tamper(pkg)
    code, _, stderr = run_cli("verify", pkg, *(["--key", pub] if signed else []))
    if signed:   # any change to any file or to the manifest
        assert code == 9, stderr
        one_error_line(stderr)
    elif unsigned_code == 0:   # a consistent rewrite: integrity alone cannot tell (README's threat model)
        assert code == 0, stderr
    else:
        assert code == 9 and needle in one_error_line(stderr)


@pytest.mark.parametrize("name", ["/etc/hostname", "..\\..\\etc\\hostname", "a/b", "..", "manifest.sig"])
def test_names_outside_the_folder_are_refused(built_package, tmp_path, name):
    pkg = copy_package(built_package[0], tmp_path / "p.edgec")
    edit_manifest(pkg, lambda m: m["files"].update({name: {"sha256": "0" * 64, "bytes": 0}}))
    code, _, stderr = run_cli("verify", pkg)
    assert code == 9 and "lists" in one_error_line(stderr)


def test_symlinked_manifest_and_subfolder_are_refused(built_package, tmp_path):
    pkg = copy_package(built_package[0], tmp_path / "p.edgec")
    (pkg / "sub").mkdir()
    code, _, stderr = run_cli("verify", pkg)
    assert code == 9 and "sub is not a regular file" in one_error_line(stderr)
    (pkg / "sub").rmdir()
    real = tmp_path / "manifest.json"
    os.replace(pkg / MANIFEST_FILE, real)
    os.symlink(real, pkg / MANIFEST_FILE)
    code, _, stderr = run_cli("verify", pkg)
    assert code == 9 and "symlink" in one_error_line(stderr)


# ---------------------------------------------------------------- signing

def test_keygen_writes_a_private_key_only_its_owner_reads(keys, tmp_path):
    key, pub, _ = keys
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and b"PRIVATE KEY" in key.read_bytes()
    assert b"PUBLIC KEY" in pub.read_bytes()
    before = key.read_bytes()
    code, _, stderr = run_cli("keygen", "-o", key.with_suffix(""))
    assert code == 8 and "already exists" in one_error_line(stderr) and key.read_bytes() == before


def test_signature_failures(built_package, keys, tmp_path):
    key, pub, other = keys
    pkg = copy_package(built_package[0], tmp_path / "p.edgec")
    code, _, stderr = run_cli("verify", pkg, "--key", pub)
    assert code == 9 and "not signed" in one_error_line(stderr)                    # missing signature
    assert run_cli("sign", pkg, "--key", key)[0] == 0
    code, stdout, _ = run_cli("verify", pkg, "--key", pub)
    assert code == 0 and "signature verified" in stdout
    code, stdout, _ = run_cli("verify", pkg)
    assert code == 0 and "not checked" in stdout                                    # no key: said, not implied
    code, _, stderr = run_cli("verify", pkg, "--key", other)
    assert code == 9 and "not by this --key" in one_error_line(stderr)              # wrong key
    sig = json.loads((pkg / SIGNATURE_FILE).read_text())
    sig["signature"] = sig["signature"][:10] + ("A" if sig["signature"][10] != "A" else "B") + sig["signature"][11:]
    (pkg / SIGNATURE_FILE).write_text(json.dumps(sig))
    code, _, stderr = run_cli("verify", pkg, "--key", pub)
    assert code == 9 and "does not match" in one_error_line(stderr)                 # wrong signature
    (pkg / SIGNATURE_FILE).write_text("garbage")
    code, _, stderr = run_cli("verify", pkg, "--key", pub)
    assert code == 9 and "not an edgec.signature/1" in one_error_line(stderr)
    code, _, stderr = run_cli("sign", pkg, "--key", pub)
    assert code == 2 and "private key" in one_error_line(stderr)                    # a .pub is not a .key
    (pkg / "extra").write_text("x")
    code, _, stderr = run_cli("sign", pkg, "--key", key)
    assert code == 9 and "extra is not listed" in one_error_line(stderr)            # only an intact package


def test_build_signs_as_it_writes(trained_cnn, keys, tmp_path):
    key, pub, _ = keys
    out = tmp_path / "signed.edgec"
    code, _, stderr = run_cli("build", trained_cnn[0], "-o", out, "--sign-key", key, "--bench-seconds", "0",
                              "--samples", "64")
    assert code == 0, stderr
    assert SIGNATURE_FILE not in json.loads((out / MANIFEST_FILE).read_text())["files"]
    assert run_cli("verify", out, "--key", pub)[0] == 0
    code, _, stderr = run_cli("build", trained_cnn[0], "-o", tmp_path / "x.edgec", "--sign-key", pub)
    assert code == 2 and "private key" in one_error_line(stderr) and not (tmp_path / "x.edgec").exists()


# ---------------------------------------------------------------- the lean device side

def test_package_commands_run_without_torch_or_onnx(built_package, keys, tmp_path):
    key, pub, _ = keys
    pkg = copy_package(built_package[0], tmp_path / "p.edgec")
    script = BLOCKER + f"""
import click
import edgec.core.package, edgec.runtime.package_cmds
from edgec.runtime.package_cmds import inspect_cmd, keygen_cmd, sign_cmd, verify_cmd
group = click.Group(commands=[inspect_cmd, verify_cmd, sign_cmd, keygen_cmd])   # as a lean CLI mounts them
for args in (['inspect', {str(pkg)!r}], ['sign', {str(pkg)!r}, '--key', {str(key)!r}],
             ['verify', {str(pkg)!r}, '--key', {str(pub)!r}]):
    group.main(args, standalone_mode=False)
blocked = [m for m in sys.modules if m.split('.')[0] in ('torch', 'onnx')]
assert not blocked, blocked
"""
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "signature verified" in p.stdout and "model.onnx" in p.stdout
