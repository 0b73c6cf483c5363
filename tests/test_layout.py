"""The package's three layers import downwards only: cli -> the PEFT method -> engine, and no module cycles."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "peft_greentrainer"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Package modules imported by ``path`` (absolute or relative, at any depth of the file)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            candidates = [module] + [f"{module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        found.update(c for c in candidates if c.startswith("peft_greentrainer"))
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def _layer(module: str) -> int:
    if module.startswith("peft_greentrainer.engine"):
        return 0
    if module.startswith("peft_greentrainer.cli"):
        return 2
    return 1


def test_layers_import_downwards_only():
    upward = [
        f"{module} -> {target}"
        for module, targets in _graph().items()
        for target in targets
        # the package's own __init__ (layer 1) may re-export; nothing in a lower layer may import a higher one
        if _layer(target) > _layer(module) and target != "peft_greentrainer.cli"
    ]
    assert not upward, upward


def test_engine_has_no_trainer_or_tuner_imports():
    """The engine may recognise PEFT's LoRA *layers* (they are units) but never drives a tuner or a Trainer."""
    forbidden = ("Trainer", "TrainerCallback", "PeftModel", "LoraModel", "get_peft_model", "BaseTuner")
    for path in (PACKAGE / "engine").glob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
        modules = {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not imported & set(forbidden), (path.name, imported & set(forbidden))
        assert not any(m.startswith(("transformers.trainer", "peft.peft_model")) for m in modules), path.name


def test_no_import_cycles():
    graph = _graph()
    # the package __init__ re-exports from its submodules, which import it back only through ``from . import x``
    graph = {m: {t for t in ts if t != "peft_greentrainer"} for m, ts in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in graph.get(node, ()):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles
