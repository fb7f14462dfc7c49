"""Classical image codecs as baselines, coded for real and decoded back to 8-bit RGB.

Each codec turns a uint8 RGB image (3, H, W) and one quality value into the exact
bytes of its file and the decoded image. The rate of a baseline is therefore the
size of what the codec writes (headers included), like the ``.cps`` files.

Quality is given in each codec's own scale (the ``-q`` values of ``test.py codec``):

========  =====================================  ===========================  =========
codec     implementation                         quality                      better is
========  =====================================  ===========================  =========
jpeg      Pillow (libjpeg), 4:2:0                quality 1..100               higher
webp      Pillow (libwebp), method 4             quality 0..100               higher
jpeg2000  Pillow (OpenJPEG), 9/7 wavelet + MCT,  compression ratio >= 1       lower
          raw J2K codestream
avif      Pillow (libavif, AV1 intra), 4:4:4     quality 0..100               higher
x265      ffmpeg + libx265 (HEVC intra),         QP 0..51                     lower
          YCbCr 4:4:4 full range, raw stream
jxl       cjxl/djxl (libjxl)                     quality 4.05..100 (cjxl -q)  higher
========  =====================================  ===========================  =========

cjxl documents its quality as -inf..100 but turns it into a butteraugli distance,
and libjxl refuses distances above 25: with libjxl 0.7 (Debian's package, which
``.ci/run`` installs), qualities below 4.05. Later versions map qualities to distances
differently; the bound is that of the version the results are made with.

x265 and jxl run the Debian command-line tools (packages ``ffmpeg`` and
``libjxl-tools``); a missing tool is reported as one line naming the package. Their
times include starting the tool's process.
"""

import io
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import numpy as np
import torch
from PIL import Image, features
from torch import Tensor

from utils.evaluation.codec_limits import ANY_SIZE, QualityScale, SizeLimits
from utils.image_io import beyond_pil_limit


@dataclass
class ClassicalResult:
    """One image coded at one quality: the file bytes and the decoded image."""

    data: bytes
    reconstruction: Tensor  # uint8 (3, H, W)
    encoding_time: float
    decoding_time: float


def _check_request(codec, image: Tensor, quality: float) -> None:
    """Refuse what ``codec`` cannot code: a quality off its scale, anything but a
    uint8 RGB image (3, H, W), or a size beyond its library's limits."""
    codec.scale.check(codec.name, quality)
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(
            f"expected a uint8 tensor (3, H, W), got {image.dtype} {tuple(image.shape)}"
        )
    codec.sizes.check(codec.name, *image.shape[1:])


def _to_pil(image: Tensor) -> Image.Image:
    return Image.fromarray(image.permute(1, 2, 0).cpu().numpy(), mode="RGB")


