"""Test-wide setup: nothing may wait on the network, and accelerate's global state is reset between runs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# before any Hugging Face library is imported: they read these once, at import time
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
# tests import it from here (`from conftest import free_port`); it lives in serve_server.py, a stdlib-only helper
# that bench/bench_serve.py imports outside pytest, which must not pull in this file's torch and offline settings
from serve_server import free_port  # noqa: E402

# One torch thread per pytest-xdist worker when the workers fill the cores (the README's command: 2 workers on 2
# cores): the tests' tiny models have kernels too small to split, and two workers' OpenMP threads spin-waiting on each
# other's cores make a 20 ms forward pass take seconds (see `one_torch_thread`). Alone (-n 0): up to 2 threads.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, torch.get_num_threads(), len(os.sched_getaffinity(0)) // _WORKERS)))

# pytest-xdist hands whole files to its two workers in collection order (`--dist loadfile --no-loadscope-reorder`
# in pyproject.toml): the longest files go first, so that no long file starts when the other worker is nearly done
# (longest-processing-time-first scheduling). Measured with `--durations=0`, summed per file (docs/development.md).
LONGEST_FIRST = ["test_sharded_training.py", "test_faults.py", "test_train_vae.py", "test_train_ldm.py",
                 "test_train_sdxl.py", "test_demo_model.py", "test_lora_train.py", "test_generate_cli.py"]


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep pytest's order


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models' kernels are too small to split: with other jobs on 2 shared cores, two OpenMP threads spin-wait
    on each other and a 20 ms U-Net forward pass takes seconds. Use with pytest.mark.usefixtures."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run(main, argv: list[str], capsys, *, split: bool = True) -> tuple[int, list[str] | str, str]:
    """Run a CLI's main(argv) in-process -> (exit code, stdout lines, stderr); `capsys` is pytest's fixture.
    split=False: stdout as one string."""
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out.splitlines() if split else out, err


def reset_accelerate_state() -> None:
    """Forget accelerate's process-wide state, so the next in-process training run creates its own Accelerator."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture
def fresh_accelerate():
    """Training scripts run in-process create an Accelerator each; its state is a process-wide singleton."""
    yield
    reset_accelerate_state()


def one_process(rank: int = 0, world: int = 1):
    """A stand-in for an `Accelerator` of one CPU process, for validation code called in a test: its `reduce`
    returns the tensor as it is (what process `rank` of `world` contributes) and keeps a copy in `reduced`."""
    import contextlib
    from types import SimpleNamespace

    reduced: list[torch.Tensor] = []

    def reduce(tensor: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        reduced.append(tensor.clone())
        return tensor.clone()

    return SimpleNamespace(process_index=rank, num_processes=world, is_main_process=rank == 0,
                           device=torch.device("cpu"), reduce=reduce, reduced=reduced,
                           autocast=contextlib.nullcontext, log=lambda values, step=None: None)


def accelerate_launch(script: Path, *args: str, processes: int = 2) -> list[str]:
    """The command for a real multi-process CPU run (gloo): the script must be given train.cpu=true."""
    port = free_port()  # for the rendezvous
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(port), str(script), *args]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The tiny random SD model (ldm.pipeline.tiny.save_tiny_model), written once per session and shared by every
    test that asks for it: read it only. A test that adds or changes files in a model directory makes its own."""
    from ldm.pipeline.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def tiny_inpaint_model(tmp_path_factory) -> Path:
    """`tiny_model`'s inpainting twin (a 9-channel U-Net), written once per session: read it only."""
    from ldm.pipeline.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-sd-inpaint"), unet_in_channels=9)


@pytest.fixture(scope="session")
def tiny_sdxl_model(tmp_path_factory) -> Path:
    """The tiny random SDXL base (ldm.pipeline.tiny.save_tiny_sdxl_model), written once per session: read it only."""
    from ldm.pipeline.tiny import save_tiny_sdxl_model

    return save_tiny_sdxl_model(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="session")
def tiny_sdxl_refiner(tmp_path_factory) -> Path:
    """The tiny SDXL refiner (bigG-like text tower only, aesthetic-score time ids), once per session: read only."""
    from ldm.pipeline.tiny import save_tiny_sdxl_model

    return save_tiny_sdxl_model(tmp_path_factory.mktemp("tiny-sdxl-refiner"), kind="refiner")


@pytest.fixture(scope="session")
def tiny_sdxl_inpaint_model(tmp_path_factory) -> Path:
    """The tiny SDXL base's inpainting twin (a 9-channel U-Net), once per session: read it only."""
    from ldm.pipeline.tiny import save_tiny_sdxl_model

    return save_tiny_sdxl_model(tmp_path_factory.mktemp("tiny-sdxl-inpaint"), kind="inpaint")


@pytest.fixture(scope="session")
def serve_server():
    """One real `ldm-serve` (demo model, basic auth, small limits) for test_serve_api.py and test_serve_page.py."""
    from serve_server import shared_server

    with shared_server() as server:
        yield server
