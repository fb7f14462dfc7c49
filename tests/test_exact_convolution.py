"""The exact convolutions: PyTorch's values, and bits that do not depend on the crop."""

import pytest
import torch
import torch.nn.functional as F

from utils.stitching.exact_convolution import (
    ROWS,
    ExactConvolutions,
    exact_conv2d,
    exact_conv_transpose2d,
)

# Forms the CPS transforms use: (kind, kernel, stride).
FORMS = [
    ("conv", 2, 2),
    ("conv", 3, 1),
    ("conv", 1, 1),
    ("transpose", 2, 2),
    ("transpose", 3, 1),
    ("transpose", 1, 1),
]


def channels_last(tensor):
    return tensor.contiguous(memory_format=torch.channels_last)


def layer(kind, kernel, in_ch=5, out_ch=7, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shape = (out_ch, in_ch) if kind == "conv" else (in_ch, out_ch)
    weight = torch.randn(*shape, kernel, kernel, generator=generator) / kernel
    bias = torch.randn(out_ch, generator=generator)
    return weight, bias


def apply(kind, x, weight, bias, stride, exact):
    if kind == "conv":
        return (exact_conv2d if exact else F.conv2d)(x, weight, bias, stride)
    return (exact_conv_transpose2d if exact else F.conv_transpose2d)(
        x, weight, bias, stride
    )


@pytest.mark.parametrize("kind, kernel, stride", FORMS)
@pytest.mark.parametrize("with_bias", [True, False])
def test_exact_convolutions_compute_what_pytorch_computes(
    kind, kernel, stride, with_bias
):
    weight, bias = layer(kind, kernel)
    bias = bias if with_bias else None
    x = channels_last(
        torch.randn(2, 5, 22, 30, generator=torch.Generator().manual_seed(1))
    )
    expected = apply(kind, x, weight, bias, stride, exact=False)
    got = apply(kind, x, weight, bias, stride, exact=True)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind, kernel, stride", FORMS)
def test_a_crop_computes_the_same_bits_as_the_whole_input(kind, kernel, stride):
    """Every output a crop can compute equals the whole input's, bit for bit, whether
    the crop is a few rows of one product or spans several (ROWS rows each), and
    whatever the batch it sits in."""
    weight, bias = layer(kind, kernel, in_ch=16, out_ch=12)
    generator = torch.Generator().manual_seed(2)
    whole_input = channels_last(torch.randn(1, 16, 96, 90, generator=generator))
    assert 96 * 90 > ROWS  # the whole input needs several products
    whole = apply(kind, whole_input, weight, bias, stride, exact=True)
    for top, left, height, width in [
        (0, 0, 96, 90),
        (4, 6, 10, 12),
        (2, 8, 50, 64),
        (30, 20, 66, 70),
    ]:
        crop = whole_input[:, :, top : top + height, left : left + width]
        batch = channels_last(
            torch.cat([torch.randn_like(crop), crop, torch.randn_like(crop)])
        )
        for source, index in ((channels_last(crop), 0), (batch, 1)):
            part = apply(kind, source, weight, bias, stride, exact=True)[
                index : index + 1
            ]
            if kind == "conv":  # a valid convolution: every output is computable
                top_out, left_out = top // stride, left // stride
                expected = whole[
                    :,
                    :,
                    top_out : top_out + part.shape[2],
                    left_out : left_out + part.shape[3],
                ]
                assert torch.equal(part, expected)
            else:  # a transposed one: all but a (kernel - 1)-wide border when stride 1
                margin = kernel - 1 if stride == 1 else 0
                inner = part[
                    :,
                    :,
                    margin : part.shape[2] - margin,
                    margin : part.shape[3] - margin,
                ]
                top_out, left_out = top * stride + margin, left * stride + margin
                expected = whole[
                    :,
                    :,
                    top_out : top_out + inner.shape[2],
                    left_out : left_out + inner.shape[3],
                ]
                assert torch.equal(inner, expected)


def test_the_mode_routes_conv_layers_and_leaves_other_forms_to_pytorch():
    torch.manual_seed(3)
    x = channels_last(torch.randn(1, 4, 20, 20))
    layers = [
        torch.nn.Conv2d(4, 6, 3),
        torch.nn.ConvTranspose2d(4, 6, 2, stride=2),
        torch.nn.Conv2d(4, 6, 3, padding=1),
        torch.nn.Conv2d(4, 6, 3, groups=2),
        torch.nn.Conv2d(4, 6, 3, stride=2),
    ]
    with torch.inference_mode():
        for module in layers:
            expected = module(x)
            with ExactConvolutions():
                got = module(x)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        with ExactConvolutions():
            assert torch.equal(
                layers[0](x), exact_conv2d(x, layers[0].weight, layers[0].bias)
            )
            native = layers[2](x)
        assert torch.equal(native, layers[2](x))  # padded: PyTorch's own convolution


def test_an_input_smaller_than_the_kernel_gets_pytorchs_error():
    with pytest.raises(RuntimeError, match="[Kk]ernel size"), ExactConvolutions():
        torch.nn.Conv2d(4, 6, 3)(channels_last(torch.randn(1, 4, 2, 8)))