def _from_pil(picture: Image.Image) -> Tensor:
    array = np.asarray(picture.convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def _decode_pil(source) -> Tensor:
    """The RGB image PIL decodes from ``source``, a file's path or its bytes (opened
    afresh at each call: :func:`~utils.image_io.beyond_pil_limit` may call twice)."""
    file = io.BytesIO(source) if isinstance(source, bytes) else source
    with Image.open(file) as decoded:
        decoded.load()
        return _from_pil(decoded)


class PillowCodec:
    """A codec Pillow can write and read in memory."""

    def __init__(
        self,
        name: str,
        pil_format: str,
        feature: str,
        scale: QualityScale,
        options: Callable[[float], dict],
        summary: str,
        sizes: SizeLimits = ANY_SIZE,
    ):
        self.name, self.pil_format, self.feature = name, pil_format, feature
        self.scale, self.options, self.summary = scale, options, summary
        self.sizes = sizes

    def check_available(self) -> None:
        if not features.check(self.feature):
            raise RuntimeError(
                f"codec {self.name} needs Pillow built with {self.feature} support; "
                "install the pinned Pillow wheel (pip install -r requirements.txt)"
            )

    def code(self, image: Tensor, quality: float) -> ClassicalResult:
        _check_request(self, image, quality)
        picture = _to_pil(image)
        buffer = io.BytesIO()
        start = time.perf_counter()
        picture.save(buffer, format=self.pil_format, **self.options(quality))
        encoding_time = time.perf_counter() - start
        data = buffer.getvalue()
        start = time.perf_counter()
        reconstruction = beyond_pil_limit(_decode_pil, data)
        return ClassicalResult(
            data, reconstruction, encoding_time, time.perf_counter() - start
        )


class ToolCodec:
    """A codec run through command-line tools on files in a temporary folder.

    ``encode``/``decode`` build the argument lists from the folder's file names;
    the encoder reads ``input.png`` (or raw RGB for ffmpeg) and writes ``stream``.
    """

    def __init__(
        self,
        name: str,
        tools: List[str],
        package: str,
        scale: QualityScale,
        encode: Callable[[str, float, Tuple[int, int]], List[List[str]]],
        decode: Callable[[str, Tuple[int, int]], List[List[str]]],
        raw_io: bool,
        summary: str,
        sizes: SizeLimits = ANY_SIZE,
    ):
        self.name, self.tools, self.package = name, tools, package
        self.scale, self.encode, self.decode = scale, encode, decode
        self.raw_io, self.summary, self.sizes = raw_io, summary, sizes

    def check_available(self) -> None:
        for tool in self.tools:
            if shutil.which(tool) is None:
                raise RuntimeError(
                    f"codec {self.name} needs the {tool} command: "
                    f"apt-get install {self.package}"
                )

    def code(self, image: Tensor, quality: float) -> ClassicalResult:
        _check_request(self, image, quality)
        height, width = image.shape[1:]
        self.check_available()
        with tempfile.TemporaryDirectory(prefix=f"cps-{self.name}-") as folder:
            source = os.path.join(folder, "input.rgb" if self.raw_io else "input.png")
            if self.raw_io:
                with open(source, "wb") as handle:
                    handle.write(image.permute(1, 2, 0).contiguous().numpy().tobytes())
            else:
                _to_pil(image).save(source, format="PNG")
            start = time.perf_counter()
            for command in self.encode(folder, quality, (height, width)):
                _run(self.name, command)
            encoding_time = time.perf_counter() - start
            with open(os.path.join(folder, "stream"), "rb") as handle:
                data = handle.read()
            start = time.perf_counter()
            for command in self.decode(folder, (height, width)):
                _run(self.name, command)
            decoding_time = time.perf_counter() - start
            reconstruction = _read_decoded(folder, self.raw_io, height, width)
        return ClassicalResult(data, reconstruction, encoding_time, decoding_time)


def _run(codec: str, command: List[str]) -> None:
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if done.returncode != 0:
        message = (
            (done.stderr or done.stdout).decode(errors="replace").strip().splitlines()
        )
        detail = message[-1] if message else f"exit status {done.returncode}"
        raise RuntimeError(f"codec {codec}: {command[0]} failed: {detail}")


def _read_decoded(folder: str, raw_io: bool, height: int, width: int) -> Tensor:
    if raw_io:
        with open(os.path.join(folder, "output.rgb"), "rb") as handle:
            raw = handle.read()
        if len(raw) != height * width * 3:
            raise RuntimeError(
                f"decoder wrote {len(raw)} bytes, expected {height}x{width}x3"
            )
        array = np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3)
        return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()
    return beyond_pil_limit(_decode_pil, os.path.join(folder, "output.png"))


# ffmpeg converts RGB to YCbCr and back with the same explicit matrix and full range,
# so the only loss is the codec's (limited range would also clip and requantise).
_YUV = "bt709"
_FFMPEG = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin", "-y"]


def _x265_encode(folder: str, qp: float, size: Tuple[int, int]) -> List[List[str]]:
    height, width = size
    return [
        _FFMPEG
        + [
            "-f",
            "rawvideo",
            "-pix_fmt",
            "rgb24",
            "-s",
            f"{width}x{height}",
            "-i",
            os.path.join(folder, "input.rgb"),
            "-vf",
            f"scale=out_color_matrix={_YUV}:out_range=full",
            "-pix_fmt",
            "yuv444p",
            "-c:v",
            "libx265",
            "-preset",
            "medium",
            "-x265-params",
            f"qp={int(qp)}:keyint=1:range=full:colormatrix={_YUV}:log-level=error",
            "-frames:v",
            "1",
            "-f",
            "hevc",
            os.path.join(folder, "stream"),
        ]
    ]


