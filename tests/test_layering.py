"""The package's layers, read from every import statement (those inside functions and `if TYPE_CHECKING:` too): no
upward imports and no import cycles.

Layers, bottom to top: neutral helpers (errors, config, files, hub, pixels, weights, progress, image_io,
model_info) < components (data, text, vae, unet, latents, checkpoint, parallel, models, lora, training, demo) <
inference and evaluation (pipeline, generate, prompts_file, eval, serve). A function-level import is still an
import: it runs on the first call, and two modules that import each other that way are one module split in two files.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ldm"
NEUTRAL = {"ldm.errors", "ldm.config", "ldm.files", "ldm.hub", "ldm.pixels", "ldm.weights", "ldm.progress",
           "ldm.image_io", "ldm.model_info"}
INFERENCE = ("ldm.pipeline", "ldm.generate", "ldm.prompts_file", "ldm.eval", "ldm.serve")
# the one allowed upward import: stage-2 validation sampling runs the pipeline's one denoising loop, not a copy
ALLOWED_UPWARD = {"ldm.unet.validation_grid": {"ldm.pipeline"}}


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules, root: str = "ldm") -> set[str]:
    """The package modules `path` imports anywhere in it (`from ldm.a import b` counts as ldm.a and, if it is a
    module, ldm.a.b)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules}
    return {name for name in found if name.startswith(root + ".")}


def within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def package_modules(package: Path) -> dict[str, Path]:
    return {module_name(p, package): p for p in sorted(package.rglob("*.py"))}


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the package modules it imports. A module importing a package that contains it (`from ldm.pipeline
    import images` in ldm.pipeline.pipeline) is no cycle: the package is already in sys.modules, being initialised."""
    modules = package_modules(package)
    root = package.name
    return {name: {m for m in imports(path, modules, root) if m in modules and not within(name, (m,))}
            for name, path in modules.items()}


MODULES = package_modules(PACKAGE)
GRAPH = import_graph(PACKAGE)


def test_modules_are_found():
    assert {"ldm.files", "ldm.pipeline.pipeline", "ldm.unet.validation_grid", "ldm.models.spec"} <= MODULES.keys()


@pytest.mark.parametrize("name", sorted(n for n in MODULES if not within(n, INFERENCE)))
def test_library_layers_never_import_inference_code(name):
    upward = {m for m in GRAPH[name] if within(m, INFERENCE)}
    upward = {m for m in upward if not within(m, ALLOWED_UPWARD.get(name, ()))}
    assert not upward, f"{name} imports {sorted(upward)}: move what it needs to a lower layer"


@pytest.mark.parametrize("name", sorted(NEUTRAL))
def test_neutral_modules_import_only_neutral_ones(name):
    assert name in MODULES, f"{name} is listed as neutral but does not exist"
    assert GRAPH[name] <= NEUTRAL, sorted(GRAPH[name] - NEUTRAL)


def test_no_import_cycles_between_modules():
    cycle = find_cycle(GRAPH)
    assert cycle is None, " -> ".join(cycle)


def test_the_allowed_upward_imports_are_still_needed():
    for name, allowed in ALLOWED_UPWARD.items():
        assert {m for m in GRAPH[name] if within(m, allowed)}, f"{name} no longer imports {allowed}: drop the entry"


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


def test_a_cycle_through_a_function_level_import_is_found(tmp_path):
    """What the old top-level-only reading missed (generate <-> prompts_file): b imports a inside a function."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("def run():\n    from pkg.a import thing\n    return thing\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import x\n")
    graph = import_graph(pkg)
    assert graph["pkg.b"] == {"pkg.a"} and graph["pkg.c"] == {"pkg.a"}
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.a"]
