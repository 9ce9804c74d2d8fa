"""Imports only point down: core <- runtime, exporters, models <- toolchain <- commands (README "Layers").

Read from the code's own import statements (top-level and function-local alike), so a lazy import that
runs back up a layer fails here too.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# folder -> (package, layer); a module may import its own layer's package and anything below it
FOLDERS = {"core": ("edgec.core", 0), "runtime": ("edgec.runtime", 1), "exporters": ("edgec.exporters", 1),
           "models": ("edgec.models", 1), "toolchain": ("edgec", 2), "toolchain/commands": ("edgec.commands", 3)}


def layer_of(module: str) -> tuple[str, int]:
    best = ("edgec", 2)
    for package, layer in FOLDERS.values():
        if (module == package or module.startswith(package + ".")) and len(package) > len(best[0]):
            best = (package, layer)
    return best


def imports(path: Path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:  # `from edgec import package` imports edgec.package
                yield node.lineno, f"{node.module}.{alias.name}" if node.module == "edgec" else node.module


def source_files():
    for folder, (package, layer) in FOLDERS.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            yield path, package, layer


def test_imports_only_point_down():
    wrong = []
    for path, package, layer in source_files():
        for line, module in imports(path):
            if not (module == "edgec" or module.startswith("edgec.")):
                continue
            target, target_layer = layer_of(module)
            if target_layer > layer or (target_layer == layer and target != package):
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {module} (layer {target_layer} > {layer})")
    assert not wrong, "\n".join(wrong)


def test_core_and_runtime_import_no_heavy_library():
    heavy = {"torch", "torchvision", "onnx", "onnxscript", "torch_pruning", "matplotlib"}
    found = [f"{path.relative_to(ROOT)}:{line} imports {module}"
             for path, package, _ in source_files() if package in ("edgec.core", "edgec.runtime")
             for line, module in imports(path) if module.split(".")[0] in heavy]
    assert not found, "\n".join(found)


def test_the_check_sees_a_wrong_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from edgec.pipeline import build\n")
    (line, module), = imports(bad)
    assert layer_of(module) == ("edgec", 2) and layer_of("edgec.runtime.bench") == ("edgec.runtime", 1)
