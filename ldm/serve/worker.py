"""The one generation worker: a thread that owns the device and the loaded model, fed by a bounded queue.

Requests never touch the model themselves: each becomes a `Job` (a function of the pipeline) that waits in the
queue; when the queue is full, `submit` refuses at once (the API answers 429) instead of letting waits grow without
bound. The worker runs one job at a time, so jobs never compete for the device's memory, and keeps one model
loaded, switching only when a job asks for another of the listed models.

Interrupting (`POST /sdapi/v1/interrupt`, or a client that went away) sets the job's `cancel` event; the pipeline
calls `on_step` after every U-Net evaluation and that raises `Interrupted` there, so the device is free after the
current step. The same hook feeds `/sdapi/v1/progress`.

Stopping fails every job still waiting (`ServerStopping`) instead of running it. A model that fails to load leaves
the previous one loaded; if reloading that fails too, no model is loaded and each job tries to load its own again,
answering `ModelUnavailable` (503, naming the model) while that fails.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger(__name__)

StepHook = Callable[[int, int], None]  # on_step(done, total)


class QueueFull(Exception):
    """Every place in the queue is taken."""


class Interrupted(Exception):
    """Raised from the step hook to stop the running job at the next step."""


class ServerStopping(Exception):
    """The server is shutting down: a job that was still waiting never ran, and no new job is taken."""


class ModelUnavailable(Exception):
    """No model is loaded: the job's model failed to load, and so did the one before it."""


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@dataclass
class Job:
    model: str  # one of the listed models' names
    run: Callable[[Any, StepHook], Any]  # run(pipeline, on_step) -> result, called in the worker thread
    description: str = "txt2img"
    future: Future = field(default_factory=Future)
    cancel: threading.Event = field(default_factory=threading.Event)


@dataclass
class _State:
    job: str = ""
    job_timestamp: str = "0"
    sampling_step: int = 0
    sampling_steps: int = 0
    started: float = 0.0
    interrupted: bool = False


class Worker:
    def __init__(self, load: Callable[[str], Any], first_model: str, queue_size: int) -> None:
        self._load = load  # model name -> Pipeline
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=queue_size)
        self._lock = threading.Lock()
        self._state = _State()
        self._current: Job | None = None
        self._stopping = False
        self.model_name: str | None = first_model  # None only after a failed switch whose reload failed too
        self.pipeline = load(first_model)  # at start-up, so the first request does not wait for it
        self._thread = threading.Thread(target=self._loop, name="ldm-serve-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Refuse new jobs, fail the waiting ones, stop the running one at its next step, end the thread."""
        self._stopping = True
        self.interrupt()
        while True:
            self._fail_waiting()
            try:
                self._queue.put_nowait(None)
                break
            except queue.Full:  # a submit that raced with _stopping took the freed place: drain again
                continue
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _fail_waiting(self) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not None and not job.future.done():
                job.future.set_exception(ServerStopping("the server is shutting down; this job did not run"))

    def submit(self, job: Job) -> Job:
        if self._stopping:
            raise ServerStopping("the server is shutting down; no new job is taken")
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"the queue is full ({self._queue.maxsize} waiting); retry later") from None
        return job

    def interrupt(self) -> None:
        """Stop the running job at its next step (queued jobs still run, as in A1111)."""
        with self._lock:
            if self._current is not None:
                self._current.cancel.set()

    def queued(self) -> int:
        return self._queue.qsize()

    def progress(self) -> dict[str, Any]:
        """A1111's /sdapi/v1/progress body."""
        with self._lock:
            s, busy = self._state, self._current is not None
            state = {
                "skipped": False, "interrupted": s.interrupted, "stopping_generation": False, "job": s.job,
                "job_count": 1 if busy else 0, "job_timestamp": s.job_timestamp, "job_no": 0,
                "sampling_step": s.sampling_step, "sampling_steps": s.sampling_steps, "queued": self._queue.qsize(),
            }
            if not busy or s.sampling_steps == 0:
                return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None}
            progress = s.sampling_step / s.sampling_steps
            elapsed = time.time() - s.started
            eta = elapsed / progress - elapsed if progress > 0 else 0.0
            return {"progress": progress, "eta_relative": eta, "state": state, "current_image": None,
                    "textinfo": f"step {s.sampling_step}/{s.sampling_steps}"}

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
                self._current = job
                self._state = _State(job=job.description, job_timestamp=time.strftime("%Y%m%d%H%M%S"),
                                     started=time.time())
            try:
                if self._stopping:  # taken between stop()'s drain and its sentinel
                    raise ServerStopping("the server is shutting down; this job did not run")
                if job.cancel.is_set():  # cancelled while it waited (its client went away)
                    raise Interrupted()
                if self.pipeline is None or job.model != self.model_name:
                    self._switch(job.model)
                job.future.set_result(job.run(self.pipeline, self._hook(job)))
            except BaseException as e:  # noqa: BLE001 - every failure goes back to the waiting request
                job.future.set_exception(e)
            finally:
                with self._lock:
                    self._current = None
                del job  # the request handler holds the result; nothing of it stays here
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()

    def _switch(self, name: str) -> None:
        log.info("switching model to %s", name)
        # free the old model's memory before loading the new one; None: no model is loaded (see ModelUnavailable)
        old = self.model_name if self.pipeline is not None else None
        self.pipeline = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        try:
            self.pipeline = self._load(name)
        except Exception as e:
            if old is None:
                self.model_name = None
                raise ModelUnavailable(f"model '{name}' failed to load ({first_line(e)}); no model is loaded, "
                                       "the next request tries again") from e
            try:
                self.pipeline = self._load(old)  # keep serving the model that worked
            except Exception as e2:
                self.model_name = None
                log.exception("reloading %s failed", old)
                raise ModelUnavailable(f"model '{name}' failed to load ({first_line(e)}) and reloading '{old}' "
                                       f"failed too ({first_line(e2)}); no model is loaded, the next request "
                                       "tries again") from e
            raise
        self.model_name = name

    def _hook(self, job: Job) -> StepHook:
        def on_step(done: int, total: int) -> None:
            with self._lock:
                self._state.sampling_step, self._state.sampling_steps = done, total
            if job.cancel.is_set():
                with self._lock:
                    self._state.interrupted = True
                raise Interrupted()

        return on_step
