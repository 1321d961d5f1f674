"""H-DenseUNet's networks (Li et al. 2018, sec. III, Table I): 2D DenseUNet-167, 3D DenseUNet-65,
F / F⁻¹, the hybrid feature fusion, DenseNet-161 weights, checkpointed dense blocks.

Full-size networks are only built on the meta device (no memory, no compute); everything that
runs uses small configurations of the same classes on small inputs.
"""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from TransferSegLib.nets import (ARCHITECTURES, DenseUNet2D, DenseUNet3D, HDenseUNet, SliceStack2D, build_network,
                                 from_adjacent_slices, load_densenet161_encoder, to_adjacent_slices)
from TransferSegLib.nets.denseunet import _DenseLayer
from TransferSegLib.volume import TransferSegError

SMALL = dict(init_channels=8, growth_rate=4, block_layers=[1, 2, 1, 1], decoder_channels=[16, 8, 8, 8, 6])


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def densenet_encoder_count(dims, cin, init, k, blocks, bn_size=4, compression=0.5):
    """Parameters of a DenseNet-BC ``features`` stack, from its layer layout; also returns the
    channels of the skips (stem, dense blocks but the last) and of the bottom."""
    cube = lambda s: s ** dims  # noqa: E731
    total, c, skips = cin * init * cube(7) + 2 * init, init, [init]  # conv0 (no bias), norm0
    for i, n in enumerate(blocks):
        for j in range(n):  # BN(c_j), 1×1 conv c_j → 4k, BN(4k), 3×3 conv 4k → k
            cj = c + j * k
            total += 2 * cj + cj * bn_size * k + 2 * bn_size * k + bn_size * k * k * cube(3)
        c += n * k
        if i < len(blocks) - 1:  # transition: BN(c), 1×1 conv c → c/2
            skips.append(c)
            total += 2 * c + c * int(c * compression)
            c = int(c * compression)
    return total + 2 * c, skips, c  # norm5


def test_full_size_parameter_counts_match_table_i_closed_form():
    with torch.device("meta"):
        net2d, net3d, hybrid = DenseUNet2D(), DenseUNet3D(in_channels=4), HDenseUNet()
        import torchvision
        densenet161 = torchvision.models.densenet161(weights=None)

    enc2d, skips2d, bottom2d = densenet_encoder_count(2, 3, 96, 48, [6, 12, 36, 24])
    assert (skips2d, bottom2d) == ([96, 384, 768, 2112], 2208)
    assert count(net2d.encoder) == enc2d == count(densenet161.features) == 26_472_000
    # Table I decoder, 2D: skip 2112 → 2208 by a 1×1 conv, then 3×3 convs 2208→768→384→96→96→64 + BN, 1×1 to 3
    dec2d = (2112 * 2208 + 9 * (2208 * 768 + 768 * 384 + 384 * 96 + 96 * 96 + 96 * 64)
             + 2 * (768 + 384 + 96 + 96 + 64) + 64 * 3 + 3)
    assert count(net2d) == enc2d + dec2d == 49_524_227

    enc3d, skips3d, bottom3d = densenet_encoder_count(3, 4, 96, 32, [3, 4, 12, 8])
    assert (skips3d, bottom3d) == ([96, 192, 224, 496], 504)
    # 3D: every skip projected (496→504, 224→504, 192→224, 96→192), 3×3×3 convs 504→504→224→192→96→64
    dec3d = (496 * 504 + 224 * 504 + 192 * 224 + 96 * 192
             + 27 * (504 * 504 + 504 * 224 + 224 * 192 + 192 * 96 + 96 * 64)
             + 2 * (504 + 224 + 192 + 96 + 64) + 64 * 3 + 3)
    assert count(net3d.encoder) == enc3d
    assert count(net3d) == enc3d + dec3d == 16_400_707

    hff = 27 * 64 * 64 + 2 * 64 + 64 * 3 + 3  # conv 3×3×3 (no bias), BN, conv 1×1×1 to 3
    assert count(hybrid.hff) == hff
    assert count(hybrid) == count(net2d) + (count(net3d) - (64 * 3 + 3)) + hff == 66_035_654


def test_full_size_shapes_on_meta():
    with torch.device("meta"):
        net2d, net3d = DenseUNet2D(), DenseUNet3D()
        assert net2d(torch.empty(2, 3, 224, 224)).shape == (2, 3, 224, 224)
        assert net3d(torch.empty(1, 1, 12, 224, 224)).shape == (1, 3, 12, 224, 224)  # paper 224×224×12
        hybrid = HDenseUNet()
        out = hybrid(torch.empty(1, 1, 8, 64, 64), heads=True)
    assert {k: tuple(v.shape) for k, v in out.items()} == {"hff": (1, 3, 8, 64, 64), "net2d": (1, 3, 8, 64, 64)}
    assert net2d.size_multiple == (32, 32) and net3d.size_multiple == (4, 32, 32)
    assert hybrid.size_multiple == (4, 32, 32)


