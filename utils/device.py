"""Choosing the compute device from a ``--cuda`` flag, shared by every script."""

import torch


def select_device(cuda: bool) -> torch.device:
    """``cuda:LOCAL_RANK`` (or ``cuda``) when asked for, else the CPU.

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
