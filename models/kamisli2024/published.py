"""Kamisli's published checkpoints: their module names mapped onto :class:`Kamisli2024`.

The authors' network (``BlockBasedImgCompLossyNetv9`` in their repository) names its
parts after the paper's prediction/transform (``prtr``) and entropy networks; ours
uses CompressAI's names. The layers correspond one to one, in the same order:

.. code-block:: none

    theirs                          ours
    prtr_forward1 (1x1, reads x)    g_a_source
    prtr_forward2 (masked A, zhat)  g_a_context
    prtr_forward3.{0..5}            g_a.{0..5}          GDN, 1x1, GDN, 1x1, GDN, 1x1
    prtr_inverse1 (1x1, reads y)    g_s_latent
    prtr_inverse2 (masked A, zhat)  g_s_context
    prtr_inverse3.{0..5}            g_s.{0..5}          IGDN, 1x1, ...
    get_meanscale.{0..6}            entropy_parameters.{0..6}
    conditional_gaussian_model      gaussian_conditional

Every convolution of theirs is a masked one and may store its mask; ours are plain
1x1 convolutions where the kernel is 1x1 and keep their masks out of the state dict.
A stored mask is checked against the one our layer applies (all ones for a plain
convolution) and then dropped: a checkpoint trained under another mask is an error.
"""

from typing import Dict, Mapping

import torch
from torch import Tensor, nn

from models.kamisli2024.layers import BlockMaskedConv2d

AUTHORS_PREFIXES = (
    ("prtr_forward1.", "g_a_source."),
    ("prtr_forward2.", "g_a_context."),
    ("prtr_forward3.", "g_a."),
    ("prtr_inverse1.", "g_s_latent."),
    ("prtr_inverse2.", "g_s_context."),
    ("prtr_inverse3.", "g_s."),
    ("get_meanscale.", "entropy_parameters."),
    ("conditional_gaussian_model.", "gaussian_conditional."),
)


def is_authors_layout(state_dict: Mapping[str, Tensor]) -> bool:
    """Whether ``state_dict`` uses the authors' module names."""
    return "prtr_forward1.weight" in state_dict


def _our_name(name: str) -> str:
    for theirs, ours in AUTHORS_PREFIXES:
        if name.startswith(theirs):
            return ours + name[len(theirs) :]
    raise ValueError(
        f"checkpoint entry {name!r} is not part of Kamisli's v9 network "
        f"(expected names starting with {', '.join(p for p, _ in AUTHORS_PREFIXES)})"
    )


def split_authors_state_dict(state_dict: Mapping[str, Tensor]) -> tuple:
    """(weights under our names, ``{our module name: stored mask}``)."""
    weights: Dict[str, Tensor] = {}
    masks: Dict[str, Tensor] = {}
    for name, value in state_dict.items():
        ours = _our_name(name)
        if ours.endswith(".mask"):
            masks[ours[: -len(".mask")]] = value
        else:
            weights[ours] = value
    return weights, masks


def check_authors_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> None:
    """Every stored mask must equal the mask ``model``'s layer applies."""
    modules = dict(model.named_modules())
    for name, stored in masks.items():
        module = modules.get(name)
        if not isinstance(module, nn.Conv2d):
            raise ValueError(
                f"checkpoint has a mask for {name!r}, which is not a convolution"
            )
        size = module.kernel_size
        applied = (
            (module.mask if isinstance(module, BlockMaskedConv2d) else torch.ones(size))
            .reshape(size)
            .cpu()
        )
        if (
            stored.dim() < 2
            or tuple(stored.shape[-2:]) != size
            or not (stored.float().reshape(-1, *size) == applied).all()
        ):
            raise ValueError(
                f"checkpoint mask of {name!r} differs from the block mask this "
                "implementation applies: the weights were trained with another mask"
            )
