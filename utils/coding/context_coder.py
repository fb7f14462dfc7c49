"""Autoregressive entropy coding of the latent ``y`` (Minnen et al. 2018 context model).

CompressAI's ``mbt2018`` visits the latent one position at a time. A position's
context only reads the positions its masked convolution marks causal; with the 5x5
mask these are rows i-2, i-1 (columns j-2..j+2) and (i, j-2), (i, j-1). Numbering the
positions ``t = a*i + j`` with the smallest slope ``a`` for which every causal tap has
a smaller ``t`` (``utils/coding/scan_order.py``, a = 3 for the 5x5 mask) makes all
positions with the same ``t`` independent, so they are coded together:
``a*(H-1) + W`` steps instead of ``H*W`` (321 instead of 8160 for a 68x120 latent).

Both orders share one implementation: a *front* is a set of positions coded in one
step; ``raster`` order has one position per front (the reference, CompressAI's
order), ``wavefront`` order one skewed diagonal per front (the default).

.. code-block:: none

    front k (n positions, M channels), the same operations at encoder and decoder:
      worker thread (if pipelined), overlapping front k-1:
        far taps (they read fronts <= k-2) --gather, GEMM--> partial context (n, 2M)
        params at the front --GEMM, first 1x1 conv's params half--> partial hidden
      main thread:
        near taps (they read front k-1) --gather, GEMM, + partial--> context (n, 2M)
        context --first conv's context half + partial hidden, LeakyReLU, other 1x1
          convs as GEMMs--> scales, means (n, M) --bucketize--> CDF indexes (n, M)
        encoder: symbols = round(y - means);  decoder: symbols = rANS(indexes)
        y_hat at the front = symbols + means

Bit-exactness. The decoder must derive every mean and CDF index from exactly the
same numbers as the encoder, or one rounding difference desynchronises the rANS
state and the rest of the latent decodes into garbage (CompressAI issues 54, 279,
320). By default every product runs on the fixed-point grid of
``utils/coding/fixed_point.py``: exact integer sums, the same on every machine
(``utils/coding/parameter_network.py``). Files written before that ran float32
GEMMs; ``fixed_point=False`` reproduces them: both sides run the same GEMMs on
tensors of the same shapes, in the same order, at full matmul precision, each GEMM
on one thread (a GEMM's summation order may depend on its thread count; which
thread runs it does not matter, so pipelining does not change the bitstream), and
the result can still depend on the CPU's instruction set; the codec's y_hat
checksum turns a mismatch into an error instead of a wrong image.

Speed. The context convolution only multiplies the causal taps (12 of 25), the
entropy-parameter 1x1 convolutions run as GEMMs on (n, C) matrices, the latent is
kept channels-last so a front's context windows are row gathers, and all index
arithmetic is computed once per latent. About half of the multiply-adds (10 of the
12 context taps and the params half of the first 1x1 convolution) do not depend on
the previous front, so a second thread can compute them for front k+1 while front k
is finished and entropy-coded (``pipeline``; by default it is used where a core is
idle, see :func:`idle_core_available`). What the rANS coder's interface costs is
kept small in ``utils/coding/front_rans.py``, which codes the fronts' symbols.

Memory. Besides its inputs, the coder holds the padded y_hat buffer (M floats per
position) and, when encoding, the rANS encoder's symbol buffer (6 bytes per symbol
of one stream); fronts read ``y`` and ``params`` through channels-last views of the
caller's tensors, so no reordered copy of the latent is made. A decoder pads each
stream for safety (``utils/coding/rans.py``, 84 bytes per symbol) and, while
CompressAI's decoder takes it, holds it three times (the padded bytes, pybind11's
``std::string`` argument, the decoder's own copy): one stream for a whole 8K latent
would hold 6 GB. The fixed-point coder therefore writes a stream per
:data:`~utils.coding.streams.STREAM_SYMBOLS` symbols
(:func:`~utils.coding.streams.largest_stream_symbols` and
:data:`~utils.coding.front_rans.ENCODER_BYTES_PER_SYMBOL` feed the codec's memory
budget).

Bitstream order: fronts in increasing ``t``, positions within a front by
increasing row, channels innermost, in one rANS stream or, for fixed-point files,
in several (``utils/coding/front_rans.py``).
"""