def _x265_decode(folder: str, size: Tuple[int, int]) -> List[List[str]]:
    return [
        _FFMPEG
        + [
            "-f",
            "hevc",
            "-i",
            os.path.join(folder, "stream"),
            "-vf",
            f"scale=in_color_matrix={_YUV}:in_range=full",
            "-pix_fmt",
            "rgb24",
            "-frames:v",
            "1",
            "-f",
            "rawvideo",
            os.path.join(folder, "output.rgb"),
        ]
    ]


def _jxl_encode(folder: str, quality: float, size: Tuple[int, int]) -> List[List[str]]:
    return [
        [
            "cjxl",
            os.path.join(folder, "input.png"),
            os.path.join(folder, "stream"),
            "-q",
            f"{quality:g}",
        ]
    ]


def _jxl_decode(folder: str, size: Tuple[int, int]) -> List[List[str]]:
    return [
        ["djxl", os.path.join(folder, "stream"), os.path.join(folder, "output.png")]
    ]


_PERCENT = QualityScale(0, 100, True, "0..100, higher is better")

CODECS: Dict[str, object] = {
    "jpeg": PillowCodec(
        "jpeg",
        "JPEG",
        "jpg",
        QualityScale(1, 100, True, "1..100, higher is better"),
        lambda q: {"quality": int(q)},
        "JPEG (Pillow/libjpeg, 4:2:0)",
        SizeLimits(high=65500),  # libjpeg's JPEG_MAX_DIMENSION
    ),
    "webp": PillowCodec(
        "webp",
        "WEBP",
        "webp",
        _PERCENT,
        lambda q: {"quality": int(q), "method": 4},
        "WebP (Pillow/libwebp, method 4)",
        SizeLimits(high=16383),  # WEBP_MAX_DIMENSION
    ),
    "jpeg2000": PillowCodec(
        "jpeg2000",
        "JPEG2000",
        "jpg_2000",
        QualityScale(1, float("inf"), False, "compression ratio, lower is better"),
        lambda q: {
            "quality_mode": "rates",
            "quality_layers": [q],
            "irreversible": True,
            "mct": 1,
            "no_jp2": True,
        },
        "JPEG 2000 (Pillow/OpenJPEG, 9/7 wavelet, RGB->YCbCr, J2K codestream)",
    ),
    "avif": PillowCodec(
        "avif",
        "AVIF",
        "avif",
        _PERCENT,
        lambda q: {"quality": int(q), "subsampling": "4:4:4", "speed": 6},
        "AVIF (Pillow/libavif, AV1 intra, 4:4:4, speed 6)",
        # libavif's decoder limits (AVIF_DEFAULT_IMAGE_DIMENSION_LIMIT and
        # AVIF_DEFAULT_IMAGE_SIZE_LIMIT): its encoder writes larger images.
        SizeLimits(high=32768, pixels=16384 * 16384),
    ),
    "x265": ToolCodec(
        "x265",
        ["ffmpeg"],
        "ffmpeg",
        QualityScale(0, 51, True, "QP 0..51, lower is better"),
        _x265_encode,
        _x265_decode,
        raw_io=True,
        summary="HEVC intra (ffmpeg/libx265, preset medium, YCbCr 4:4:4 BT.709 "
        "full range, raw Annex-B stream)",
        # libx265 through ffmpeg fails to open a smaller picture (16x16 codes, 9 or
        # 15 pixels a side do not). Under 32 pixels a side it codes 16-pixel coding
        # tree units, which HEVC level 5 forbids, and a side over 4216 pixels (4224
        # once padded to its 8-pixel grid) needs level 5: it refuses such a picture.
        sizes=SizeLimits(low=16, thin=(32, 4216)),
    ),
    "jxl": ToolCodec(
        "jxl",
        ["cjxl", "djxl"],
        "libjxl-tools",
        QualityScale(
            4.05, 100, False, "cjxl quality, 100 = lossless, higher is better"
        ),
        _jxl_encode,
        _jxl_decode,
        raw_io=False,
        summary="JPEG XL (cjxl/djxl, effort 7)",
    ),
}


def get_codec(name: str):
    """The codec called ``name``, checked to be usable on this machine."""
    try:
        codec = CODECS[name]
    except KeyError:
        raise ValueError(
            f"unknown codec {name!r}; choose from {', '.join(CODECS)}"
        ) from None
    codec.check_available()
    return codec
