"""What loaded weights must satisfy: entries a model can be built from and hold,
and entropy tables that CompressAI's rANS coder can use.

``load_state_dict`` casts silently and PyTorch builds layers of any size, so a
damaged or hand-made state dict would otherwise become a model that codes wrong
files; each check here turns one such case into a one-line ``ValueError`` that names
the entry.
"""

from typing import Mapping

import torch
from compressai.entropy_models import EntropyBottleneck, GaussianConditional
from torch import Tensor, nn

__all__ = [
    "is_entropy_table",
    "check_buildable",
    "check_dtypes",
    "validate_loaded_model",
    "entropy_tables_ready",
]

# Buffers that update() computes; a checkpoint may lack them or hold other sizes.
_ENTROPY_TABLES = ("_quantized_cdf", "_offset", "_cdf_length", "scale_table")


def is_entropy_table(name: str) -> bool:
    """Whether the entry ``name`` is an entropy table that ``update()`` computes."""
    return name.rsplit(".", 1)[-1] in _ENTROPY_TABLES


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_kind(dtype: torch.dtype) -> str:
    if dtype.is_complex:
        return "complex"
    if dtype.is_floating_point:
        return "real floating point"
    return "bool" if dtype == torch.bool else "integer"


def check_dtypes(state_dict: Mapping[str, Tensor], expected: Mapping) -> None:
    """Refuse an entry whose dtype cannot hold what the model keeps there.

    ``load_state_dict`` copies with a cast: it drops imaginary parts (printing a
    warning from Copy.cpp), truncates floats written into the integer entropy tables
    and turns integers or bools into weights, all without an error. Any real floating
    point dtype may fill a floating entry (float16/bfloat16 from mixed precision,
    float64), and any integer dtype an integer one, if its values fit. Empty entries
    hold no values: the entropy tables they stand for are recomputed.
    """
    for name, value in state_dict.items():
        want = expected[name].dtype
        kind = _dtype_kind(want)
        if value.numel() == 0:
            continue
        if _dtype_kind(value.dtype) != kind:
            raise ValueError(
                f"checkpoint entry {name} is {_dtype_name(value.dtype)}, where the "
                f"model holds {kind} values ({_dtype_name(want)}); convert it and "
                "save again"
            )
        if kind == "integer" and value.dtype != want:
            limits = torch.iinfo(want)
            # Python ints: a narrower tensor would compare with the limits
            # wrapped into its own dtype (int32's minimum is 0 as an int16).
            if int(value.min()) < limits.min or int(value.max()) > limits.max:
                raise ValueError(
                    f"checkpoint entry {name} holds values outside the range of "
                    f"{_dtype_name(want)}, the dtype the model keeps there"
                )


def _non_finite(name: str) -> ValueError:
    return ValueError(
        f"checkpoint entry {name} holds non-finite values (NaN or inf): "
        "the weights are unusable, e.g. from a diverged training run"
    )


# The most symbols one entropy-bottleneck channel may span between its lower and
# upper quantile: 2**16, the most CompressAI's 16-bit rANS tables can give a
# frequency. A wider span cannot be tabulated at all, and update() would build rows
# that wide first (20 GB and many minutes for quantiles 1e7 apart). Trained models
# span tens (the published CPS files: at most 21); building the tables with
# pmf_to_quantized_cdf takes about 0.01 s a channel at 4096 symbols, 2 s at 2**16.
MAX_QUANTILE_SYMBOLS = 1 << 16


def _check_quantile_span(name: str, quantiles: Tensor) -> None:
    """Refuse entropy-bottleneck ``quantiles`` (channels, 1, 3) from which
    ``update()`` would tabulate more than :data:`MAX_QUANTILE_SYMBOLS` symbols."""
    if quantiles.dim() != 3 or quantiles.shape[1:] != (1, 3):
        return  # a shape the model does not hold: load_state_dict_into names it
    if not torch.isfinite(quantiles).all():
        raise _non_finite(name)
    lower, median, upper = quantiles.double()[:, 0].unbind(dim=1)
    symbols = (
        (median - lower).ceil().clamp(min=0) + (upper - median).ceil().clamp(min=0) + 1
    )
    if symbols.max() > MAX_QUANTILE_SYMBOLS:
        channel = int(symbols.argmax())
        raise ValueError(
            f"checkpoint entry {name} spans {float(symbols[channel]):.6g} symbols in "
            f"channel {channel} (quantiles {quantiles[channel, 0].tolist()}), more "
            f"than the {MAX_QUANTILE_SYMBOLS} a 16-bit entropy table can hold: no "
            "table can be built for it (a damaged file, or a diverged training run)"
        )