import contextlib
import copy
import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn

from utils.coding import ORDERS
from utils.coding.front_rans import CdfTables, FrontDecoder, FrontEncoder
from utils.coding.parameter_network import (
    FixedPointNetwork,
    Float32Network,
    linear_layers,
)
from utils.coding.scan_order import (
    FrontLayout,
    causal_taps,
    front_layout,
    wavefront_slope,
)
from utils.coding.threads import idle_core_available, single_threaded

# Smallest latent for which the coder checks for an idle core (a 1920x1080 image).
_PIPELINE_MIN_POSITIONS = 8000


def channels_last_rows(tensor: Tensor) -> Tensor:
    """(C, H, W) -> (H*W, C): a view if ``tensor`` is stored channels-last,
    else a copy."""
    return tensor.permute(1, 2, 0).reshape(-1, tensor.shape[0])


class ContextCoder:
    """Codes ``y`` given the hyper-decoder output ``params`` with a joint AR model.

    The coder copies what it needs from the model to the CPU, so ``model`` may live
    on any device; all its arithmetic runs on the CPU.

    Args:
        model: a model with ``context_prediction`` (a ``MaskedConv2d`` with a
            ``mask``), ``entropy_parameters`` (1x1 convolutions and LeakyReLUs whose
            first layer reads ``cat(params, context)``) and an updated
            ``gaussian_conditional``.
        order: ``"wavefront"`` or ``"raster"``.
        pipeline: compute each front's far part on a second thread while the
            previous front is coded. ``None`` (default): decided per latent, for
            wavefront order and latents of 8000 positions or more when
            :func:`idle_core_available`; never for raster order, whose one-position
            fronts are too small to pay for the hand-off. The bitstream does not
            depend on this choice.
        fixed_point: products on the fixed-point grid (the same bits on every
            machine; the default), or float32 as files written before it.
    """

    def __init__(
        self,
        model: nn.Module,
        order: str = "wavefront",
        pipeline: Optional[bool] = None,
        fixed_point: bool = True,
    ):
        if order not in ORDERS:
            raise ValueError(
                f"unknown entropy coder order {order!r}; choose from {ORDERS}"
            )
        self.pipeline = pipeline
        self.last_pipelined: Optional[bool] = None  # what the last encode/decode did
        context = model.context_prediction
        conditional = model.gaussian_conditional
        # Its bit estimate runs on the CPU.
        if conditional.scale_table.device.type != "cpu":
            conditional = copy.deepcopy(conditional).cpu()
        self.conditional = conditional
        if conditional.quantized_cdf.numel() == 0:
            raise RuntimeError(
                "the model's entropy tables are empty: call model.update() first"
            )
        self.order = order
        self.taps = causal_taps(context.mask)
        self.slope = wavefront_slope(self.taps)
        self.pad = (context.kernel_size[0] // 2, context.kernel_size[1] // 2)
        self.channels = context.in_channels
        tap_rows = torch.tensor([di for di, _ in self.taps]) + self.pad[0]
        tap_cols = torch.tensor([dj for _, dj in self.taps]) + self.pad[1]
        # Causal taps only, tap-major like the gathered windows: (2M, taps, M).
        weight = context.weight.detach().cpu().float()[:, :, tap_rows, tap_cols]
        context_weight = weight.permute(0, 2, 1).contiguous()
        layers = linear_layers(model.entropy_parameters)
        inputs = layers[0][0].shape[1]
        hyper_width = inputs - context.out_channels
        if hyper_width != 2 * self.channels:
            raise ValueError(
                f"entropy_parameters reads {inputs} channels, expected "
                f"params + context = {2 * self.channels} + {context.out_channels}"
            )
        self.fixed_point = fixed_point
        network = FixedPointNetwork if fixed_point else Float32Network
        self.network = network(
            context_weight, context.bias.detach().cpu().float(), layers, hyper_width
        )
        self.scale_floor = conditional.lower_bound_scale.bound.detach().cpu().float()
        self.scale_bounds = (
            conditional.scale_table.detach().cpu().float()[:-1].contiguous()
        )
        self.tables = CdfTables.of(conditional)

    def _layout(self, height: int, width: int) -> FrontLayout:
        return front_layout(height, width, self.order, self.taps, self.slope, self.pad)

    def _pipelined(self, positions: int) -> bool:
        """The ``pipeline`` choice, made per latent when it was left to the coder:
        wavefront order, a latent large enough (a 1920x1080 image's or more) for the
        second thread to save more than the idle-core check's sampling window, and an
        idle core."""
        if self.pipeline is not None:
            return self.pipeline
        return (
            self.order == "wavefront"
            and positions >= _PIPELINE_MIN_POSITIONS
            and idle_core_available()
        )

    def _gather(
        self, y_hat: Tensor, windows: Tensor, start: int, stop: int, taps: int
    ) -> Tensor:
        """(n, taps*M) window values of the positions start..stop in coding order."""
        rows = y_hat.index_select(0, windows[start * taps : stop * taps])
        return rows.view(stop - start, taps * self.channels)

    @torch.inference_mode()
    def _far_part(
        self,
        y_hat: Tensor,
        layout: FrontLayout,
        far_weight: Tensor,
        hyper: Tensor,
        start: int,
        stop: int,
    ) -> Tuple[Tensor, Tensor]:
        """What does not depend on the previous front: the far taps' context plus
        bias, and the params half of the first 1x1 convolution plus its bias."""
        windows = self._gather(
            y_hat, layout.far_windows, start, stop, len(layout.far_taps)
        )
        front_params = hyper.index_select(0, layout.positions[start:stop])
        return self.network.far_part(windows, far_weight, front_params)

    def _front_parameters(
        self,
        y_hat: Tensor,
        layout: FrontLayout,
        near_weight: Tensor,
        start: int,
        stop: int,
        partial_context: Tensor,
        partial_hidden: Tensor,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """CDF indexes, means and scales (n, M) of the front start..stop, given its
        far part."""
        windows = self._gather(
            y_hat, layout.near_windows, start, stop, len(layout.near_taps)
        )
        scales, means = self.network.scales_and_means(
            windows, near_weight, (partial_context, partial_hidden)
        )
        return self.scale_indexes(scales), means, scales

    def scale_indexes(self, scales: Tensor) -> Tensor:
        """CDF table index of each scale: CompressAI's ``build_indexes`` (a loop of
        63 comparisons over the whole tensor) as one binary search."""
        return torch.bucketize(
            torch.maximum(scales, self.scale_floor), self.scale_bounds
        ).int()

    def _check_params(self, params: Tensor) -> None:
        if params.dim() != 3 or params.shape[0] != 2 * self.channels:
            raise ValueError(
                f"params must have shape (2M, H, W) = ({2 * self.channels}, H, W), "
                f"got {tuple(params.shape)}"
            )

    @staticmethod
    def _far_parts(
        far_part: Callable[[int, int], Tuple[Tensor, Tensor]],
        bounds: List[int],
        worker: Optional[ThreadPoolExecutor],
    ) -> Iterator[Tuple[Tensor, Tensor]]:
        """``far_part(start, stop)`` of each front in turn. With a worker, the far
        part of front k+1 is submitted before front k's is handed out, so it runs
        while front k is coded; it reads only fronts <= k-1, which are final by
        then."""
        if worker is None:
            for start, stop in zip(bounds, bounds[1:]):
                yield far_part(start, stop)
            return
        pending = worker.submit(far_part, bounds[0], bounds[1])
        for front in range(len(bounds) - 1):
            partial = pending.result()
            if front + 2 < len(bounds):
                pending = worker.submit(far_part, bounds[front + 1], bounds[front + 2])
            yield partial

    def _scan(
        self,
        params: Tensor,
        layout: FrontLayout,
        symbols_of: Callable[[int, int, Tensor, Tensor, Tensor], Tensor],
    ) -> Tensor:
        """The loop both sides share: for each front, compute its CDF indexes and
        means, get its symbols from ``symbols_of(start, stop, indexes, means,
        scales)`` (quantised ``y`` or rANS-decoded, int32 (n, M)) and write symbols +
        means into y_hat. Returns y_hat (M, H, W), a channels-last view.

        Pipelined or not, every GEMM gets the same operands and runs on one thread,
        so a pipelined encoder and a sequential decoder (or the reverse) agree."""
        height, width = params.shape[1:]
        padded = (height + 2 * self.pad[0], width + 2 * self.pad[1])
        y_hat = torch.zeros(padded[0] * padded[1], self.channels)
        # (H*W, 2M) rows; free when params is channels-last (the codec's layout).
        hyper = channels_last_rows(params.float().cpu())
        bounds = torch.tensor([0] + layout.sizes).cumsum(0).tolist()
        self.last_pipelined = self._pipelined(len(layout.positions))
        worker = (
            ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(1,))
            if self.last_pipelined
            else contextlib.nullcontext()
        )
        far_weight = self.network.tap_weights(layout.far_taps)
        near_weight = self.network.tap_weights(layout.near_taps)
        far_part = functools.partial(self._far_part, y_hat, layout, far_weight, hyper)
        with single_threaded(), worker as pool:
            far_parts = self._far_parts(far_part, bounds, pool)
            for start, stop, partial in zip(bounds, bounds[1:], far_parts):
                indexes, means, scales = self._front_parameters(
                    y_hat, layout, near_weight, start, stop, *partial
                )
                values = symbols_of(start, stop, indexes, means, scales)
                y_hat.index_copy_(
                    0, layout.centres[start:stop], values.type_as(means) + means
                )
        inner = y_hat.view(*padded, self.channels)[
            self.pad[0] : self.pad[0] + height, self.pad[1] : self.pad[1] + width
        ]
        return inner.permute(2, 0, 1)

    @torch.inference_mode()
    def encode(self, y: Tensor, params: Tensor) -> Tuple[bytes, Tensor, float]:
        """Code ``y`` (M, H, W) given ``params`` (2M, H, W).

        Returns the string, y_hat (M, H, W, a channels-last view) and the bits the
        model's likelihoods predict for y_hat (the rate a training loss sees).
        """
        self._check_params(params)
        if y.shape != (self.channels, *params.shape[1:]):
            raise ValueError(
                f"y has shape {tuple(y.shape)}, expected "
                f"{(self.channels, *params.shape[1:])} to match params"
            )
        layout = self._layout(*params.shape[1:])
        y_rows = channels_last_rows(y.float().cpu())
        encoder = FrontEncoder(
            self.tables, layout.sizes, self.channels, self.fixed_point
        )
        estimated_bits = [0.0]

        def quantise(
            start: int, stop: int, front_indexes: Tensor, means: Tensor, scales: Tensor
        ) -> Tensor:
            values = torch.round(
                y_rows.index_select(0, layout.positions[start:stop]) - means
            ).int()
            likelihood = self.conditional._likelihood(values.float(), scales)
            bounded = self.conditional.likelihood_lower_bound(likelihood)
            bits = -bounded.log2().sum(dtype=torch.float64)
            estimated_bits[0] += float(bits)
            encoder.add(start, values, front_indexes)
            return values

        y_hat = self._scan(params, layout, quantise)
        return encoder.finish(), y_hat, estimated_bits[0]

    @torch.inference_mode()
    def decode(self, string: bytes, params: Tensor) -> Tensor:
        """Rebuild y_hat (M, H, W) from ``string`` and ``params`` (2M, H, W).

        Any string is safe to decode (:func:`~utils.coding.rans.safe_string`): a
        truncated or forged one gives a wrong y_hat, which the codec's checksum
        rejects, or a :class:`~utils.coding.payload.BitstreamError`.
        """
        self._check_params(params)
        layout = self._layout(*params.shape[1:])
        decoder = FrontDecoder(
            self.tables, string, layout.sizes, self.channels, self.fixed_point
        )

        def decode_front(start: int, _: int, indexes: Tensor, *__: Tensor) -> Tensor:
            return decoder.decode(start, indexes)

        return self._scan(params, layout, decode_front)
