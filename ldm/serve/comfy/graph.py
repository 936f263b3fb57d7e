"""A ComfyUI API-format graph, checked whole before anything is queued, with ComfyUI's error shapes.

A graph (what `POST /prompt` carries in `prompt`) is `{node_id: {"class_type": NAME, "inputs": {name: value}}}`; an
input's value is a widget value (int, float, str, bool) or a link `[source_node_id, output_slot]`.

`validate` answers as ComfyUI's `execution.validate_prompt` does (comfyanonymous/ComfyUI execution.py): either no
error, or `error = {"type", "message", "details", "extra_info"}` and `node_errors = {node_id: {"errors": [...],
"dependent_outputs": [...], "class_type"}}`, with ComfyUI's error types: `no_prompt`, `invalid_prompt` (a node with
no class_type, or an unknown one), `prompt_no_outputs`, `prompt_outputs_failed_validation` (then per node:
`required_input_missing`, `bad_linked_input`, `return_type_mismatch`, `invalid_input_type`,
`value_smaller_than_min`, `value_bigger_than_max`, `value_not_in_list`).

Where ComfyUI would crash or loop instead, this answers in the same shape:
- an unknown class_type also gets a `node_errors` entry naming the node and its class (ComfyUI's is empty);
- a link to a node that is not in the graph, or to an output slot the node lacks: `bad_linked_input`, saying which;
- a cycle: `dependency_cycle` on each node of it (ComfyUI's execution-time error type), found without recursion;
- over `MAX_NODES` nodes: `invalid_prompt`, refused before any node is looked at, so the cost is bounded.
Like ComfyUI, outputs whose nodes are all valid still run when others fail (`good_outputs`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ldm.serve.comfy.nodes import NodeType

MAX_NODES = 1000  # ComfyUI sets none; its default text-to-image graph has 7 nodes


@dataclass
class Checked:
    error: dict[str, Any] | None  # None: the graph (its good outputs) may run
    node_errors: dict[str, dict[str, Any]] = field(default_factory=dict)
    good_outputs: list[str] = field(default_factory=list)

    def body(self) -> dict[str, Any]:
        """ComfyUI's 400 body for `POST /prompt`."""
        return {"error": self.error, "node_errors": self.node_errors}


def _error(kind: str, message: str, details: str = "", **extra: Any) -> dict[str, Any]:
    return {"type": kind, "message": message, "details": details, "extra_info": extra}


def validate(graph: Any, types: dict[str, NodeType]) -> Checked:
    """Check a whole graph against the node table; see the module docstring for the answers."""
    if not isinstance(graph, dict) or not graph:
        return Checked(_error("no_prompt", "No prompt provided", "No prompt provided"))
    if len(graph) > MAX_NODES:
        return Checked(_error("invalid_prompt", f"Prompt has {len(graph)} nodes; this server runs at most "
                              f"{MAX_NODES}", f"{len(graph)} > {MAX_NODES}"))
    outputs = []
    for node_id, node in graph.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
            return Checked(_error("invalid_prompt", "Cannot execute because a node is missing the class_type "
                                  "property.", f"Node ID '#{node_id}'"))
        class_type = node["class_type"]
        if class_type not in types:
            message = f"Cannot execute because node {class_type} does not exist."
            return Checked(_error("invalid_prompt", message, f"Node ID '#{node_id}'"),
                           {str(node_id): {"errors": [_error("invalid_prompt", message, f"Node ID '#{node_id}'")],
                                           "dependent_outputs": [], "class_type": class_type}})
        if not isinstance(node.get("inputs", {}), dict):
            return Checked(_error("invalid_prompt", "Cannot execute because a node's inputs are not an object.",
                                  f"Node ID '#{node_id}'"))
        if types[class_type].output_node:
            outputs.append(node_id)
    if not outputs:
        return Checked(_error("prompt_no_outputs", "Prompt has no outputs"))

    reasons = {node_id: _node_errors(graph, node_id, types) for node_id in graph}
    for node_id in _cycle_nodes(graph):
        reasons[node_id].append(_error("dependency_cycle", "Dependency cycle detected", f"Node ID '#{node_id}'",
                                       node_id=node_id))
    node_errors: dict[str, dict[str, Any]] = {}
    good, failed = [], []
    for out in outputs:
        bad = [n for n in _upstream(graph, out) if reasons[n]]
        if not bad:
            good.append(out)
            continue
        failed.append(out)
        for n in bad:
            entry = node_errors.setdefault(n, {"errors": reasons[n], "dependent_outputs": [],
                                               "class_type": graph[n]["class_type"]})
            entry["dependent_outputs"].append(out)
    if good:
        return Checked(None, node_errors, good)
    details = "\n".join(f"{e['message']}: {e['details']}" for n in node_errors for e in node_errors[n]["errors"])
    return Checked(_error("prompt_outputs_failed_validation", "Prompt outputs failed validation", details),
                   node_errors)


def is_link(value: Any) -> bool:
    return isinstance(value, list)


