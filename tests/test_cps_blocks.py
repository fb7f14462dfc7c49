"""The CPS blocks compute the dataflow that Fig. 3 draws, written out by hand."""

import pytest
import torch
import torch.nn.functional as F

from models.cps.layers import BRB, EDRB, EURB


def _lrelu(t):
    return F.leaky_relu(t, negative_slope=0.01)  # PyTorch's default slope


def _gdn(t, gdn, inverse=False):
    """y = x / sqrt(beta + gamma * x^2) (Ballé et al.); the inverse multiplies."""
    beta, gamma = gdn.beta_reparam(gdn.beta), gdn.gamma_reparam(gdn.gamma)
    norm = torch.sqrt(F.conv2d(t * t, gamma[:, :, None, None], beta))
    return t * norm if inverse else t / norm


def _brb(b, x):
    # x ─┬─ convKxK ─ LReLU ─ tconvKxK ─ LReLU ─(+)─►
    #    └────────── identity (or conv1x1) ──────┘
    out = _lrelu(F.conv2d(x, b.conv1.weight, b.conv1.bias))
    out = _lrelu(F.conv_transpose2d(out, b.conv2.weight, b.conv2.bias))
    skip = x if b.skip is None else F.conv2d(x, b.skip.weight, b.skip.bias)
    return out + skip


def _edrb(b, x):
    # x ─┬─ conv2x2/2 ─ LReLU ─ conv1x1 ─ GDN ─(+)─►
    #    └──────────── conv2x2/2 ─────────────┘
    out = _lrelu(F.conv2d(x, b.conv1.weight, b.conv1.bias, stride=2))
    out = _gdn(F.conv2d(out, b.conv2.weight, b.conv2.bias), b.gdn)
    return out + F.conv2d(x, b.skip.weight, b.skip.bias, stride=2)


def _eurb(b, x):
    # x ─┬─ tconv2x2/2 ─ LReLU ─ conv1x1 ─ IGDN ─(+)─►
    #    └──────────── tconv2x2/2 ──────────────┘
    s = b.subpel_conv
    out = _lrelu(F.conv_transpose2d(x, s.weight, s.bias, stride=2))
    out = _gdn(F.conv2d(out, b.conv.weight, b.conv.bias), b.igdn, inverse=True)
    return out + F.conv_transpose2d(x, b.upsample.weight, b.upsample.bias, stride=2)


@pytest.mark.parametrize(
    "make, reference, in_ch, size, out_size",
    [
        (lambda: BRB(4, 4), _brb, 4, (7, 9), (7, 9)),
        (lambda: BRB(3, 5), _brb, 3, (7, 9), (7, 9)),
        (lambda: BRB(4, 4, kernel_size=1), _brb, 4, (5, 3), (5, 3)),
        (lambda: EDRB(3, 6), _edrb, 3, (6, 10), (3, 5)),
        (lambda: EURB(6, 3), _eurb, 6, (3, 5), (6, 10)),
    ],
    ids=["BRB", "BRB with a 1x1 skip", "BRB 1x1", "EDRB", "EURB"],
)
def test_each_block_computes_the_dataflow_its_docstring_draws(
    make, reference, in_ch, size, out_size
):
    torch.manual_seed(0)
    block = make().double()
    x = torch.randn(2, in_ch, *size, dtype=torch.float64)
    with torch.no_grad():
        expected = reference(block, x)
        got = block(x.clone())
    assert got.shape[-2:] == expected.shape[-2:] == out_size
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12)
