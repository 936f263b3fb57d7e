"""One home per mechanism, read from the code: who builds a generation request, who opens a model.

A new entry point that builds its own request or loads a model's parts itself fails here; the fix is to call the
home (`GenerationRequest.layered` + `resolve`, `inspect_model` + `Pipeline.open`), or, for a new source of requests,
to add it to the list below on purpose.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for folder in ("ldm", "train") for p in (ROOT / folder).rglob("*.py"))

# the request's sources: the keyword API, the CLI (+ PNG), prompt lists, the A1111 API
BUILD_REQUESTS = {"ldm/pipeline/pipeline.py", "ldm/generate.py", "ldm/prompts_file.py",
                  "ldm/serve/api.py", "ldm/serve/comfy/routes.py"}
# calls that open a model (find it, check its files, load its parts) -> the only files that may make them
OPENERS = {
    "resolve_model": {"ldm/models/spec.py"},
    # ldm-convert reads a directory's tensors (SD and SDXL)
    "check_model_dir": {"ldm/models/spec.py", "ldm/singlefile/save.py", "ldm/singlefile/save_sdxl.py"},
    "load_components": {"ldm/models/load.py", "ldm/pipeline/pipeline.py"},
    "load_single_file": {"ldm/models/load.py", "ldm/singlefile/load.py", "ldm/singlefile/save.py"},
    "load_unet_file": {"ldm/models/load.py", "ldm/singlefile/load.py"},
    "Pipeline": {"ldm/pipeline/pipeline.py", "ldm/unet/validation_grid.py"},  # validation samples: parts already in memory
    # IP-Adapters: put on the U-Net (and taken off) by one switch the pipeline calls, with diffusers' loader
    "load_ip_adapters": {"ldm/models/ip_adapter.py"},
    "switch_ip_adapters": {"ldm/models/ip_adapter.py", "ldm/pipeline/pipeline.py"},
    "_load_ip_adapter_weights": {"ldm/ip_adapter/adapters.py"},
}


def calls(path: Path) -> set[str]:
    """Names called in `path`: `f(...)` as 'f', `A.b(...)` as 'A.b' and 'b'."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name):
                out.add(f.id)
            elif isinstance(f, ast.Attribute):
                out.add(f.attr)
                if isinstance(f.value, ast.Name):
                    out.add(f"{f.value.id}.{f.attr}")
    return out


CALLS = {str(p.relative_to(ROOT)): calls(p) for p in SOURCES}


def test_requests_are_built_only_by_their_sources():
    builders = {f for f, c in CALLS.items() if {"GenerationRequest", "GenerationRequest.layered"} & c}
    assert builders == BUILD_REQUESTS


@pytest.mark.parametrize("name", sorted(OPENERS))
def test_models_are_opened_only_in_their_home(name):
    callers = {f for f, c in CALLS.items() if name in c}
    assert callers <= OPENERS[name], f"{sorted(callers - OPENERS[name])} call {name}: use inspect_model + Pipeline.open"


def test_the_opener_check_sees_a_call(tmp_path):
    fake = tmp_path / "x.py"
    fake.write_text("from ldm.models.spec import resolve_model\n\ndef f():\n    return resolve_model('m')\n")
    assert "resolve_model" in calls(fake)
    fake.write_text("def g(pipe):\n    return pipe.Pipeline.from_pretrained('m')\n")
    assert {"from_pretrained", "Pipeline"} - calls(fake) == {"Pipeline"}