def test_table_i_feature_sizes_3d():
    """Paper 224×224×12 input: stem 112×112×6, dense blocks at 56×56×3 … 7×7×3 (paper 2×2×1 pooling)."""
    sizes = {}
    with torch.device("meta"):
        net = DenseUNet3D()
        for name, module in net.encoder.named_children():
            module.register_forward_hook(lambda m, i, o, name=name: sizes.__setitem__(name, tuple(o.shape[2:])))
        net(torch.empty(1, 1, 12, 224, 224))
    assert sizes["relu0"] == (6, 112, 112)
    assert [sizes[f"denseblock{i}"] for i in range(1, 5)] == [(3, 56, 56), (3, 28, 28), (3, 14, 14), (3, 7, 7)]


def test_adjacent_slices_round_trip_and_edges():
    x = torch.randn(2, 1, 5, 4, 6)
    stacks = to_adjacent_slices(x)
    assert stacks.shape == (10, 3, 4, 6)
    assert torch.equal(from_adjacent_slices(stacks[:, 1:2], batch=2), x)  # F⁻¹ of F's centre channel
    v = x[:, 0]
    assert torch.equal(stacks[0], torch.stack([v[0, 0], v[0, 0], v[0, 1]]))  # first: (s0, s0, s1)
    assert torch.equal(stacks[4], torch.stack([v[0, 3], v[0, 4], v[0, 4]]))  # last: (s3, s4, s4)
    assert torch.equal(stacks[5], torch.stack([v[1, 0], v[1, 0], v[1, 1]]))  # second volume starts afresh
    assert torch.equal(stacks[7], v[1, 1:4])
    # the same neighbour triples as SliceStack2D, written independently (and chunked)
    assert torch.equal(from_adjacent_slices(stacks, batch=2), SliceStack2D(nn.Identity(), 3, slice_batch=3)(x))
    with pytest.raises(TransferSegError, match="equal depth"):
        from_adjacent_slices(stacks, batch=3)
    with pytest.raises(TransferSegError, match="1 input channel"):
        to_adjacent_slices(torch.zeros(1, 2, 3, 4, 4))


@pytest.mark.parametrize("cls, shape", [(DenseUNet2D, (2, 3, 32, 64)), (DenseUNet3D, (2, 1, 4, 32, 32))])
def test_small_forward_backward_and_config(cls, shape):
    torch.manual_seed(0)
    net = cls(**SMALL)
    x = torch.randn(shape)
    y = net(x)
    assert y.shape == (shape[0], 3, *shape[2:])
    y.square().mean().backward()
    assert all(p.grad is not None for p in net.parameters())
    groups = net.parameter_groups()
    assert sorted(map(id, groups["encoder"] + groups["decoder"])) == sorted(map(id, net.parameters()))
    rebuilt = build_network(cls.architecture_name, json.loads(json.dumps(net.config)))
    rebuilt.load_state_dict(net.state_dict())  # strict: same layout from the card's config
    net.eval(), rebuilt.eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), net(x))


def test_unet_connections_switch_keeps_weights():
    torch.manual_seed(0)
    net = DenseUNet2D(**SMALL).eval()
    x = torch.randn(1, 3, 32, 32)
    plain = DenseUNet2D(**dict(SMALL, unet_connections=False)).eval()
    plain.load_state_dict(net.state_dict())  # warm-up and fine-tuning share one state dict (sec. III-C)
    with torch.no_grad():
        assert not torch.allclose(plain(x), net(x))
        net.unet_connections = False
        assert torch.equal(plain(x), net(x))
    plain.train()
    plain(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is None for p in plain.skip_projections.parameters())


def test_bad_inputs_and_configs_are_refused_clearly():
    net = DenseUNet3D(**SMALL)
    with pytest.raises(TransferSegError, match="not a multiple of 4×32×32"):
        net(torch.zeros(1, 1, 6, 32, 32))
    with pytest.raises(TransferSegError, match="5D tensor"):
        net(torch.zeros(1, 1, 32, 32))
    with pytest.raises(TransferSegError, match="decoder_channels needs one entry per upsampling layer"):
        DenseUNet2D(block_layers=[6, 12, 36, 24], decoder_channels=[768, 384, 96, 64])
    with pytest.raises(TransferSegError, match="compression"):
        DenseUNet2D(**SMALL, compression=0)
    with pytest.raises(TransferSegError, match="hff_channels=64"):
        HDenseUNet(net2d=SMALL, net3d=SMALL)
    with pytest.raises(TransferSegError, match="in_channels=1 cannot be chosen"):
        HDenseUNet(net2d=SMALL, net3d=dict(SMALL, in_channels=1), hff_channels=6)
    with pytest.raises(TransferSegError, match="unknown architecture"):
        build_network("denseunet", {})
    assert {"denseunet2d", "denseunet3d", "hdenseunet"} <= set(ARCHITECTURES)


