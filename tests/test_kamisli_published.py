"""Kamisli's published checkpoints (their module names) load into Kamisli2024."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import models
from models.kamisli2024.layers import block_mask, to_blocks

B, N, M, KS = 2, 16, 4, (3, 3, 1, 1)


def _authors_layout():
    """{name: shape} of the authors' v9 network for (B, N, M, KS), written from their
    module structure: every convolution is a masked one with a stored mask."""
    channels, k1, k2 = 3 * B * B, KS[0], KS[1]
    widths = (N, N // 8 * 7, N // 8 * 6)
    layout = {}

    def conv(name, cin, cout, k):
        layout.update(
            {
                f"{name}.weight": (cout, cin, k, k),
                f"{name}.bias": (cout,),
                f"{name}.mask": (cout, cin, k, k),
            }
        )

    def gdn(name, c):
        layout.update({f"{name}.beta": (c,), f"{name}.gamma": (c, c)})
        layout.update(
            {
                f"{name}.{p}_reparam.{b}": (1,)
                for p in ("beta", "gamma")
                for b in ("pedestal", "lower_bound.bound")
            }
        )

    conv("prtr_forward1", channels, N, 1)
    conv("prtr_forward2", channels, N, k1)
    conv("prtr_inverse1", M, N, 1)
    conv("prtr_inverse2", channels, N, k1)
    for net, out in (("prtr_forward3", M), ("prtr_inverse3", channels)):
        sizes = widths + (out,)
        for layer in range(3):
            gdn(f"{net}.{2 * layer}", sizes[layer])
            conv(f"{net}.{2 * layer + 1}", sizes[layer], sizes[layer + 1], 1)
    e = (channels, N // 8 * 12, N // 8 * 10, N // 8 * 8, 2 * M)
    for layer, k in enumerate((k1, k2, 1, 1)):
        conv(f"get_meanscale.{2 * layer}", e[layer], e[layer + 1], k)
    layout.update(
        {
            f"conditional_gaussian_model.{name}": (1,)
            for name in (
                "scale_bound",
                "likelihood_lower_bound.bound",
                "lower_bound_scale.bound",
            )
        }
    )
    return layout


def _mask(name, shape):
    kind = (
        "A"
        if name.startswith(("prtr_forward2", "prtr_inverse2", "get_meanscale.0"))
        else "B"
    )
    return block_mask(kind, shape[-1]).expand(shape).clone()


def _authors_state_dict():
    torch.manual_seed(0)
    state = {}
    for name, shape in _authors_layout().items():
        if name.endswith(".mask"):
            state[name] = _mask(name, shape)
        elif name.endswith(("pedestal", "bound")):
            state[name] = torch.full(shape, 1e-3)
        elif name.endswith((".beta", ".gamma")):
            state[name] = torch.rand(shape) * 0.1 + 0.5
        else:
            state[name] = torch.randn(shape) * 0.1
    return state


def _saved(tmp_path, state):
    path = tmp_path / "kamisli_published.pth.tar"
    torch.save({"epoch": 10, "state_dict": state}, path)
    return str(path)


def test_every_published_tensor_lands_under_its_mapped_name(tmp_path):
    state = _authors_state_dict()
    model = models.load_checkpoint(_saved(tmp_path, state), "cpu")
    assert type(model).__name__ == "Kamisli2024"
    assert (model.block_size, model.N, model.M, model.kernel_sizes) == (B, N, M, KS)
    ours = model.state_dict()
    renames = {
        "prtr_forward1": "g_a_source",
        "prtr_forward2": "g_a_context",
        "prtr_forward3": "g_a",
        "prtr_inverse1": "g_s_latent",
        "prtr_inverse2": "g_s_context",
        "prtr_inverse3": "g_s",
        "get_meanscale": "entropy_parameters",
        "conditional_gaussian_model": "gaussian_conditional",
    }
    mapped = set()
    for name, value in state.items():
        if name.endswith(".mask"):
            continue
        head, rest = name.split(".", 1)
        target = f"{renames[head]}.{rest}"
        assert torch.equal(ours[target], value), name
        mapped.add(target)
    tables = {
        k
        for k in ours
        if k.rsplit(".", 1)[-1]
        in ("_quantized_cdf", "_offset", "_cdf_length", "scale_table")
    }
    assert mapped | tables == set(ours)


class _AuthorsForward(nn.Module):
    """The authors' open-loop forward, with their module names and masks."""

    def __init__(self, state):
        super().__init__()
        self.state = state

    def conv(self, name, x):
        weight = self.state[f"{name}.weight"] * self.state[f"{name}.mask"]
        return F.conv2d(
            x, weight, self.state[f"{name}.bias"], padding=weight.shape[-1] // 2
        )

    def gdn(self, name, x, inverse):
        gamma = (
            self.state[f"{name}.gamma"] ** 2
            - self.state[f"{name}.gamma_reparam.pedestal"]
        )
        beta = (
            self.state[f"{name}.beta"] ** 2
            - self.state[f"{name}.beta_reparam.pedestal"]
        )
        norm = F.conv2d(x * x, gamma[:, :, None, None], beta)
        return x * (torch.sqrt(norm) if inverse else torch.rsqrt(norm))

    def stack(self, net, x, inverse):
        for layer in range(3):
            x = self.conv(
                f"{net}.{2 * layer + 1}", self.gdn(f"{net}.{2 * layer}", x, inverse)
            )
        return x

    def forward(self, blocks, context):
        y = self.stack(
            "prtr_forward3",
            self.conv("prtr_forward1", blocks) + self.conv("prtr_forward2", context),
            False,
        )
        h = context
        for layer in range(4):
            h = self.conv(f"get_meanscale.{2 * layer}", h)
            h = F.leaky_relu(h) if layer < 3 else h
        x_hat = self.stack(
            "prtr_inverse3",
            self.conv("prtr_inverse1", y.round()) + self.conv("prtr_inverse2", context),
            True,
        )
        return y, h, x_hat


def test_mapped_model_computes_what_the_authors_network_computes(tmp_path):
    state = _authors_state_dict()
    model = models.load_checkpoint(_saved(tmp_path, state), "cpu")
    torch.manual_seed(1)
    image = torch.rand(1, 3, 6 * B, 5 * B)
    blocks = to_blocks(image - 0.5, B)
    context = to_blocks(torch.rand_like(image) - 0.5, B)
    y, params, x_hat = _AuthorsForward(state)(blocks, context)
    with torch.no_grad():
        ours_y = model.g_a(model.g_a_source(blocks) + model.g_a_context(context))
        ours_params = model.entropy_parameters(context)
        ours_x_hat = model.g_s(
            model.g_s_latent(ours_y.round()) + model.g_s_context(context)
        )
    torch.testing.assert_close(ours_y, y)
    torch.testing.assert_close(ours_params, params)
    torch.testing.assert_close(ours_x_hat, x_hat)


def test_published_checkpoint_trained_under_another_mask_is_rejected(tmp_path):
    state = _authors_state_dict()
    state["get_meanscale.0.mask"][..., 1, 1] = 1  # kind B where theirs is kind A
    with pytest.raises(ValueError, match="mask of 'entropy_parameters.0' differs"):
        models.load_checkpoint(_saved(tmp_path, state), "cpu")


def test_foreign_entry_in_published_layout_is_named(tmp_path):
    state = _authors_state_dict()
    state["post_processing.weight"] = torch.zeros(1)
    with pytest.raises(
        ValueError, match="'post_processing.weight' is not part of Kamisli's"
    ):
        models.load_checkpoint(_saved(tmp_path, state), "cpu")
