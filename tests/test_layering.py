"""The package's layers, read from its import statements: no upward imports and no import cycles.

Layers, bottom to top: neutral helpers (errors, config, files, hub, pixels, weights, progress) < components (data,
text, vae, unet, latents, checkpoint, parallel, training) < inference and evaluation (pipeline, generate, eval).
Stage-2 validation sampling (`ldm.unet.samples`) is the one component allowed to call the pipeline: it runs the
pipeline's one denoising loop rather than a copy of it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ldm"
NEUTRAL = {"ldm.errors", "ldm.config", "ldm.files", "ldm.hub", "ldm.pixels", "ldm.weights", "ldm.progress"}
INFERENCE = ("ldm.pipeline", "ldm.generate", "ldm.prompts_file", "ldm.eval", "ldm.demo", "ldm.serve")
MAY_CALL_THE_PIPELINE = {"ldm.unet.samples"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, *, top_level_only: bool = False) -> set[str]:
    """The ldm modules `path` imports (`from ldm.a import b` counts as ldm.a and, if it is a module, ldm.a.b)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES}
    return {name for name in found if name == "ldm" or name.startswith("ldm.")} - {"ldm"}


def within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def test_modules_are_found():
    assert {"ldm.files", "ldm.pipeline.pipeline", "ldm.unet.samples"} <= MODULES.keys()


@pytest.mark.parametrize("name", sorted(n for n in MODULES if not within(n, INFERENCE)))
def test_library_layers_never_import_inference_code(name):
    upward = {m for m in imports(MODULES[name]) if within(m, INFERENCE)}
    if name in MAY_CALL_THE_PIPELINE:
        upward = {m for m in upward if not within(m, ("ldm.pipeline",))}
    assert not upward, f"{name} imports {sorted(upward)}: move what it needs to a neutral module"


@pytest.mark.parametrize("name", sorted(NEUTRAL))
def test_neutral_modules_import_only_neutral_ones(name):
    assert name in MODULES, f"{name} is listed as neutral but does not exist"
    assert imports(MODULES[name]) <= NEUTRAL, sorted(imports(MODULES[name]) - NEUTRAL)


def test_no_import_cycles_between_modules():
    # a module importing its own package (`from ldm.pipeline import images` in ldm.pipeline.pipeline) is no cycle:
    # the package is already in sys.modules, being initialised
    graph = {name: {m for m in imports(path, top_level_only=True) if m in MODULES and not within(name, (m,))}
             for name, path in MODULES.items()}
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of `graph` as a path that starts and ends on the same node, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
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


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
