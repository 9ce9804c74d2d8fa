"""Nothing the user has is replaced or lost: no-replace renames, races on -o, SIGTERM, up-front refusals."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import SMALL_ARCH, run_cli
from edgec.core.errors import OptionError, OutputExists
from edgec.core.fsutil import atomic_path, claim_folder, rename_noreplace

EDGEC = [sys.executable, "-m", "edgec.cli"]
CHEAP = ["--bench-seconds", "0", "--samples", "32", "--fallback-seconds", "0", "--max-accuracy-drop", "100"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """An untrained digits_cnn edgec model file: the files, not the accuracy, are under test."""
    import torch
    from edgec.modelio import build_arch, save_model
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "cnn.pt"
    save_model(path, build_arch(SMALL_ARCH), SMALL_ARCH, (1, 3, 32, 32))
    return path


def leftovers(folder: Path):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------- the rename

def test_rename_noreplace_never_replaces(tmp_path):
    for kind in ("file", "dir"):
        src, dst = tmp_path / f"src-{kind}", tmp_path / f"dst-{kind}"
        if kind == "file":
            src.write_text("new")
            dst.write_text("mine")
        else:
            src.mkdir()
            dst.mkdir()  # an empty folder: plain os.rename would silently replace it
        with pytest.raises(FileExistsError):
            rename_noreplace(src, dst)
        assert src.exists() and dst.exists()
    rename_noreplace(tmp_path / "src-file", tmp_path / "fresh")
    assert (tmp_path / "fresh").read_text() == "new"


@pytest.mark.parametrize("directory", [False, True])
def test_output_that_appears_meanwhile_is_kept(tmp_path, directory):
    out = tmp_path / "out"
    with pytest.raises(OutputExists, match="appeared while this ran"):
        with atomic_path(out, directory=directory) as tmp:
            (tmp / "x").write_text("new") if directory else tmp.write_text("new")
            out.mkdir()
            (out / "user.txt").write_text("mine")
    assert (out / "user.txt").read_text() == "mine" and leftovers(tmp_path) == []


def test_force_never_replaces_a_foreign_folder_that_appeared(tmp_path):
    out = tmp_path / "p.edgec"
    with pytest.raises(OutputExists, match="not an edgec package"):
        with atomic_path(out, force=True, directory=True) as tmp:
            (tmp / "manifest.json").write_text("{}")
            out.mkdir()
            (out / "thesis.tex").write_text("mine")
    assert (out / "thesis.tex").read_text() == "mine" and leftovers(tmp_path) == []


def test_failure_removes_the_parents_it_created(tmp_path):
    out = tmp_path / "a" / "b" / "p.edgec"
    with pytest.raises(RuntimeError):
        with atomic_path(out, directory=True):
            raise RuntimeError("stage failed")
    assert list(tmp_path.iterdir()) == []


def test_build_race_on_output_keeps_what_appeared(model, tmp_path, monkeypatch):
    # a folder created at -o in the middle of the build (after export, during quantization)
    import edgec.stages as stages
    out = tmp_path / "p.edgec"
    real = stages.quantize

    def quantize_then_someone_writes(*a, **kw):
        stage = real(*a, **kw)
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        return stage
    monkeypatch.setattr(stages, "quantize", quantize_then_someone_writes)
    code, _, stderr = run_cli("build", model, "-o", out, *CHEAP)
    assert code == 8 and "appeared while this ran" in stderr
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and leftovers(tmp_path) == []


def test_two_concurrent_builds_to_one_output(model, tmp_path):
    out = tmp_path / "p.edgec"
    procs = [subprocess.Popen([*EDGEC, "build", str(model), "-o", str(out), *CHEAP], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 8], results
    loser = next(err for code, err in results if code == 8)
    assert "--force" in loser and "Traceback" not in loser
    from edgec.runtime.verify import verify_package
    assert verify_package(out)["ran"] and leftovers(tmp_path) == []


def test_sigterm_cleans_up(model, tmp_path):
    out = tmp_path / "p.edgec"
    proc = subprocess.Popen([*EDGEC, "build", str(model), "-o", str(out), *CHEAP[:-2], "--bench-seconds", "30"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not leftovers(tmp_path) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)  # until the hidden temporary package exists: the build is under way
    assert leftovers(tmp_path), "the build never started writing"
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=120)
    stderr = proc.stderr.read()
    assert code == 143 and "terminated" in stderr and "Traceback" not in stderr, (code, stderr[-2000:])
    assert list(tmp_path.iterdir()) == []


_SIGTERM_SCRIPT = """
import os, signal, sys, threading, time
from pathlib import Path
import click
import edgec.runtime.cli as cli
from edgec.core.fsutil import atomic_path
cli.TERMINATE_GRACE_S = 1