@pytest.mark.parametrize("cls, shape", [(DenseUNet2D, (3, 3, 32, 32)), (DenseUNet3D, (2, 1, 4, 32, 32))])
def test_memory_efficient_blocks_equal_plain_ones(cls, shape, monkeypatch):
    torch.manual_seed(0)
    plain = cls(**SMALL).double()
    saving = cls(**SMALL, memory_efficient=True).double()
    saving.load_state_dict(plain.state_dict())
    x = torch.randn(shape, dtype=torch.float64)
    calls = []
    original = _DenseLayer._bottleneck
    monkeypatch.setattr(_DenseLayer, "_bottleneck", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    y_plain = plain(x)
    y_plain.square().mean().backward()
    plain_calls = len(calls)
    y_saving = saving(x)
    y_saving.square().mean().backward()
    assert len(calls) - plain_calls == 2 * plain_calls  # each bottleneck recomputed in backward
    assert torch.allclose(y_saving, y_plain, rtol=0, atol=1e-12)
    for (name, p), q in zip(plain.named_parameters(), saving.parameters()):
        assert torch.allclose(q.grad, p.grad, rtol=0, atol=1e-12), name
    for (name, b), c in zip(plain.named_buffers(), saving.buffers()):  # running stats updated once
        assert torch.allclose(c, b, rtol=0, atol=1e-12), name


def test_densenet161_weights_load_into_encoder(tmp_path):
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(1234)
    densenet161 = torchvision.models.densenet161(weights=None).eval()
    for m in densenet161.modules():  # non-trivial running statistics, so copying them is tested
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "densenet161.safetensors"
    save_file({k: v.contiguous() for k, v in densenet161.state_dict().items()}, str(path))

    with torch.device("meta"):
        net = DenseUNet2D()
    net = net.to_empty(device="cpu").eval()  # no time spent initialising 49 M weights
    report = load_densenet161_encoder(net, path)
    assert report["missing"] == [] and report["unexpected"] == ["classifier.bias", "classifier.weight"]
    assert len(report["loaded"]) == len(densenet161.features.state_dict())
    for key, value in densenet161.features.state_dict().items():
        assert torch.equal(net.encoder.state_dict()[key], value), key
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(net.encoder(x), densenet161.features(x))

    with pytest.raises(TransferSegError, match="do not fit the encoder"):
        load_densenet161_encoder(DenseUNet2D(**SMALL), path)
    with pytest.raises(TransferSegError, match="pickle"):
        load_densenet161_encoder(net, tmp_path / "densenet161.pth")


def test_old_style_densenet_keys_and_unmatched_report(tmp_path):
    """torchvision's pre-0.3 files name layer weights "norm.1.weight"; a small DenseNet of the
    same layout as a small DenseUNet2D checks the renaming and the missing-key report."""
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(0)
    densenet = torchvision.models.DenseNet(growth_rate=4, block_config=(1, 2, 1, 1), num_init_features=8).eval()
    state = {k: v for k, v in densenet.state_dict().items() if k != "features.norm5.weight"}
    old = {k.replace("norm1.", "norm.1.").replace("conv2.", "conv.2."): v for k, v in state.items()}
    assert any("norm.1." in k for k in old)
    save_file(old, str(tmp_path / "old.safetensors"))
    net = DenseUNet2D(**SMALL).eval()
    report = load_densenet161_encoder(net, tmp_path / "old.safetensors")
    assert report["missing"] == ["norm5.weight"]
    for key, value in state.items():
        if key.startswith("features."):
            assert torch.equal(net.encoder.state_dict()[key[len("features."):]], value), key


def test_hdenseunet_wiring_heads_and_groups():
    torch.manual_seed(0)
    config = dict(net2d=SMALL, net3d=SMALL, hff_channels=6, logit_scale=250.0)
    net = build_network("hdenseunet", config).eval()
    x = torch.randn(2, 1, 4, 32, 32)
    with torch.no_grad():
        out = net(x, heads=True)
        assert torch.equal(net(x), out["hff"])
        # the 2D head for slice d is the 2D network on slices (d-1, d, d+1), clamped, of that volume
        for n, d in [(0, 0), (1, 2), (1, 3)]:
            triple = x[n, 0, [max(d - 1, 0), d, min(d + 1, 3)]][None]
            assert torch.allclose(out["net2d"][n, :, d], net.net2d(triple)[0], atol=1e-5)
        # HFF = fusion of the summed 64(here 6)-channel features; the 3D net sees image + 250 × 2D logits
        f2d = from_adjacent_slices(net.net2d.features(to_adjacent_slices(x)), 2)
        f3d = net.net3d.features(torch.cat([x, 250.0 * out["net2d"]], 1))
        assert torch.allclose(out["hff"], net.hff(f2d + f3d), atol=1e-5)
    assert net.net3d.head is None and net.net3d.config["in_channels"] == 4
    groups = net.parameter_groups()
    assert set(groups) == {"net2d", "net3d", "hff"}
    assert sorted(id(p) for g in groups.values() for p in g) == sorted(map(id, net.parameters()))
    rebuilt = build_network("hdenseunet", json.loads(json.dumps(net.config)))
    rebuilt.load_state_dict(net.state_dict())

    net.train()
    heads = net(x, heads=True)
    (0.5 * heads["net2d"].square().mean() + heads["hff"].square().mean()).backward()  # L_total's shape
    assert all(p.grad is not None for p in net.parameters())
    with pytest.raises(TransferSegError, match="not a multiple of 4×32×32"):
        net(torch.zeros(1, 1, 5, 32, 32))
