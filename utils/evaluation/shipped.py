"""The released CPS models the demo codes with: their weights and trained lambda.

A release folder (``experiment/shipped/<name>/``, written by the release tool) holds
``model.pth`` and ``training.json``; the lambda is read from the latter to label and
order the models, and a damaged ``training.json`` is refused before any image is
coded.
"""

import glob
import json
import math
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

from utils.evaluation.choices import REPO_ROOT

SHIPPED_DIR = os.path.join(REPO_ROOT, "experiment", "shipped")


@dataclass
class ShippedModel:
    """A released model: its weights file and the lambda it was trained for."""

    path: str
    lmbda: Optional[float]

    @property
    def label(self) -> str:
        return (
            f"CPS λ={self.lmbda:g}"
            if self.lmbda is not None
            else os.path.basename(self.path)
        )


def find_shipped_models(paths: Sequence[str] = ()) -> List[ShippedModel]:
    """The models to demonstrate, lowest lambda first.

    ``paths`` may name weight files or release folders (holding ``model.pth`` and
    ``training.json``); empty means every release under ``experiment/shipped``.
    """
    if not paths:
        paths = sorted(glob.glob(os.path.join(SHIPPED_DIR, "*", "model.pth")))
        if not paths:
            raise ValueError(f"no shipped model under {SHIPPED_DIR}; pass --models")
    found, seen = [], {}
    for path in paths:
        weights = os.path.join(path, "model.pth") if os.path.isdir(path) else path
        if not os.path.isfile(weights):
            raise ValueError(f"no model weights at {weights}")
        key = os.path.realpath(weights)
        if key in seen:  # its rows would be printed twice
            raise ValueError(f"--models names {weights} twice ({seen[key]} and {path})")
        seen[key] = path
        info_path = os.path.join(os.path.dirname(weights), "training.json")
        lmbda = _trained_lambda(info_path) if os.path.isfile(info_path) else None
        found.append(ShippedModel(weights, lmbda))
    return sorted(found, key=lambda m: (m.lmbda is None, m.lmbda or 0.0))


def _trained_lambda(info_path: str) -> Optional[float]:
    """``train_params.lmbda`` of a release's ``training.json``, None when it names none.

    Checked when the models are listed, so that a damaged file is refused in one line
    naming it and the field, before any image is coded.
    """
    try:
        with open(info_path, encoding="utf-8") as handle:
            info = json.load(handle)
    except ValueError as exc:  # not JSON, or not UTF-8
        raise ValueError(f"{info_path} is not valid JSON: {exc}") from None
    if not isinstance(info, dict):
        raise ValueError(
            f"{info_path} must hold a JSON object, not a {type(info).__name__}"
        )
    params = info.get("train_params")
    if params is None:
        return None
    if not isinstance(params, dict):
        raise ValueError(
            f"{info_path}: train_params must be an object, not a "
            f"{type(params).__name__}"
        )
    lmbda = params.get("lmbda")
    if lmbda is None:
        return None
    if (
        isinstance(lmbda, bool)
        or not isinstance(lmbda, (int, float))
        or not math.isfinite(lmbda)
        or lmbda <= 0
    ):
        raise ValueError(
            f"{info_path}: train_params.lmbda must be a positive number, got {lmbda!r}"
        )
    return float(lmbda)