def check_buildable(state_dict: Mapping[str, Tensor]) -> None:
    """Refuse an entry no model holds, before any model is built from the sizes of
    ``state_dict``: an empty weight (a width of 0 builds layers that PyTorch warns
    about, then misfits every other entry; only entropy tables may be empty,
    ``update()`` fills them), a tensor without values (on the meta device) or in a
    sparse layout (PyTorch's copy into the model fails with a message listing every
    key), complex values (which a size read from them would carry along) or
    entropy-bottleneck quantiles too far apart to tabulate
    (:func:`_check_quantile_span`: ``update()`` would run for hours or exhaust the
    memory). ``load_checkpoint`` builds one from the sizes, and so does
    ``train.py --init-from`` to explain a shape mismatch: both come here first."""
    for name, value in state_dict.items():
        if value.is_meta:
            raise ValueError(
                f"checkpoint entry {name} is on the meta device: it has a shape but "
                "no values (saved from a model built without its weights); save the "
                "weights of the trained model"
            )
        if value.layout != torch.strided:
            raise ValueError(
                f"checkpoint entry {name} is stored as {value.layout}: no model holds "
                "sparse weights; save it dense (tensor.to_dense()) and load again"
            )
        if value.numel() == 0 and not is_entropy_table(name):
            raise ValueError(
                f"checkpoint entry {name} has shape {tuple(value.shape)}, with no "
                "elements: no model has an empty weight (a damaged or hand-made file)"
            )
        if value.is_complex():
            raise ValueError(
                f"checkpoint entry {name} is {_dtype_name(value.dtype)}: no model "
                "holds complex values; convert it to a real dtype and save again"
            )
        if name.endswith(".quantiles") and value.is_floating_point():
            _check_quantile_span(name, value)


# Cumulative frequencies of CompressAI's rANS coder sum to 2**16.
_CDF_TOTAL = 1 << 16


def _check_entropy_tables(prefix: str, module: nn.Module) -> None:
    """Tables the rANS coder can use without dividing by zero or reading outside a
    row: for every row, ``2 <= length <= width``, ``cdf[0] == 0``, strictly increasing
    up to ``cdf[length - 1] == 2**16`` (every symbol has a frequency >= 1, as
    CompressAI's ``pmf_to_quantized_cdf`` makes it), and ``-width < offset <= 0``."""
    cdf, lengths, offsets = module._quantized_cdf, module._cdf_length, module._offset
    if cdf.numel() == 0:
        return
    if (
        cdf.dim() != 2
        or lengths.shape != (cdf.shape[0],)
        or offsets.shape != (cdf.shape[0],)
    ):
        raise ValueError(
            f"checkpoint entry {prefix}._quantized_cdf {tuple(cdf.shape)} does not "
            f"match _cdf_length {tuple(lengths.shape)} and _offset "
            f"{tuple(offsets.shape)}"
        )
    width = cdf.shape[1]
    lengths, offsets = lengths.long(), offsets.long()
    bad = (lengths < 2) | (lengths > width)
    if bad.any():
        row = int(bad.nonzero()[0])
        raise ValueError(
            f"checkpoint entry {prefix}._cdf_length[{row}] = {int(lengths[row])} "
            f"is outside [2, {width}] (the table width)"
        )
    bad = (offsets > 0) | (offsets <= -width)
    if bad.any():
        row = int(bad.nonzero()[0])
        raise ValueError(
            f"checkpoint entry {prefix}._offset[{row}] = {int(offsets[row])} is "
            f"outside ({-width}, 0]"
        )
    cdf = cdf.long()
    inside = torch.arange(width) < lengths[:, None]
    steps = torch.diff(cdf, dim=1)
    last = cdf.gather(1, (lengths - 1)[:, None])[:, 0]
    bad = (
        (cdf[:, 0] != 0)
        | (last != _CDF_TOTAL)
        | ((steps <= 0) & inside[:, 1:]).any(dim=1)
    )
    if bad.any():
        row = int(bad.nonzero()[0])
        raise ValueError(
            f"checkpoint entry {prefix}._quantized_cdf row {row} is not a CDF: it "
            f"must rise strictly from 0 to {_CDF_TOTAL} over its {int(lengths[row])} "
            "entries; delete the entropy tables from the checkpoint to recompute them"
        )
    if isinstance(module, GaussianConditional):
        scales = module.scale_table
        if (
            scales.numel() != cdf.shape[0]
            or not (scales > 0).all()
            or not (torch.diff(scales) > 0).all()
        ):
            raise ValueError(
                f"checkpoint entry {prefix}.scale_table must hold {cdf.shape[0]} "
                "positive increasing scales, one per CDF row"
            )


def validate_loaded_model(model: nn.Module) -> None:
    """Reject weights the codec cannot use, with a one-line ``ValueError`` naming the
    entry: non-finite floats (a diverged run; they make the encoder's wavefront loop
    spin on NaN scales) and entropy tables that would make the rANS coder divide by
    zero or index outside a CDF row (see :func:`_check_entropy_tables`)."""
    for name, value in model.state_dict().items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise _non_finite(name)
    for prefix, module in model.named_modules():
        if isinstance(module, (EntropyBottleneck, GaussianConditional)):
            _check_entropy_tables(prefix, module)


def entropy_tables_ready(model: nn.Module) -> bool:
    """True when every entropy model has its CDF tables (``update()`` has run)."""
    return all(
        m._quantized_cdf.numel() > 0
        for m in model.modules()
        if isinstance(m, (EntropyBottleneck, GaussianConditional))
    )
