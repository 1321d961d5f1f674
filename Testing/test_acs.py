"""ACS, Mean-ACS and Soft-ACS convolutions against their definitions (ACS paper, section III).

The reference for ACS is written here, independently of TransferSegLib.nets.acs: every 2D kernel
embedded in a zero K×K×K kernel, in the middle plane orthogonal to its view, then one
``F.conv3d`` with the same stride, padding, dilation and groups (non-zero padding modes: ``F.pad``
of all three axes first, as ``nn.Conv3d`` does). Mean-ACS and Soft-ACS: the same embedding with
every kernel in every view, averaged (eq. 4) or weighted (eq. 5).
"""
from __future__ import annotations

import itertools
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from TransferSegLib.nets import ACSConv, MeanACSConv, SoftACSConv, acs_channel_split
from TransferSegLib.volume import TransferSegError

OPERATORS = (ACSConv, MeanACSConv, SoftACSConv)

# acsconv 0.1.1's rule, written out: Co // 3 per view, the remainder to axial, then coronal.
SPLITS = {1: (1, 0, 0), 2: (1, 1, 0), 3: (1, 1, 1), 4: (2, 1, 1), 5: (2, 2, 1), 6: (2, 2, 2), 7: (3, 2, 2),
          8: (3, 3, 2), 32: (11, 11, 10), 64: (22, 21, 21)}

