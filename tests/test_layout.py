"""The package's layout rules: no import cycle between its modules; one atomic-write helper that keeps the
old file on failure; the constants shared by the pipeline agree."""
import ast
import os
from pathlib import Path

import pytest

from incrementer_fast._files import atomic_write, atomic_write_json
from incrementer_fast.constants import IGNORE_INDEX

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> dict[str, Path]:
    """Module name -> file, for incrementer_fast (and kernels/, installed as incrementer_fast.kernels)."""
    modules = {}
    for path in sorted((ROOT / "incrementer_fast").rglob("*.py")) + sorted((ROOT / "kernels").glob("*.py")):
        relative = path.relative_to(ROOT).with_suffix("").parts
        parts = ["incrementer_fast", *relative[1:]] if relative[0] == "kernels" else list(relative)
        if relative[0] == "kernels":
            parts.insert(1, "kernels")
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports anywhere in its file (function-level imports included)."""
    package = name.split(".") if path.stem == "__init__" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module
            for alias in node.names:
                target = f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                found.add(target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in modules and m != name}


def test_no_import_cycle_between_modules():
    modules = _modules()
    # A package's __init__ is imported implicitly by its submodules: those edges are not cycles.
    graph = {m: {t for t in _imports(m, p, modules) if modules[t].stem != "__init__"} for m, p in modules.items()}
    state, cycles = {}, []

    def visit(module, stack):
        state[module] = "open"
        stack.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target, stack)
        stack.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
    assert "incrementer_fast.continual.synthetic" in graph["incrementer_fast.continual.datasets"]  # the graph is real


def test_synthetic_class_count_agrees_with_the_generator():
    from incrementer_fast.continual import SyntheticSegmentation, num_classes
    from incrementer_fast.continual.synthetic import CLASS_NAMES

    assert num_classes("synthetic") == len(CLASS_NAMES) == SyntheticSegmentation.num_classes


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "sub" / "metrics.json"
    atomic_write_json(target, {"step": 0})
    assert target.read_text() == '{"step": 0}'
    with pytest.raises(RuntimeError):
        with atomic_write(target) as handle:
            handle.write(b'{"step": 1, "partial')
            raise RuntimeError("killed mid-write")
    assert target.read_text() == '{"step": 0}'  # the old file, untouched
    assert os.listdir(target.parent) == ["metrics.json"]  # no temporary file left behind
    with atomic_write(target, durable=True) as handle:
        handle.write(b"new")
    assert target.read_bytes() == b"new"
    umask = os.umask(0o022)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # created like any file, not 0600


def test_one_ignore_index():
    from incrementer_fast.continual import IGNORE_INDEX as pipeline_ignore
    from incrementer_fast.continual import train

    assert IGNORE_INDEX == pipeline_ignore == train.IGNORE_INDEX == 255