@click.command()
def work():
    with atomic_path(Path(sys.argv[1]) / "out.txt") as tmp:
        tmp.write_text("partial")
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
        sys.path.insert(0, sys.argv[1])
        while True:
            try:            # a library's bare except: swallows the Terminated
                if "slow_module" not in sys.modules:
                    import slow_module  # the signal arrives during this import
                time.sleep(60)
            except BaseException:
                pass

cli.run(work, "work", [])
"""


def test_sigterm_waits_for_an_import_and_ends_code_that_swallows_it(tmp_path):
    (tmp_path / "slow_module.py").write_text(
        "import time\nprint('started', flush=True)\nend = time.time() + 1\nwhile time.time() < end:\n    pass\n")
    proc = subprocess.run([sys.executable, "-c", _SIGTERM_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert proc.stdout == "started\n"     # one import: not interrupted and run again
    assert "work: terminated (without unwinding" in proc.stderr and "Traceback" not in proc.stderr
    assert leftovers(tmp_path) == [] and not (tmp_path / "out.txt").exists()


# ---------------------------------------------------------------- refused up front

def _foreign(tmp_path):
    d = tmp_path / "results"
    d.mkdir()
    (d / "thesis.tex").write_text("mine")
    return d


def _under_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    return tmp_path / "file" / "p.edgec"


@pytest.mark.parametrize("target,extra,code,message", [
    (lambda t, m: "/", ["--force"], 2, "a folder above your work"),
    (lambda t, m: ".", ["--force"], 2, "the current folder"),
    (lambda t, m: m, ["--force"], 2, "would replace the input"),
    (lambda t, m: m.parent, ["--force"], 2, "would replace the input"),
    (lambda t, m: _foreign(t), ["--force"], 8, "would delete its 1 entry (e.g. thesis.tex)"),
    (lambda t, m: (t / "link.edgec").symlink_to(_foreign(t)) or t / "link.edgec", ["--force"], 2, "symlink"),
    (lambda t, m: _under_a_file(t), [], 2, "is a file, not a folder"),
])
def test_outputs_refused_before_any_work(model, tmp_path, monkeypatch, target, extra, code, message):
    monkeypatch.chdir(tmp_path)
    out = target(tmp_path, model)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    import edgec.pipeline as pipeline
    monkeypatch.setattr(pipeline, "load_source", lambda *a, **k: pytest.fail("work started"))
    got, _, stderr = run_cli("build", model, "-o", out, *extra, *CHEAP)
    assert got == code and message in stderr, stderr
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before and model.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_location_is_refused(model, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    code, _, stderr = run_cli("build", model, "-o", locked / "p.edgec", *CHEAP)
    assert code == 2 and "permission denied" in stderr


# ---------------------------------------------------------------- compare's folder

def test_compare_never_writes_into_someone_elses_folder(model, tmp_path, monkeypatch):
    import edgec.compare as compare
    monkeypatch.setattr(compare, "load_source", lambda *a, **k: pytest.fail("work started"))
    folder = tmp_path / "reports"
    folder.mkdir()
    (folder / "report.md").write_text("my report")
    code, _, stderr = run_cli("compare", model, "-o", folder, "--recipes", "fp32")
    assert code == 8 and "did not write" in stderr
    assert (folder / "report.md").read_text() == "my report" and sorted(os.listdir(folder)) == ["report.md"]


def test_compare_package_is_checked_first(model, tmp_path, monkeypatch):
    import edgec.compare as compare
    monkeypatch.setattr(compare, "load_source", lambda *a, **k: pytest.fail("work started"))
    _foreign(tmp_path)
    code, _, stderr = run_cli("compare", model, "-o", tmp_path / "cmp", "--package", tmp_path / "results", "--force")
    assert code == 8 and "not an edgec package" in stderr and not (tmp_path / "cmp").exists()
    code, _, stderr = run_cli("compare", model, "-o", tmp_path / "cmp", "--package", model)
    assert code in (2, 8) and not (tmp_path / "cmp").exists()


def test_claim_folder_reuses_only_its_own(tmp_path):
    ours = claim_folder(tmp_path / "cmp", ".edgec-compare")
    (ours / "report.md").write_text("old run")
    assert claim_folder(ours, ".edgec-compare") == ours  # a rerun reuses its own folder
    empty = tmp_path / "empty"
    empty.mkdir()
    claim_folder(empty, ".edgec-compare")
    with pytest.raises(OptionError):
        claim_folder(tmp_path / "cmp" / "report.md" / "x", ".edgec-compare")
    assert json.dumps(sorted(os.listdir(ours))) == json.dumps([".edgec-compare", "report.md"])
