"""`ldm-serve`'s worker and app without a model: stopping with a full queue, a model switch whose reload fails too
(503, one line), and the request checks running off the event loop. Fake pipelines; the app in-process."""

from __future__ import annotations

import http.client
import json
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import free_port
from ldm.errors import UserError
from ldm.serve.api import Limits
from ldm.serve.app import create_app
from ldm.serve.worker import Job, ModelUnavailable, ServerStopping, Worker


class FakePipe:
    def __init__(self, name: str) -> None:
        self.name = name


def loader(broken: set[str], loads: list[str]):
    def load(name: str) -> FakePipe:
        loads.append(name)
        if name in broken:
            raise RuntimeError(f"CUDA out of memory loading {name}\nsecond line")
        return FakePipe(name)

    return load


def test_stop_fails_the_waiting_jobs_without_running_them():
    worker = Worker(loader(set(), []), "a", queue_size=2)
    worker.start()
    release, ran = threading.Event(), []
    running = worker.submit(Job("a", lambda pipe, on_step: release.wait(30)))
    while worker.progress()["state"]["job_count"] == 0:
        time.sleep(0.01)
    waiting = [worker.submit(Job("a", lambda pipe, on_step, i=i: ran.append(i))) for i in range(2)]  # full queue
    start = time.monotonic()
    stopper = threading.Thread(target=worker.stop)
    stopper.start()
    for job in waiting:
        with pytest.raises(ServerStopping, match="the server is shutting down; this job did not run"):
            job.future.result(timeout=5)
    assert time.monotonic() - start < 5  # not behind the full queue
    with pytest.raises(ServerStopping, match="no new job is taken"):
        worker.submit(Job("a", lambda pipe, on_step: None))
    release.set()
    stopper.join(timeout=10)
    assert not stopper.is_alive() and running.future.result(timeout=1) is True and ran == []


def test_a_failed_switch_whose_reload_fails_too_is_unavailable_until_a_model_loads():
    broken, loads = set(), []
    worker = Worker(loader(broken, loads), "a", queue_size=4)
    worker.start()
    try:
        broken.update({"b"})
        job = worker.submit(Job("b", lambda pipe, on_step: pipe.name))
        with pytest.raises(RuntimeError, match="CUDA out of memory loading b"):  # "a" reloaded: still serving
            job.future.result(timeout=5)
        assert worker.submit(Job("a", lambda pipe, on_step: pipe.name)).future.result(timeout=5) == "a"
        broken.update({"a"})
        for _ in range(2):  # the second job tries again, and says the same
            job = worker.submit(Job("b", lambda pipe, on_step: pipe.name))
            with pytest.raises(ModelUnavailable) as e:
                job.future.result(timeout=5)
            assert worker.pipeline is None and worker.model_name is None
        assert str(e.value) == "model 'b' failed to load (CUDA out of memory loading b); no model is loaded, the next " \
            "request tries again"
        broken.clear()  # the memory is back: the next job loads its model
        assert worker.submit(Job("b", lambda pipe, on_step: pipe.name)).future.result(timeout=5) == "b"
        assert loads == ["a", "b", "a", "b", "a", "b", "b"]
    finally:
        worker.stop()


@contextmanager
def app_server(worker: Worker):
    def spec(name: str):  # a model's facts as ldm.models.spec.ModelSpec has them, without a model on disk
        return SimpleNamespace(name=name, root=Path(name), vae_factor=8, default_size=32, train_timesteps=1000,
                               inpainting_unet=False, arch="sd")

    with app_server_for(create_app({"a": spec("a"), "b": spec("b")}, worker, Limits())) as port:
        yield port


@contextmanager
def app_server_for(app):
    """`app` served by uvicorn in a thread on a free 127.0.0.1 port; yields the port, stops it on exit."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.02)
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def request(port: int, method: str, path: str, body=None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=None if body is None else json.dumps(body),
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def test_no_model_loaded_is_503_and_checks_run_off_the_event_loop(monkeypatch):
    broken = {"b"}
    worker = Worker(loader(broken, []), "a", queue_size=4)
    worker.start()
    try:
        with app_server(worker) as port:
            # a request check that blocks (a slow --lora-dir): /progress still answers meanwhile
            def slow_lora_check(options, prompt, lora_dir):
                time.sleep(1.5)
                raise UserError("the prompt names LoRA 'x' (<lora:x:1>): pass --lora-dir\nsecond line")

            monkeypatch.setattr("ldm.serve.api.check_lora_inputs", slow_lora_check)
            slow: dict = {}
            t = threading.Thread(target=lambda: slow.update(r=request(port, "POST", "/sdapi/v1/txt2img",
                                                                      {"prompt": "<lora:x:1>"})))
            t.start()
            time.sleep(0.3)
            start = time.monotonic()
            assert request(port, "GET", "/sdapi/v1/progress")[0] == 200
            assert time.monotonic() - start < 0.8
            t.join(timeout=10)
            assert slow["r"] == (422, {"error": "UserError", "detail": "the prompt names LoRA 'x' (<lora:x:1>): "
                                                                       "pass --lora-dir"})
            monkeypatch.undo()

            broken.add("a")  # "b" fails, and reloading "a" fails too
            body = {"prompt": "a", "steps": 1, "override_settings": {"sd_model_checkpoint": "b"}}
            details = []
            for _ in range(2):  # no AttributeError 500 on the next request: the same 503
                status, error = request(port, "POST", "/sdapi/v1/txt2img", body)
                assert status == 503 and error["error"] == "ModelUnavailable", error
                details.append(error["detail"])
            assert details[0] == ("model 'b' failed to load (CUDA out of memory loading b) and reloading 'a' failed "
                                  "too (CUDA out of memory loading a); no model is loaded, the next request tries again")
            assert details[1].startswith("model 'b' failed to load (CUDA out of memory loading b); no model is loaded")
    finally:
        worker.stop()


def test_single_files_are_listed_by_stem_with_their_header_values(tmp_path):
    """`--model FILE.safetensors` and `*.safetensors` under --models-dir: sizes and timesteps from the file's header,
    as the demo directory's (the file is the demo model written by ldm-convert's function)."""
    from ldm.demo import MODEL_DIR, NAME
    from ldm.serve.models import list_models
    from ldm.singlefile.save import directory_to_file

    models_dir = tmp_path / "models"
    models_dir.mkdir()
    (models_dir / "notes.txt").write_text("not a model")
    directory_to_file(MODEL_DIR, models_dir / "shapes.safetensors")
    listed = list_models([NAME], str(models_dir))
    assert list(listed) == [NAME, "shapes"]
    demo, file = listed[NAME], listed["shapes"]
    assert file.root == models_dir / "shapes.safetensors" and file.name == str(file.root)
    assert (file.vae_factor, file.default_size, file.train_timesteps) == (demo.vae_factor, demo.default_size,
                                                                         demo.train_timesteps) == (demo.vae_factor, 32, 1000)
    with pytest.raises(UserError, match=r"^two models are named 'shapes' \(.*shapes.safetensors and .*\); rename"):
        list_models([str(models_dir / "shapes.safetensors")], str(models_dir))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no model .a directory with a model_index.json or a .safetensors"):
        list_models(None, str(tmp_path / "empty"))
