"""Where a profiled training step's GPU time goes, by the model's modules, forward and backward.

torch.profiler names operators (`aten::mul`), not the code that ran them, and gemma-3n runs the same operators in
every part of a decoder layer. `labelled_modules` opens a profiler range per module call (its name with the layer
number dropped, so the 30 layers add up), and AltUp's `predict`/`correct`, which are methods rather than modules.
`time_by_module` gives each operator's own GPU time to the innermost range around it; a backward operator goes to
the forward range that created its autograd node (matched by the node's sequence number).
"""

from __future__ import annotations

import re
import types
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

PREFIX = "mw:"
OUTSIDE = "(outside the model's modules: loss, optimizer, data)"
BACKWARD = " [bwd]"
_LAYER = re.compile(r"^.*?\blayers\.\d+\.")
_WHOLE_LAYER = re.compile(r"\blayers\.\d+$")
_METHODS = {"Gemma3nTextAltUp": ("predict", "correct", "scale_corrected_output")}


def module_label(name: str, depth: int = 3) -> str:
    """'base_model.model.model.language_model.layers.7.mlp.up_proj.lora_A.default' -> 'layer.mlp.up_proj.lora_A';
    outside the decoder layers, the first `depth` names after the wrappers ('model.vision_tower.timm_model')."""
    if _LAYER.match(name):
        return "layer." + ".".join(_LAYER.sub("", name).split(".")[:depth])
    if _WHOLE_LAYER.search(name):
        return "layer"
    parts = [p for p in name.split(".") if p not in ("base_model", "model", "default")]
    return ".".join(parts[:depth]) or "(model)"


@contextmanager
def labelled_modules(model: Any) -> Iterator[None]:
    """A profiler range around every module call of `model` (and AltUp's methods) while the block runs."""
    from torch.autograd.profiler import record_function

    handles, patched, open_ranges = [], [], []

    def enter(label: str) -> None:
        scope = record_function(PREFIX + label)
        scope.__enter__()
        open_ranges.append(scope)

    def leave() -> None:
        if open_ranges:
            open_ranges.pop().__exit__(None, None, None)

    for name, module in model.named_modules():
        label = module_label(name)
        handles.append(module.register_forward_pre_hook(lambda *_, label=label: enter(label)))
        handles.append(module.register_forward_hook(lambda *_: leave()))
        for method in _METHODS.get(type(module).__name__, ()):
            own = vars(module).get(method)  # an instance patch (model.kernels) to put back afterwards
            bound = getattr(module, method, None)
            if bound is None:
                continue

            def wrapped(_self: Any, *args: Any, _bound: Any = bound, _label: str = f"{label}.{method}", **kw: Any):
                enter(_label)
                try:
                    return _bound(*args, **kw)
                finally:
                    leave()

            setattr(module, method, types.MethodType(wrapped, module))
            patched.append((module, method, own))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module, method, own in patched:
            if own is None:
                delattr(module, method)
            else:
                setattr(module, method, own)
        while open_ranges:
            leave()


def time_by_module(events: Iterable[Any], on_device: bool = True) -> dict[str, float]:
    """Own time (µs) of every operator, summed by the innermost labelled range around it; a backward operator by
    the range whose forward operator created its autograd node, with ' [bwd]' added. `on_device`: GPU time, else
    CPU time (what a CPU-only profile has)."""
    from torch.autograd import DeviceType

    # CPU-side operators only: a kernel's own event (device side) repeats the time its operator already counts
    events = sorted((e for e in events if e.device_type == DeviceType.CPU), key=lambda e: e.time_range.start)

    def own_time(event: Any) -> float:
        return event.self_device_time_total if on_device else event.self_cpu_time_total

    def enclosing(event: Any) -> Any:
        while event is not None and not event.name.startswith((PREFIX, "autograd::engine::evaluate_function")):
            event = event.cpu_parent
        return event

    created_by: dict[int, str] = {}
    for event in events:  # forward operators in start order: the last one to see a sequence number created its node
        scope = enclosing(event)
        if scope is not None and scope.name.startswith(PREFIX) and getattr(event, "sequence_nr", -1) >= 0:
            created_by[event.sequence_nr] = scope.name[len(PREFIX) :]
    totals: dict[str, float] = defaultdict(float)
    for event in events:
        spent = own_time(event)
        if not spent or event.name.startswith(PREFIX):
            continue
        scope = enclosing(event)
        if scope is None:
            label = OUTSIDE
        elif scope.name.startswith(PREFIX):
            label = scope.name[len(PREFIX) :]
        elif scope.sequence_nr in created_by:
            label = created_by[scope.sequence_nr] + BACKWARD
        else:
            label = "(backward of operators outside the modules)"
        totals[label] += spent
    return dict(totals)


def is_label(event: Any) -> bool:
    """A range `labelled_modules` opened (the profiler also puts it on the GPU's timeline, spanning its kernels)."""
    return getattr(event, "name", getattr(event, "key", "")).startswith(PREFIX)


def module_table(totals: dict[str, float], rows: int = 45) -> str:
    """The labels by time, with their share and the forward and backward summed by the label's first two names."""
    total = sum(totals.values()) or 1.0
    lines = [f"{'module (own time of its operators, all layers)':<72} {'ms':>9} {'share':>6}"]
    for label, spent in sorted(totals.items(), key=lambda item: -item[1])[:rows]:
        lines.append(f"{label[:72]:<72} {spent / 1e3:9.1f} {spent / total:6.1%}")
    grouped: dict[str, float] = defaultdict(float)
    for label, spent in totals.items():
        grouped[".".join(label.removesuffix(BACKWARD).split(".")[:2])] += spent
    lines.append("")
    lines.append(f"{'by part, forward + backward':<72} {'ms':>9} {'share':>6}")
    for label, spent in sorted(grouped.items(), key=lambda item: -item[1])[:rows]:
        lines.append(f"{label[:72]:<72} {spent / 1e3:9.1f} {spent / total:6.1%}")
    return "\n".join(lines)
