"""Choosing the compute device from a ``--cuda`` flag, shared by every script, and
naming the machine a figure was measured on."""

import platform

import torch


def select_device(cuda: bool) -> torch.device:
    """The current CUDA device (``torchrun`` sets it to the local rank's) when asked
    for, else the CPU.

    Asking for CUDA on a machine without it is an error, not a silent CPU fallback.
    """
    if not cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("--cuda was given but CUDA is not available on this machine")
    return torch.device("cuda", torch.cuda.current_device())


def model_device(model: torch.nn.Module) -> torch.device:
    """The device a model's parameters live on (models never store one)."""
    return next(model.parameters()).device


def cpu_model_name() -> str:
    """The CPU model from /proc/cpuinfo where there is one, else what :mod:`platform`
    knows (the processor or the architecture)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