def _node_errors(graph: dict, node_id: str, types: dict[str, NodeType]) -> list[dict[str, Any]]:
    """One node's own errors (its inputs), as ComfyUI's validate_inputs words them."""
    node = graph[node_id]
    t = types[node["class_type"]]
    inputs = node.get("inputs", {})
    errors = []
    for name, info in [*t.required.items(), *((k, v) for k, v in t.optional.items() if k in inputs)]:
        if name not in inputs:
            errors.append(_error("required_input_missing", "Required input is missing", name, input_name=name))
            continue
        value, kind = inputs[name], info[0]
        config = [kind, info[1]] if not isinstance(kind, list) or len(kind) <= 20 else None
        if is_link(value):
            problem = _link_problem(graph, value, types)
            if problem:
                errors.append(_error("bad_linked_input", problem, name, input_name=name, input_config=config,
                                     received_value=value))
                continue
            received = types[graph[value[0]]["class_type"]].outputs[value[1]]
            if received != kind:
                errors.append(_error("return_type_mismatch", "Return type mismatch between linked nodes",
                                     f"{name}, {received} != {kind if isinstance(kind, str) else 'COMBO'}",
                                     input_name=name, input_config=config, received_type=received,
                                     linked_node=value))
            continue
        if kind in ("INT", "FLOAT", "STRING", "BOOLEAN"):
            try:
                value = _convert(kind, value)
            except (TypeError, ValueError, OverflowError) as e:
                errors.append(_error("invalid_input_type", f"Failed to convert an input value to a {kind} value",
                                     f"{name}, {value}, {e}", input_name=name, input_config=config,
                                     received_value=value, exception_message=str(e)))
                continue
            inputs[name] = value  # as ComfyUI: the converted value is what runs
            lo, hi = info[1].get("min"), info[1].get("max")
            if lo is not None and value < lo:
                errors.append(_error("value_smaller_than_min", f"Value {value} smaller than min of {lo}", name,
                                     input_name=name, input_config=config, received_value=value))
            elif hi is not None and value > hi:
                errors.append(_error("value_bigger_than_max", f"Value {value} bigger than max of {hi}", name,
                                     input_name=name, input_config=config, received_value=value))
        elif isinstance(kind, list) and (not isinstance(value, (str, int, float)) or value not in kind):
            listed = f"(list of length {len(kind)})" if len(kind) > 20 else str(kind)
            errors.append(_error("value_not_in_list", "Value not in list", f"{name}: '{value}' not in {listed}",
                                 input_name=name, input_config=config, received_value=value))
        elif not isinstance(kind, list):  # a link type given a widget value: ComfyUI lets it fail at run time
            errors.append(_error("bad_linked_input", f"Input {name} takes a link to a {kind} output "
                                 "([node_id, slot_index]), not a value", name, input_name=name,
                                 input_config=config, received_value=value))
    return errors


def _convert(kind: str, value: Any) -> Any:
    if kind == "INT":
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"cannot convert {value} to an integer")
        return int(value)
    if kind == "FLOAT":
        out = float(value)
        if not math.isfinite(out):
            raise ValueError(f"{value} is not a finite number")
        return out
    if kind == "BOOLEAN":
        if not isinstance(value, (bool, int)):
            raise ValueError(f"{value!r} is not a boolean")
        return bool(value)
    if not isinstance(value, (str, int, float)):
        raise ValueError(f"a {type(value).__name__} is not text")
    return str(value)


def _link_problem(graph: dict, value: list, types: dict[str, NodeType]) -> str:
    """Why `value` is not a usable link, or ''."""
    if len(value) != 2:
        return "Bad linked input, must be a length-2 list of [node_id, slot_index]"
    source, slot = value
    if not isinstance(source, (str, int)) or str(source) not in graph:
        return f"Bad linked input, node {source!r} is not in the prompt"
    if str(source) != source:  # ComfyUI's ids are strings; ours too, so that lookups match
        value[0] = source = str(source)
    outputs = types[graph[source]["class_type"]].outputs
    if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < len(outputs):
        return f"Bad linked input, node {source} ({graph[source]['class_type']}) has no output slot {slot!r}"
    return ""


def links(graph: dict, node_id: str) -> list[str]:
    """The nodes `node_id` takes a (well-formed) input from."""
    out = []
    for value in graph[node_id].get("inputs", {}).values():
        if is_link(value) and len(value) == 2 and isinstance(value[0], (str, int)) and str(value[0]) in graph:
            out.append(str(value[0]))
    return out


def _upstream(graph: dict, start: str) -> set[str]:
    """`start` and every node it depends on."""
    seen, stack = {start}, [start]
    while stack:
        for n in links(graph, stack.pop()):
            if n not in seen:
                seen.add(n)
                stack.append(n)
    return seen


def _cycle_nodes(graph: dict) -> set[str]:
    """The nodes on a dependency cycle: peel off the nodes whose inputs are all resolved (Kahn's algorithm), then
    those no remaining node takes an input from; what is left lies on a cycle (or between two). O(nodes + links),
    no recursion."""
    deps = {n: set(links(graph, n)) for n in graph}
    users: dict[str, set[str]] = {n: set() for n in graph}
    for n, ds in deps.items():
        for d in ds:
            users[d].add(n)
    left = _peel(set(graph), deps, users)
    return _peel(left, users, deps)


def _peel(nodes: set[str], before: dict[str, set[str]], after: dict[str, set[str]]) -> set[str]:
    """Repeatedly remove from `nodes` those with nothing left in `before`; return the rest."""
    waiting = {n: len(before[n] & nodes) for n in nodes}
    ready = [n for n, k in waiting.items() if k == 0]
    while ready:
        n = ready.pop()
        for u in after[n]:
            if u in waiting:
                waiting[u] -= 1
                if waiting[u] == 0:
                    ready.append(u)
    return {n for n, k in waiting.items() if k > 0}
