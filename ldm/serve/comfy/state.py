"""What ComfyUI's API remembers between requests: the prompts waiting and running, their history, the websocket
clients, and the three folders of files (input: uploads; output: SaveImage; temp: PreviewImage).

Its shapes are ComfyUI's (comfyanonymous/ComfyUI execution.py PromptQueue, server.py): a queue item is
`[number, prompt_id, graph, extra_data, outputs_to_execute]`; a history entry `{"prompt": item, "outputs": {node_id:
{"images": [{filename, subfolder, type}]}}, "status": {"status_str", "completed", "messages"}, "meta": {...}}`;
websocket messages `{"type": ..., "data": {...}}` as JSON text.

Messages are sent from the worker thread (`send`): each is handed to the event loop, which writes it to every socket
of that client id (or every socket, for `status`). History keeps the last `MAX_HISTORY` prompts.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_HISTORY = 1000  # prompts kept in /history (ComfyUI keeps 10000)
FOLDERS = ("input", "output", "temp")


@dataclass
class Item:
    number: int
    prompt_id: str
    graph: dict
    extra_data: dict
    outputs: list[str]
    cancel: threading.Event = field(default_factory=threading.Event)  # the worker job's

    def listed(self) -> list:
        return [self.number, self.prompt_id, self.graph, self.extra_data, self.outputs]


class Hub:
    """Websocket clients by id; `send` may be called from any thread."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.clients: dict[str, set[asyncio.Queue]] = {}

    def attach(self, client_id: str) -> asyncio.Queue:
        self.loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        self.clients.setdefault(client_id, set()).add(q)
        return q

    def detach(self, client_id: str, q: asyncio.Queue) -> None:
        queues = self.clients.get(client_id, set())
        queues.discard(q)
        if not queues:
            self.clients.pop(client_id, None)

    def send(self, event: str, data: dict[str, Any], client_id: str | None) -> None:
        """To `client_id`'s sockets; to all with None (ComfyUI's broadcast, used for `status`)."""
        if self.loop is None or self.loop.is_closed():  # no client yet, or the server has stopped
            return
        message = {"type": event, "data": data}
        self.loop.call_soon_threadsafe(self._put, message, client_id)

    def _put(self, message: dict, client_id: str | None) -> None:
        targets = self.clients.values() if client_id is None else [self.clients.get(client_id, set())]
        for queues in targets:
            for q in queues:
                q.put_nowait(message)


class State:
    def __init__(self, root: Path) -> None:
        self.root = root
        for name in FOLDERS:
            (root / name).mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.pending: OrderedDict[str, Item] = OrderedDict()
        self.running: Item | None = None
        self.history: OrderedDict[str, dict] = OrderedDict()
        self.number = 0
        self.hub = Hub()

    def folder(self, kind: str) -> Path:
        return self.root / kind

    def next_number(self) -> int:
        with self.lock:
            self.number += 1
            return self.number

    def status(self) -> dict[str, Any]:
        """ComfyUI's `status` message data and GET /prompt body."""
        with self.lock:
            remaining = len(self.pending) + (self.running is not None)
        return {"status": {"exec_info": {"queue_remaining": remaining}}}

    def queue_changed(self) -> None:
        self.hub.send("status", self.status(), None)

    def add(self, item: Item) -> None:
        with self.lock:
            self.pending[item.prompt_id] = item
        self.queue_changed()

    def start(self, prompt_id: str) -> Item | None:
        with self.lock:
            item = self.pending.pop(prompt_id, None)
            self.running = item
        self.queue_changed()
        return item

    def finish(self, item: Item, outputs: dict, status: str, messages: list, meta: dict) -> None:
        with self.lock:
            if self.running is item:
                self.running = None
            self.history[item.prompt_id] = {
                "prompt": item.listed(), "outputs": outputs, "meta": meta,
                "status": {"status_str": status, "completed": status == "success", "messages": messages}}
            while len(self.history) > MAX_HISTORY:
                self.history.popitem(last=False)
        self.queue_changed()

    def drop(self, prompt_id: str) -> None:
        """A prompt that never ran (deleted from the queue, or the server stopping)."""
        with self.lock:
            self.pending.pop(prompt_id, None)
        self.queue_changed()

    def delete_pending(self, ids: list[str] | None) -> None:
        """POST /queue: cancel waiting prompts (all with None); the worker skips them when their turn comes."""
        with self.lock:
            items = list(self.pending.values()) if ids is None else [self.pending[i] for i in ids
                                                                     if i in self.pending]
            for item in items:
                item.cancel.set()
                self.pending.pop(item.prompt_id, None)
        self.queue_changed()

    def queue(self) -> dict[str, list]:
        with self.lock:
            return {"queue_running": [self.running.listed()] if self.running else [],
                    "queue_pending": [i.listed() for i in self.pending.values()]}

    def get_history(self, prompt_id: str | None = None, max_items: int | None = None) -> dict:
        with self.lock:
            if prompt_id is not None:
                return {prompt_id: self.history[prompt_id]} if prompt_id in self.history else {}
            items = list(self.history.items())
            return dict(items[-max_items:] if max_items else items)

    def edit_history(self, clear: bool, delete: list[str]) -> None:
        with self.lock:
            if clear:
                self.history.clear()
            for prompt_id in delete:
                self.history.pop(prompt_id, None)


def now_ms() -> int:
    return int(time.time() * 1000)
