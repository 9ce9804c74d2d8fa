"""Every ```sh block of the README runs as pasted, after the set-up command, from the clone's root: for real in bash
(tiny settings: the demo's cached ResNet18 is replaced by the small trained CNN in the same edgec model-file format,
torchvision arch specs by that CNN's, benchmarks are short, distillation epochs few, and the regression allowance is
widened because a busy machine is no benchmark), and through zsh with every command stubbed, which fails on an
unquoted glob such as `?` in an --arch spec ("no matches found"). The first block, the walk through every stage,
runs once; each later block reads only what it wrote, so each runs in its own copy of that folder, in parallel."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import made_once, private_source

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SMALL_ARCH = "edgec.models.zoo:digits_cnn"
TINY = [(re.compile(r"torchvision:[a-z0-9_]+\?num_classes=10"), SMALL_ARCH),
        (re.compile(r"--max-regression 10%"), "--max-regression 1000%"),
        # short benchmarks: the blocks show that the commands run and write their outputs, not what the figures are
        (re.compile(r"\bedgec (build|compare) "), r"edgec \1 --bench-seconds 0.3 "),
        # a compare with the default 10 distillation epochs trains like the README's others (2, QAT 1)
        (re.compile(r"\bedgec compare (?![^\n]*--epochs)"), "edgec compare --epochs 2 --qat-epochs 1 ")]
SETUP = "python3 -m venv .venv"


def command_blocks(text: str = README) -> list[str]:
    """The ```sh blocks after the set-up and test lines (which .ci/run and the user run themselves)."""
    return [b for b in re.findall(r"^```sh\n(.*?)^```", text, re.S | re.M) if not b.startswith(SETUP)]


def test_setup_and_test_lines_stay_first():
    blocks = re.findall(r"^```sh\n(.*?)^```", README, re.S | re.M)
    setup, tests = blocks[0].strip(), blocks[1].strip()
    assert setup.startswith(SETUP) and setup.endswith("edgec demo") and "-e ./edgec-runtime" in setup
    ci = subprocess.run(["awk", "/^Run the tests:/{f=1} f && /^python3 /{print; exit}", str(ROOT / "README.md")],
                        capture_output=True, text=True, check=True).stdout.strip()
    assert ci == tests and tests.startswith("python3 ") and tests.endswith("python -m pytest -q -n 2 --dist loadgroup")   # .ci/run's line
    assert len(command_blocks()) >= 6


def _first_words(block: str) -> set[str]:
    """The command names of a block (first word of each line and after && || ; |), quotes respected."""
    import shlex
    words = set()
    for line in block.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.commenters = "#"
        start = True
        for token in lexer:
            if token in ("&&", "||", ";", "|", "&"):
                start = True
            elif start:
                words.add(token)
                start = False
    return words


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed here")
@pytest.mark.parametrize("index", range(len(command_blocks())))
def test_block_expands_in_zsh(index, tmp_path):
    block = command_blocks()[index]
    stubs = " ".join(sorted(_first_words(block)))
    script = f"function {stubs} {{ print -r -- \"$@\" }}\n{block}"
    p = subprocess.run(["zsh", "-f", "-e", "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert p.returncode == 0 and "no matches found" not in p.stderr, p.stderr


def cache_demo_model(trained_cnn) -> None:
    """The demo model in this worker's cache (tiny: the small CNN in the same edgec model-file format)."""
    from edgec.demo import demo_model_path
    cached = demo_model_path()
    cached.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(trained_cnn[0], cached)


def prepare_clone(root: Path, trained_cnn) -> Path:
    """`root` standing in for the clone's root after the set-up command: .venv is this venv, the demo model is
    cached, edgec-runtime/ is a copy of the repository's (the lean install builds in it)."""
    (root / ".venv").symlink_to(sys.prefix)
    private_source(ROOT / "edgec-runtime", root / "edgec-runtime")
    cache_demo_model(trained_cnn)
    return root


@pytest.fixture
def clone(tmp_path_factory, trained_cnn):
    """A fresh folder (one per test: the README's outputs are not the CI workflow's), prepared as after set-up."""
    return prepare_clone(tmp_path_factory.mktemp("clone"), trained_cnn)


def outputs(block: str) -> list[str]:
    """What a block says it writes: the targets of -o, --package, --junit, --markdown and `>`."""
    return re.findall(r"(?:\s-o|\s--package|\s--junit|\s--markdown|\s>)\s+([\w./-]+)", block)


def run_block(block: str, folder: Path) -> None:
    """One README block in bash, as pasted (with the TINY settings), at `folder`; it must succeed and leave every
    output it names (`-o NAME` writes NAME, or NAME.* for a key pair)."""
    env = {**os.environ, "PATH": f"{Path(sys.prefix) / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    env.pop("VIRTUAL_ENV", None)
    script = block
    for pattern, tiny in TINY:
        script = pattern.sub(tiny, script)
    p = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script], capture_output=True, text=True, cwd=folder,
                       env=env, timeout=1200)
    assert p.returncode == 0, f"README block failed (exit {p.returncode}):\n{block}\n--- stderr:\n{p.stderr[-3000:]}"
    missing = [o for o in outputs(block) if not (folder / o).exists() and not list(folder.glob(f"{o}.*"))]
    assert not missing, f"README block did not write {missing}:\n{block}"


@pytest.fixture(scope="session")
def walkthrough(tmp_path_factory, trained_cnn):
    """The folder the README's first block (the walk through every stage) leaves, made once per run (shared by
    the xdist workers): every later block reads only what that block wrote, so each runs in its own copy of it."""
    def make(folder):
        run_block(command_blocks()[0], prepare_clone(folder, trained_cnn))
        return str(folder)
    return Path(made_once(tmp_path_factory, "readme-walkthrough", make))


def workflow_steps(text: str) -> list[str]:
    """The `run:` steps of docs/ci.md's workflow, in order (one-line or `run: |` blocks)."""
    steps, lines = [], text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)(?:- )?run: (.*)$", line)
        if not m:
            continue
        if m.group(2).strip() != "|":
            steps.append(m.group(2))
            continue
        body = []
        for nxt in lines[i + 1:]:
            if nxt.strip() and len(nxt) - len(nxt.lstrip()) <= len(m.group(1)):
                break
            body.append(nxt.strip())
        steps.append("\n".join(body).replace("\\\n", " "))
    return steps


@pytest.mark.slow
def test_ci_doc_workflow_commands_run(clone, trained_cnn):
    """docs/ci.md: the build job's steps, storing the baseline, then the device job's steps with the lean install,
    in one folder (the artifact transfer is the YAML runner's). The full tool's install line is .ci/run's, so here
    .venv is this venv."""
    doc = (ROOT / "docs" / "ci.md").read_text()
    (yaml_block,) = re.findall(r"^```yaml\n(.*?)^```", doc, re.S | re.M)
    (baseline,) = re.findall(r"^```sh\n(.*?)^```", doc, re.S | re.M)
    steps = workflow_steps(yaml_block)
    full_install = 'python3 -m venv .venv && .venv/bin/pip install -e ./edgec-runtime -e ".[cpu]"'
    assert steps[0] == full_install and any("lean/bin/pip install" in s for s in steps)
    gate_at = next(i for i, s in enumerate(steps) if "lean/bin/pip install" in s)
    if not (clone / "model.pt").exists():
        shutil.copy(trained_cnn[0], clone / "model.pt")
    env = {**os.environ, "PATH": f"{Path(sys.prefix) / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    env.pop("VIRTUAL_ENV", None)
    env.pop("GITHUB_STEP_SUMMARY", None)
    for script in steps[1:gate_at] + [baseline] + steps[gate_at:]:
        for pattern, tiny in TINY:
            script = pattern.sub(tiny, script)
        p = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script], capture_output=True, text=True,
                           cwd=clone, env=env, timeout=1200)
        assert p.returncode == 0, f"docs/ci.md step failed (exit {p.returncode}):\n{script}\n{p.stderr[-3000:]}"
    import xml.etree.ElementTree as ET
    cases = list(ET.parse(clone / "bench.xml").getroot().iter("testcase"))
    assert [c.get("name") for c in cases] == ["budget p90=12ms", "regression p50 +1000% vs baseline"]
    assert "gate passed: 2 check(s)" in p.stderr and (clone / "bench.md").read_text().startswith("### edgec bench")


@pytest.mark.parametrize("index", [pytest.param(0, marks=pytest.mark.slow(makes="the walkthrough"))] +
                         [pytest.param(i, marks=pytest.mark.slow) for i in range(1, len(command_blocks()))])
def test_readme_block_runs_in_bash(index, walkthrough, trained_cnn, tmp_path):
    """Each block after the set-up: the walkthrough (index 0) in the fixture, each later one in a copy of the
    folder the walkthrough left, as if pasted after it (the blocks run in parallel)."""
    block = command_blocks()[index]
    if index == 0:   # run, and its outputs checked, by the fixture
        assert (walkthrough / "model.edgec" / "manifest.json").is_file()
        assert (walkthrough / "compare" / "report.md").is_file()
        return
    folder = shutil.copytree(walkthrough, tmp_path / "clone", symlinks=True)
    cache_demo_model(trained_cnn)   # this worker's cache, for `edgec demo`
    run_block(block, folder)
