"""JSON without pickle for the non-tensor parts of a checkpoint: tensors, tuples, non-string keys and inf/nan
round-trip exactly.

Plain JSON values stay as they are. Everything else becomes a one-key object with a tag: `{"__tuple__": [...]}`,
`{"__float__": "inf"}`, `{"__pairs__": [[key, value], ...]}` (dicts with non-string keys, e.g. optimizer param ids),
`{"__counter__": ...}`, `{"__tensor__": ...}` and `{"__ndarray__": ...}` (a key into the safetensors file the JSON
travels with, or inline hex bytes). Dicts whose keys look like tags are stored as pairs, so decoding is unambiguous.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

_TAGS = ("__tensor__", "__ndarray__", "__tuple__", "__float__", "__pairs__", "__counter__")
PathKey = tuple[Any, ...]


class Unencodable(Exception):
    def __init__(self, path: PathKey, value: Any):
        super().__init__(f"value at '{'/'.join(map(str, path)) or '.'}' has type {type(value).__name__}")
        self.path, self.value = path, value


class Encoder:
    """Turns a nested state into JSON-able data.

    With a `tensors` dict, tensors are moved there under their path ("state/0/exp_avg") and referenced by key;
    without one they are inlined as hex bytes (fine for the few small tensors in schedulers or `state`).
    With `drop_unencodable`, values that cannot be stored (e.g. functions) become None and their paths are listed
    in `dropped`, so loading can keep the live object's value there instead of overwriting it.
    """

    def __init__(self, tensors: dict[str, torch.Tensor] | None = None, drop_unencodable: bool = False):
        self.tensors = tensors
        self.drop_unencodable = drop_unencodable
        self.dropped: list[list[Any]] = []

    def encode(self, value: Any, path: PathKey = ()) -> Any:
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, str):
            return str(value)  # also str-based enums
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float):
            return float(value) if math.isfinite(value) else {"__float__": repr(float(value))}
        if isinstance(value, torch.Tensor):
            return {"__tensor__": self._tensor(value, path)}
        if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
            return {"__ndarray__": self._tensor(torch.from_numpy(np.ascontiguousarray(value).copy()), path)}
        if isinstance(value, np.generic):
            return self.encode(value.item(), path)
        if isinstance(value, tuple):
            return {"__tuple__": [self.encode(v, path + (i,)) for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [self.encode(v, path + (i,)) for i, v in enumerate(value)]
        if isinstance(value, Mapping):
            return self._mapping(value, path)
        if self.drop_unencodable:
            self.dropped.append(list(path))
            return None
        raise Unencodable(path, value)

    def _mapping(self, value: Mapping[Any, Any], path: PathKey) -> Any:
        plain = all(isinstance(k, str) for k in value) and not any(k in _TAGS for k in value)
        if plain and not isinstance(value, Counter):
            return {k: self.encode(v, path + (k,)) for k, v in value.items()}
        # Keys that JSON would turn into strings (optimizer param ids are ints) are kept as [key, value] pairs.
        pairs = [[self.encode(k, path + ("<key>",)), self.encode(v, path + (k,))] for k, v in value.items()]
        return {"__counter__" if isinstance(value, Counter) else "__pairs__": pairs}

    def _tensor(self, tensor: torch.Tensor, path: PathKey) -> Any:
        t = tensor.detach().cpu()
        if self.tensors is None:
            raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
            return {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "hex": raw.hex()}
        key = "/".join(str(p) for p in path) or "tensor"
        unique, n = key, 1
        while unique in self.tensors:  # e.g. dict keys 1 and "1" at the same level
            unique, n = f"{key}#{n}", n + 1
        self.tensors[unique] = t
        return unique


def decode(
    data: Any,
    tensors: Mapping[str, torch.Tensor] | None = None,
    dropped: Iterable[Iterable[Any]] = (),
    live: Any = None,
) -> Any:
    """Inverse of `Encoder.encode`; values at `dropped` paths are taken from `live` (the object's current state)."""
    dropped_paths = {tuple(p) for p in dropped}

    def tensor(ref: Any) -> torch.Tensor:
        if isinstance(ref, str):
            if tensors is None or ref not in tensors:
                raise ValueError(f"tensor {ref!r} is missing from the checkpoint file")
            return tensors[ref]
        dtype = getattr(torch, ref["dtype"], None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown tensor dtype {ref['dtype']!r}")
        raw = bytes.fromhex(ref["hex"])
        if not raw:
            return torch.empty(ref["shape"], dtype=dtype)
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(ref["shape"]).clone()

    def walk(value: Any, path: PathKey) -> Any:
        if path in dropped_paths:
            return _lookup(live, path)
        if isinstance(value, list):
            return [walk(v, path + (i,)) for i, v in enumerate(value)]
        if not isinstance(value, dict):
            return value
        if len(value) == 1:
            (tag, inner), = value.items()
            if tag == "__tensor__":
                return tensor(inner)
            if tag == "__ndarray__":
                return tensor(inner).numpy()
            if tag == "__tuple__":
                return tuple(walk(v, path + (i,)) for i, v in enumerate(inner))
            if tag == "__float__":
                return float(inner)
            if tag in ("__pairs__", "__counter__"):
                items = {}
                for k, v in inner:
                    key = walk(k, path + ("<key>",))
                    items[key] = walk(v, path + (key,))
                return Counter(items) if tag == "__counter__" else items
        return {k: walk(v, path + (k,)) for k, v in value.items()}

    return walk(data, ())


def _lookup(tree: Any, path: PathKey) -> Any:
    node = tree
    for key in path:
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            return None
    return node


def encode_metadata(encoder: Encoder, value: Any) -> str:
    return json.dumps(encoder.encode(value), allow_nan=False, separators=(",", ":"))
