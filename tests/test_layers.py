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


def module_name(path: Path) -> str:
    folder = path.parent.relative_to(ROOT).as_posix()
    package = FOLDERS[folder][0]
    return package if path.stem == "__init__" else f"{package}.{path.stem}"


def import_graph() -> dict[str, set[str]]:
    """edgec module -> the edgec modules it imports (top-level and function-local)."""
    files = {module_name(path): path for path, _, _ in source_files()}
    graph = {}
    for name, path in files.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in files}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:  # `from edgec.commands import options` imports edgec.commands.options
                    sub = f"{node.module}.{alias.name}"
                    edges.add(sub if sub in files else node.module)
        graph[name] = {m for m in edges if m in files and m != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}   # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_check_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
