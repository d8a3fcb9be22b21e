"""The house, checked from its imports (DESIGN "Layers"): every import in the package (module level and
inside functions alike; a lazy import is still an arrow) goes from a higher layer to a lower one or
within a layer, and no chain of imports is a cycle. `triton_kernels` (installed as
fastcore_ai.triton_kernels) imports nothing from fastcore_ai."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "python" / "fastcore_ai"
KERNELS = ROOT / "triton_kernels"

# layer of each top-level part of the package; an import may only go to the same or a lower number
LAYERS = {
    "_version": 0,
    "_native": 0,
    "_validation": 0,
    "triton_kernels": 1,
    "reference": 1,
    "backends": 2,
    "_build_info": 2,
    "ops": 3,
    "nn": 4,
    "search": 5,
    "integrations": 5,
    "bench": 6,
    "__main__": 7,
}


def _modules():
    """{dotted module name: path} of fastcore_ai, triton_kernels included."""
    found = {}
    for base, prefix in ((PACKAGE, "fastcore_ai"), (KERNELS, "fastcore_ai.triton_kernels")):
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([prefix, *parts])] = path
    return found


def _imports(name, path, modules):
    """Every fastcore_ai module `name` imports (resolved to a module in `modules`)."""
    tree = ast.parse(path.read_text())
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rsplit(".", 1)[0]
    targets = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from M import x`: the arrow goes to M.x where that is a module of ours, else to M itself
            candidates = [
                f"{module}.{alias.name}" if f"{module}.{alias.name}" in modules else module for alias in node.names
            ]
        else:
            continue
        for candidate in candidates:
            if not candidate.startswith("fastcore_ai"):
                continue
            # the longest prefix that is a module of ours
            parts = candidate.split(".")
            while parts and ".".join(parts) not in modules:
                parts.pop()
            if parts and ".".join(parts) != name:
                targets.add(".".join(parts))
    return targets


def _layer(module):
    parts = module.split(".")
    if len(parts) == 1:
        return None  # the package root re-exports the public API: it sits on top of everything
    return LAYERS[parts[1]]


def _graph():
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_every_part_of_the_package_has_a_layer():
    unknown = sorted({m.split(".")[1] for m in _modules() if "." in m} - set(LAYERS))
    assert not unknown, f"parts of fastcore_ai with no layer in tests/test_layering.py: {unknown}"


def test_no_import_goes_up_a_layer():
    upward = []
    for module, targets in _graph().items():
        for target in targets:
            if target == "fastcore_ai":
                if module.startswith("fastcore_ai.triton_kernels") or _layer(module) is not None and _layer(module) < 7:
                    upward.append(f"{module} -> fastcore_ai (the package root)")
                continue
            if _layer(module) is not None and _layer(target) > _layer(module):
                upward.append(f"{module} (layer {_layer(module)}) -> {target} (layer {_layer(target)})")
    assert not upward, "imports that go up a layer:\n" + "\n".join(sorted(upward))


def test_triton_kernels_import_nothing_from_fastcore_ai():
    offenders = sorted(
        f"{m} -> {t}"
        for m, ts in _graph().items()
        if m.startswith("fastcore_ai.triton_kernels")
        for t in ts
        if not t.startswith("fastcore_ai.triton_kernels")
    )
    assert not offenders, offenders


def test_no_import_cycle():
    graph = _graph()
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if target == "fastcore_ai":
                continue
            if state.get(target) == "open":
                cycles.append(" -> ".join(stack[stack.index(target) :] + [target]))
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