# (in_channels, out_channels, groups): plain; two groups with the coronal part cutting a group in
# two (Co = 6: views 0-1 | 2-3 | 4-5, groups 0-2 | 3-5); depthwise; depthwise with multiplier 2.
GROUPS = {"g1": (4, 5, 1), "g2": (4, 6, 2), "depthwise": (5, 5, 5), "depthwise_x2": (4, 8, 4)}
MODES = ("zeros", "reflect", "replicate", "circular")
STRIDE_PADDING = [(1, p) for p in (1, 2, "same", "valid")] + [(2, p) for p in (1, 2, "valid")]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tensors here are tiny; OpenMP threads only add waiting (a lot of it on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def embed(weight: torch.Tensor, views) -> torch.Tensor:
    """(Co, Ci/g, K, K) -> (Co, Ci/g, K, K, K): kernel o in the middle plane of views[o]
    (0 axial: the (H, W) plane at D = K//2; 1 coronal: (D, W) at H = K//2; 2 sagittal: (D, H) at W = K//2)."""
    co, k = weight.shape[0], weight.shape[-1]
    planes = []
    for o, view in enumerate(views):
        plane = torch.zeros((1, *weight.shape[1:2], k, k, k), dtype=weight.dtype)
        index = [slice(None)] * 5
        index[2 + view] = k // 2
        plane[tuple(index)] = weight[o]
        planes.append(plane)
    assert len(planes) == co
    return torch.cat(planes)


def conv3d_reference(x, kernel, bias, stride, padding, dilation, groups, padding_mode):
    if padding_mode == "zeros":
        return F.conv3d(x, kernel, bias, stride, padding, dilation, groups)
    k = kernel.shape[-1]
    if padding == "same":
        total = [d * (k - 1) for d in _triple(dilation)]
        pads = [(t // 2, t - t // 2) for t in total]
    elif padding == "valid":
        pads = [(0, 0)] * 3
    else:
        pads = [(p, p) for p in _triple(padding)]
    flat = [p for left, right in reversed(pads) for p in (left, right)]
    return F.conv3d(F.pad(x, flat, mode=padding_mode), kernel, bias, stride, 0, dilation, groups)


def _triple(v):
    return (v,) * 3 if isinstance(v, int) else tuple(v)


def reference(module, x, weight=None, bias=None, view_weights=None):
    """The definition of ``module``'s operator, from its arguments and (optionally given) parameters."""
    weight = module.weight if weight is None else weight
    bias = module.bias if bias is None else bias
    args = (module.stride, module.padding, module.dilation, module.groups, module.padding_mode)
    co = weight.shape[0]
    if isinstance(module, ACSConv):
        a, c, s = SPLITS[co]
        return conv3d_reference(x, embed(weight, [0] * a + [1] * c + [2] * s), bias, *args)
    views = [conv3d_reference(x, embed(weight, [v] * co), None, *args) for v in range(3)]
    if isinstance(module, SoftACSConv):
        alpha = module.view_weights if view_weights is None else view_weights
        y = sum(views[v] * alpha[:, v].view(1, -1, 1, 1, 1) for v in range(3))
    else:
        y = (views[0] + views[1] + views[2]) / 3
    return y if bias is None else y + bias.view(1, -1, 1, 1, 1)


def randomise_view_weights(module):
    if isinstance(module, SoftACSConv):
        with torch.no_grad():
            module.view_weights.copy_(torch.rand_like(module.view_weights) * 2 - 0.5)
    return module


def test_reference_embedding_matches_nn_conv3d():
    """The test's own reference agrees with torch's Conv3d module (reflect padding, groups)."""
    torch.manual_seed(0)
    acs = ACSConv(4, 6, 3, stride=2, padding=2, dilation=2, groups=2, padding_mode="reflect").double()
    conv = nn.Conv3d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2, padding_mode="reflect").double()
    with torch.no_grad():
        conv.weight.copy_(embed(acs.weight, [0, 0, 1, 1, 2, 2]))
        conv.bias.copy_(acs.bias)
    x = torch.randn(2, 4, 5, 6, 7, dtype=torch.float64)
    torch.testing.assert_close(reference(acs, x), conv(x))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("padding_mode", MODES)
@pytest.mark.parametrize("channels", GROUPS.values(), ids=GROUPS.keys())
@pytest.mark.parametrize("dilation", [1, 2], ids=["d1", "d2"])
@pytest.mark.parametrize("stride,padding", STRIDE_PADDING, ids=[f"s{s}-p{p}" for s, p in STRIDE_PADDING])
def test_equals_definition(stride, padding, dilation, channels, padding_mode, bias):
    """All three operators, float32 (the oneDNN channels-last path), batch 2, a 5×6×7 volume."""
    ci, co, groups = channels
    torch.manual_seed(zlib.crc32(repr((stride, padding, dilation, channels, padding_mode, bias)).encode()))
    x = torch.randn(2, ci, 5, 6, 7)
    for cls in OPERATORS:
        module = randomise_view_weights(cls(ci, co, 3, stride, padding, dilation, groups, bias, padding_mode))
        y = module(x)
        expected = reference(module, x)
        assert y.shape == expected.shape
        torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5, msg=lambda m: f"{cls.__name__}: {m}")


KERNEL_CASES = list(itertools.product([1, 2, 4], STRIDE_PADDING, [1, 2]))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # from the reference's conv3d
@pytest.mark.parametrize("k,stride_padding,dilation", KERNEL_CASES,
                         ids=[f"k{k}-s{s}-p{p}-d{d}" for k, (s, p), d in KERNEL_CASES])
def test_other_kernel_sizes(k, stride_padding, dilation):
    """1×1 and even kernels ('same' pads one more on the right, as nn.Conv3d), float64."""
    stride, padding = stride_padding
    torch.manual_seed(k * 100 + dilation)
    x = torch.randn(1, 4, 7, 8, 9, dtype=torch.float64)
    for cls, mode in zip(OPERATORS, ("zeros", "replicate", "circular")):
        module = randomise_view_weights(cls(4, 8, k, stride, padding, dilation, 4, True, mode).double())
        torch.testing.assert_close(module(x), reference(module, x), msg=lambda m: f"{cls.__name__} {mode}: {m}")


@pytest.mark.parametrize("co", sorted(SPLITS))
def test_channel_split_follows_acsconv(co):
    assert acs_channel_split(co) == SPLITS[co]
    assert ACSConv(3, co, 3).channel_split == SPLITS[co]


@pytest.mark.parametrize("co", [1, 2, 4])
def test_views_with_few_or_no_channels(co):
    """Co = 1 and 2 leave the sagittal (and coronal) view empty."""
    torch.manual_seed(co)
    module = ACSConv(3, co, 3, padding=1).double()
    x = torch.randn(1, 3, 4, 5, 6, dtype=torch.float64)
    torch.testing.assert_close(module(x), reference(module, x))


@pytest.mark.parametrize("cls", OPERATORS)
@pytest.mark.parametrize("config", [
    dict(stride=1, padding=1, groups=1, padding_mode="zeros"),
    dict(stride=2, padding="valid", dilation=2, groups=2, padding_mode="reflect"),
    dict(stride=1, padding="same", groups=6, padding_mode="circular"),
], ids=["plain", "strided-grouped-reflect", "depthwise-same-circular"])
def test_gradients_match_reference(cls, config):
    """weight, bias, input (and Soft-ACS view weight) gradients equal those through the embedded conv3d."""
    torch.manual_seed(1)
    module = randomise_view_weights(cls(6, 6, 3, **config).double())
    x = torch.randn(2, 6, 5, 6, 7, dtype=torch.float64, requires_grad=True)
    y = module(x)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    leaves = [module.weight.detach().clone().requires_grad_(True), module.bias.detach().clone().requires_grad_(True)]
    if cls is SoftACSConv:
        leaves.append(module.view_weights.detach().clone().requires_grad_(True))
    x2 = x.detach().clone().requires_grad_(True)
    expected = reference(module, x2, *leaves)
    expected.backward(grad_out)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(x.grad, x2.grad)
    mine = [module.weight, module.bias] + ([module.view_weights] if cls is SoftACSConv else [])
    for param, leaf in zip(mine, leaves):
        torch.testing.assert_close(param.grad, leaf.grad)


def test_gradcheck():
    module = ACSConv(2, 4, 3, padding=(1, 0, 2), dilation=(1, 2, 1), groups=2).double()
    x = torch.randn(1, 2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(module, (x,))


def test_parameter_count_is_the_2d_convs():
    conv = nn.Conv2d(16, 24, 3, groups=4)
    n = sum(p.numel() for p in conv.parameters())
    assert sum(p.numel() for p in ACSConv(16, 24, 3, groups=4).parameters()) == n
    assert sum(p.numel() for p in MeanACSConv(16, 24, 3, groups=4).parameters()) == n
    # Soft-ACS: C_o (C_i K² + 3) weights (ACS paper, Table III), plus the bias
    assert sum(p.numel() for p in SoftACSConv(16, 24, 3, groups=4).parameters()) == n + 3 * 24


@pytest.mark.parametrize("cls", OPERATORS)
def test_from_conv2d(cls):
    torch.manual_seed(2)
    conv = nn.Conv2d(4, 6, (3, 3), stride=(2, 2), padding=(1, 1), dilation=1, groups=2,
                     padding_mode="reflect").double().eval()
    conv.bias.requires_grad_(False)
    module = cls.from_conv2d(conv)
    assert module.weight.dtype == torch.float64 and not module.training
    assert module.weight.data_ptr() != conv.weight.data_ptr()
    torch.testing.assert_close(module.weight, conv.weight, rtol=0, atol=0)
    torch.testing.assert_close(module.bias, conv.bias, rtol=0, atol=0)
    assert module.weight.requires_grad and not module.bias.requires_grad
    assert (module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
            module.dilation, module.groups, module.padding_mode) == (4, 6, (3, 3), (2, 2, 2), (1, 1, 1), (1, 1, 1), 2,
                                                                      "reflect")
    x = torch.randn(1, 4, 5, 6, 7, dtype=torch.float64)
    torch.testing.assert_close(module(x), reference(module, x, conv.weight, conv.bias))
    with torch.no_grad():  # copied, not shared
        conv.weight.zero_()
    assert module.weight.abs().sum() > 0


def test_from_conv2d_without_bias_and_same_padding():
    conv = nn.Conv2d(3, 5, 3, padding="same", dilation=2, bias=False)
    module = ACSConv.from_conv2d(conv)
    assert module.bias is None and module.padding == "same" and module.dilation == (2, 2, 2)
    x = torch.randn(1, 3, 6, 7, 8)
    torch.testing.assert_close(module(x), reference(module, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cls", OPERATORS)
def test_state_dict_round_trip_and_conv2d_weights_load(cls):
    torch.manual_seed(3)
    module = randomise_view_weights(cls(4, 5, 3, padding=1))
    fresh = cls(4, 5, 3, padding=1)
    fresh.load_state_dict(module.state_dict(), strict=True)
    x = torch.randn(1, 4, 5, 6, 7)
    torch.testing.assert_close(fresh(x), module(x), rtol=0, atol=0)
    # weights interchange with the 2D conv: same keys, same shapes
    conv = nn.Conv2d(4, 5, 3, padding=1)
    extra = {"view_weights"} if cls is SoftACSConv else set()
    assert set(module.state_dict()) == set(conv.state_dict()) | extra
    fresh.load_state_dict(conv.state_dict(), strict=not extra)
    torch.testing.assert_close(fresh.weight, conv.weight, rtol=0, atol=0)


@pytest.mark.parametrize("cls", OPERATORS)
def test_to_dtype(cls):
    torch.manual_seed(4)
    module = randomise_view_weights(cls(4, 6, 3, padding=1, groups=2)).to(torch.float64)
    assert all(p.dtype == torch.float64 for p in module.parameters())
    x = torch.randn(1, 4, 5, 6, 7, dtype=torch.float64)
    y = module(x)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, reference(module, x))
    half = module.to(torch.bfloat16)
    assert half(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_layouts_and_unbatched_input():
    """Same values from NCDHW and channels_last_3d inputs and from an unbatched (C, D, H, W) input;
    the output is channels_last_3d (the layout the views are computed in)."""
    torch.manual_seed(5)
    module = ACSConv(4, 5, 3, padding=1)
    x = torch.randn(2, 4, 5, 6, 7)
    y = module(x)
    assert y.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(module(x.contiguous(memory_format=torch.channels_last_3d)), y, rtol=0, atol=0)
    torch.testing.assert_close(module(x[1]), y[1], rtol=1e-6, atol=1e-6)
    assert module(x[1]).shape == (5, 5, 6, 7)


@pytest.mark.parametrize("kwargs,message", [
    (dict(kernel_size=(3, 5)), "not square"),
    (dict(kernel_size=(3, 3, 3)), "kernel_size must be an int or a square pair"),
    (dict(kernel_size=0), "at least 1"),
    (dict(padding="same", stride=2), "not supported for strided"),
    (dict(padding="full"), "'same' or 'valid'"),
    (dict(padding=-1), "padding must be at least 0"),
    (dict(stride=(1, 2)), "differs between the two 2D axes"),
    (dict(stride=0), "stride must be at least 1"),
    (dict(dilation=(1, 2, 3, 4)), "dilation must be an int"),
    (dict(groups=4), "must divide both in_channels"),
    (dict(groups=0), "groups must be a positive integer"),
    (dict(padding_mode="mirror"), "padding_mode must be one of zeros, reflect, replicate, circular"),
])
@pytest.mark.parametrize("cls", OPERATORS)
def test_refuses_unsupported_arguments(cls, kwargs, message):
    arguments = dict(in_channels=4, out_channels=6, kernel_size=3) | kwargs
    with pytest.raises(TransferSegError, match=message):
        cls(**arguments)


def test_refusals_at_call_and_conversion():
    module = ACSConv(4, 6, 3)
    with pytest.raises(TransferSegError, match="expects a 5D tensor"):
        module(torch.randn(4, 8, 8))
    with pytest.raises(TransferSegError, match="expects 4 input channel"):
        module(torch.randn(1, 3, 8, 8, 8))
    with pytest.raises(TransferSegError, match="too small"):
        module(torch.randn(1, 4, 2, 8, 8))
    with pytest.raises(TransferSegError, match="reflect.*smaller than"):
        ACSConv(4, 6, 3, padding=2, padding_mode="reflect")(torch.randn(1, 4, 2, 8, 8))
    with pytest.raises(TransferSegError, match="needs an nn.Conv2d"):
        ACSConv.from_conv2d(nn.Conv3d(4, 6, 3))
    with pytest.raises(TransferSegError, match="not square"):
        ACSConv.from_conv2d(nn.Conv2d(4, 6, (1, 3)))
    with pytest.raises(TransferSegError, match="differs between the two 2D axes"):
        SoftACSConv.from_conv2d(nn.Conv2d(4, 6, 3, padding=(0, 1)))


def test_repr_names_the_arguments():
    text = repr(ACSConv(4, 6, 3, stride=2, padding=1, groups=2, bias=False, padding_mode="reflect"))
    assert text == ("ACSConv(4, 6, kernel_size=(3, 3), stride=(2, 2, 2), padding=(1, 1, 1), groups=2, bias=False, "
                    "padding_mode='reflect')")
