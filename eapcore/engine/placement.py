"""A model's layers over several devices of one host (a model too large for one GPU).

`place_layers` (pure) chooses the device of each layer: contiguous runs of layers in order, the
embedding with the first layer and the final norm and head with the last, balanced so that the
largest load relative to its device's capacity is as small as possible. `dispatch` moves a
loaded model's modules there and adds forward pre-hooks that move a module's inputs to its device,
so the model's own forward (the conformance check) runs across devices too. The engine
(eapcore.engine.attribution) runs each layer on its device and moves the residual stream and its
gradient at layer boundaries; DESIGN.md "Models over several GPUs" says how the stored sources
and the contraction follow.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

BISECTION_STEPS = 60


def _greedy(items: Sequence[int], capacities: Sequence[int], ratio: float) -> list[int] | None:
    """Fill the devices in order up to ratio x capacity; None if the items do not fit."""
    device, load, out = 0, 0, []
    for b in items:
        while load + b > ratio * capacities[device]:
            device += 1
            if device == len(capacities):
                return None
            load = 0
        out.append(device)
        load += b
    return out


def place_layers(layer_bytes: Sequence[int], capacities: Sequence[int], first_bytes: int = 0,
                 last_bytes: int = 0) -> list[int]:
    """Device index of each layer (non-decreasing): layer l's bytes layer_bytes[l] (weights and its
    share of the activations), device d's capacity capacities[d]; the first layer's device also
    holds first_bytes (the embedding) and the last layer's device last_bytes (final norm, head,
    loss). Minimises the largest load / capacity over the devices: bisection on that ratio, each
    step filling the devices in order (optimal for a given ratio). ValueError when the model does
    not fit in the capacities."""
    if not layer_bytes or not capacities or min(capacities) <= 0:
        raise ValueError("place_layers needs at least one layer and devices with positive capacity")
    items = list(layer_bytes)
    items[0] += first_bytes
    items[-1] += last_bytes
    total = sum(items)
    lo, hi = 0.0, total / capacities[0] + 1.0  # everything on device 0 fits at ratio hi
    for _ in range(BISECTION_STEPS):
        mid = (lo + hi) / 2
        if _greedy(items, capacities, mid) is None:
            lo = mid
        else:
            hi = mid
    if hi > 1.0:
        raise ValueError(f"the model needs {total / 1e9:.2f} GB and does not fit in {len(capacities)} device(s) "
                         f"of {', '.join(f'{c / 1e9:.2f}' for c in capacities)} GB (the fullest would be at "
                         f"{hi:.0%}); use more devices, bfloat16, or fewer tokens per batch")
    return _greedy(items, capacities, hi)


def _move_inputs(device: torch.device):
    def hook(module, args, kwargs):
        return _to(args, device), _to(kwargs, device)
    return hook


def _to(value: Any, device: torch.device) -> Any:
    """Tensors in a (nested) tuple, list or dict moved to `device`; other values unchanged."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def dispatch(adapter, devices: Sequence[str | torch.device]) -> None:
    """Move the model of `adapter` so that layer l is on devices[l], the embedding on devices[0]
    (with tied embeddings: with the head) and the final norm and head on devices[-1]; each moved
    module gets a pre-hook moving its inputs to its device. len(devices) = number of layers."""
    devices = [torch.device(d) for d in devices]
    if len(devices) != adapter.n_layers:
        raise ValueError(f"a device map needs one device per layer ({adapter.n_layers}), got {len(devices)}")
    placed = [(m, devices[-1] if adapter.tied else devices[0]) for m in adapter.embed_modules()]
    placed += [(adapter.layer_module(l), d) for l, d in enumerate(devices)]
    placed += [(m, devices[-1]) for m in adapter.head_modules()]
    for module, device in placed:
        module.to(device)
        module.register_forward_pre_hook(_move_inputs(device), with_kwargs=True)
    _rest_to(adapter.hf, {id(m) for m, _ in placed}, devices[0])
    adapter.device_map = devices


def _bytes(modules: Sequence[torch.nn.Module]) -> int:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


def capacity(device: str | torch.device) -> int:
    """Bytes a device can still hold: free memory of a CUDA device; elsewhere no limit."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return 1 << 62


def balanced_map(adapter, devices: Sequence[str | torch.device]) -> list[torch.device]:
    """Each layer's device among `devices` (place_layers on the weights' bytes and the devices'
    free memory: activations, uniform per layer, follow the layers)."""
    layers = [_bytes([adapter.layer_module(l)]) for l in range(adapter.n_layers)]
    embed, head = _bytes(adapter.embed_modules()), _bytes(adapter.head_modules())
    index = place_layers(layers, [capacity(d) for d in devices], 0 if adapter.tied else embed, head)
    return [torch.device(devices[i]) for i in index]


def _rest_to(module: torch.nn.Module, placed: set[int], device: torch.device) -> bool:
    """Move the submodules of `module` that hold no placed module to `device` (one module at a
    time: the whole model is never on one device); returns whether `module` holds a placed one."""
    if id(module) in placed:
        return True
    holds = [_rest_to(child, placed, device) for child in module.children()]
    if not any(holds):
        return False
    for child, held in zip(module.children(), holds):
        if not held:
            child.to(device)
    return True
