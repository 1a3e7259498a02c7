"""Copies from the host to the model's device that do not wait for the device.

A plain `.to("cuda")` of a tensor in pageable memory waits until the device has finished what was queued
before it, so the host could not prepare the next step while the device runs this one. From pinned
memory with `non_blocking`, the copy is queued like a kernel (torch keeps the pinned block until it is
done). On the CPU it is the tensor itself.
"""

from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` (on the host) on `device`, queued without waiting where the device is a GPU."""
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)
