"""The layout's promises: dependencies run one way, and no module imports itself back.

Tiers, top to bottom (a module may import from its own tier or below):

    scripts       train.py, test.py, codec.py
    applications  utils/training/, utils/evaluation/, utils/cli.py, datasets/
    models        models/ (networks, their coding, the contract, the registry)
    machinery     utils/coding/, utils/stitching/, utils/memory.py, utils/device.py,
                  utils/image_io.py, utils/atomic.py, utils/folder_lock.py

Every import counts, function-level ones included.
"""

import ast
import os
from typing import Dict, Set

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"train", "test", "codec"}
PACKAGES = ("models", "utils", "datasets")


def _module_name(path: str) -> str:
    relative = os.path.relpath(path, REPO)[: -len(".py")].replace(os.sep, ".")
    return relative[: -len(".__init__")] if relative.endswith(".__init__") else relative


def _project_modules() -> Dict[str, str]:
    modules = {name: os.path.join(REPO, f"{name}.py") for name in SCRIPTS}
    for package in PACKAGES:
        for folder, _, files in os.walk(os.path.join(REPO, package)):
            for file in files:
                if file.endswith(".py"):
                    path = os.path.join(folder, file)
                    modules[_module_name(path)] = path
    return modules


def _imports(path: str, modules: Set[str]) -> Set[str]:
    """Project modules ``path`` imports.

    ``from pkg import sub`` counts as ``pkg.sub``.
    """
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                if submodule in modules:
                    found.add(submodule)
                elif node.module in modules:
                    found.add(node.module)
    return found


MODULES = _project_modules()
GRAPH = {name: _imports(path, set(MODULES)) - {name} for name, path in MODULES.items()}


def _tier(module: str) -> int:
    if module in SCRIPTS:
        return 3
    applications = ("utils.training", "utils.evaluation", "datasets")
    if module.startswith(applications) or module in ("utils.cli", "utils.output_paths"):
        return 2
    if module.startswith("models"):
        return 1
    return 0


def test_the_graph_covers_the_project():
    assert {
        "models.base",
        "utils.coding.container",
        "utils.stitching.planner",
        "utils.training.loop",
        "utils.evaluation.runs",
        "codec",
    } <= set(GRAPH)
    assert "models.cps.coding" in GRAPH["models.cps.network"]


def test_no_module_imports_a_higher_tier():
    upward = sorted(
        f"{module} -> {target}"
        for module, targets in GRAPH.items()
        for target in targets
        if _tier(target) > _tier(module)
    )
    assert not upward


def test_there_is_no_import_cycle():
    state: Dict[str, int] = {}  # 1: on the current path, 2: finished

    def visit(module, path):
        state[module] = 1
        for target in sorted(GRAPH[module]):
            if state.get(target) == 1:
                cycle = path[path.index(target) :] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])


def test_code_reaches_models_through_the_contract_not_attribute_probes():
    """Outside tests and benchmarks, ``hasattr`` appears at most once (the POPS geometry
    asking a layer whether it declares its own path)."""
    probes = [
        f"{name}:{node.lineno}"
        for name, path in MODULES.items()
        for node in ast.walk(ast.parse(open(path).read()))
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "hasattr"
    ]
    assert len(probes) <= 1, probes


MODEL_NAMES = {"model", "raw", "net", "codec"}


def _names_a_model(node: ast.expr) -> bool:
    """``model``, ``raw``, ... or ``self.model``: the names the code gives a model."""
    if isinstance(node, ast.Attribute):
        return node.attr in MODEL_NAMES
    return isinstance(node, ast.Name) and node.id in MODEL_NAMES


def test_no_member_of_a_model_is_read_with_a_fallback():
    """``getattr(model, "registry_name", default)`` would hide a model that breaks the
    contract (a checkpoint labelled with the fallback): contract members are read
    directly."""
    fallbacks = [
        f"{name}:{node.lineno}"
        for name, path in MODULES.items()
        for node in ast.walk(ast.parse(open(path).read()))
        if isinstance(node, ast.Call)
        and getattr(node.func, "id", None) == "getattr"
        and len(node.args) == 3
        and _names_a_model(node.args[0])
    ]
    assert fallbacks == []


def test_training_does_not_import_evaluation():
    """Figures, JSON and checkpoints that both need live in the machinery tier; training
    code must stay importable without the evaluation stack (metrics, codecs, plots)."""
    crossing = sorted(
        f"{module} -> {target}"
        for module, targets in GRAPH.items()
        if module.startswith("utils.training")
        for target in targets
        if target.startswith("utils.evaluation")
    )
    assert crossing == []
