"""UDFC, TRP, FLOP counting and the `prunekit cnn` CLI on tiny synthetic CNNs (no dataset, a few seconds)."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil

import pytest
import torch
from torch import nn

from prunekit.cli import main
from prunekit.cnn import flops, resnet, trp, udfc
from prunekit.errors import InputError


class Pair(nn.Module):
    """conv1 -> bn1 -> ReLU -> conv2 -> bn2: the chain UDFC compensates."""

    def __init__(self, cin=4, mid=6, cout=5):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, mid, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x):
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))


def calibrated_pair(seed=0, cin=4, mid=6, cout=5, n=512):
    """A pair whose BN statistics are the exact statistics of white Gaussian inputs ``x``."""
    torch.manual_seed(seed)
    net = Pair(cin, mid, cout)
    with torch.no_grad():
        net.bn1.weight.uniform_(0.5, 1.5)
        net.bn1.bias.uniform_(-0.5, 0.5)
    x = torch.randn(n, cin, 8, 8)
    for bn in (net.bn1, net.bn2):
        bn.momentum = None  # cumulative average: one pass gives the exact statistics
    net.train()
    with torch.no_grad():
        net(x)
    return net.eval(), x


# ---- UDFC -------------------------------------------------------------------------------------------------

def test_planted_multiple_channel_is_recovered_exactly():
    torch.manual_seed(0)
    net = Pair(cin=4, mid=6, cout=5)
    kappa, scale = 0.5, 1.7  # w_5 = kappa * w_2 (smallest norm: pruned); bn makes h_5 = scale * h_2
    with torch.no_grad():
        net.conv1.weight.mul_(4.0)
        net.conv1.weight[5] = kappa * net.conv1.weight[2]
        net.bn1.running_mean.uniform_(-0.3, 0.3)
        net.bn1.running_var.uniform_(0.5, 2.0)
        net.bn1.weight.uniform_(0.5, 1.5)
        net.bn1.bias.uniform_(-0.5, 0.5)
        eps = net.bn1.eps
        # u_5 = kappa u_2, so its mean and sd are kappa times channel 2's (sd includes eps)
        net.bn1.running_mean[5] = kappa * net.bn1.running_mean[2]
        net.bn1.running_var[5] = kappa**2 * (net.bn1.running_var[2] + eps) - eps
        net.bn1.weight[5] = scale * net.bn1.weight[2]
        net.bn1.bias[5] = scale * net.bn1.bias[2]
        net.bn2.running_var.uniform_(0.5, 2.0)
    net.eval()
    x = torch.randn(16, 4, 8, 8)
    ref = net(x)
    ratio = 1 / 6 + 1e-9  # removes exactly one channel: the planted one (smallest filter norm)
    for method in ("udfc", "merge"):
        res = udfc.compress(net, ratio=ratio, method=method, ridge=0.0)
        assert res.model.conv1.out_channels == 5
        torch.testing.assert_close(res.model(x), ref, atol=1e-5, rtol=1e-5)
    plain = udfc.compress(net, ratio=ratio, method="none").model
    assert (plain(x) - ref).abs().max() > 1e-2  # the test can fail: without compensation the channel is lost


def _gaussian_activations(w1, q1, bn, keep, n, seed=0):
    """Samples of (a [n, C], ã_keep [n, K]) from UDFC's data-free model."""
    g = torch.Generator().manual_seed(seed)
    c = w1.shape[0]
    v = w1.reshape(c, -1).double()
    norms = v.norm(dim=1)
    z = torch.randn(n, v.shape[1], generator=g, dtype=torch.float64)  # [n, D]
    gamma, beta = bn.weight.detach().double(), bn.bias.detach().double()
    h = (z @ (v / norms[:, None]).T) * gamma + beta  # [n, C]
    hq = (z @ (q1.reshape(c, -1).double() / norms[:, None]).T) * gamma + beta
    return h.clamp_min(0), hq.clamp_min(0)[:, keep]


@pytest.mark.parametrize("bits", [None, 3])
def test_closed_form_equals_least_squares_on_sampled_gaussian_activations(bits):
    net, _ = calibrated_pair(seed=1)
    w1 = net.conv1.weight.detach()
    q1 = udfc.quantize_weight(w1, bits) if bits else w1
    keep = torch.tensor([True, False, True, True, False, True])
    m, t = udfc.compensation(w1, q1, net.bn1, keep, intercept=True, ridge=0.0)
    a, aq = _gaussian_activations(w1, q1, net.bn1, keep, n=200_000)
    design = torch.cat([aq, torch.ones(len(aq), 1, dtype=aq.dtype)], 1)  # [n, K+1]
    sol = torch.linalg.lstsq(design, a).solution.T  # [C, K+1]
    torch.testing.assert_close(m, sol[:, :-1], atol=2e-2, rtol=0)
    torch.testing.assert_close(t, sol[:, -1], atol=2e-2, rtol=0)
    assert m.abs().max() > 0.1  # not a trivial solution
    m_lin, t_lin = udfc.compensation(w1, q1, net.bn1, keep, ridge=0.0)  # the default: no intercept
    torch.testing.assert_close(m_lin, torch.linalg.lstsq(aq, a).solution.T, atol=2e-2, rtol=0)
    assert not t_lin.any()


def test_relu_moments_match_monte_carlo():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 6, generator=g, dtype=torch.float64)
    cov, mean = a @ a.T / 6, torch.randn(4, generator=g, dtype=torch.float64)
    e1, e2 = udfc.relu_moments(mean, cov)
    z = torch.randn(1_000_000, 4, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T + mean
    r = z.clamp_min(0)
    torch.testing.assert_close(e1, r.mean(0), atol=5e-3, rtol=0)
    torch.testing.assert_close(e2, r.T @ r / len(r), atol=1e-2, rtol=0)


def _output_error(net, res, x):
    with torch.no_grad():
        ref = net.conv2(torch.relu(net.bn1(net.conv1(x))))  # [B, N, H, W]: conv2's output, before bn2
        m = res.model
        out = m.conv2(torch.relu(m.bn1(m.conv1(x))))
        out = out + (net.bn2.running_mean - m.bn2.running_mean)[None, :, None, None]  # the shift bn2 absorbed
        return float(((out - ref) ** 2).mean() / (ref**2).mean())


def test_quantization_error_falls_with_compensation():
    errs = {"udfc": [], "none": []}
    for seed in range(3):
        net, x = calibrated_pair(seed=seed, cin=6, mid=12, cout=8)
        for method in errs:
            errs[method].append(_output_error(net, udfc.compress(net, ratio=0.0, bits=3, method=method,
                                                                 quantize="pairs"), x))
    assert sum(errs["udfc"]) < 0.9 * sum(errs["none"]), errs


def test_pruning_error_falls_with_compensation():
    errs = {m: 0.0 for m in udfc.METHODS}
    for seed in range(3):
        net, x = calibrated_pair(seed=seed, cin=6, mid=12, cout=8)
        for method in udfc.METHODS:
            errs[method] += _output_error(net, udfc.compress(net, ratio=0.5, method=method), x)
        errs.setdefault("udfc+intercept", 0.0)
        errs["udfc+intercept"] += _output_error(net, udfc.compress(net, ratio=0.5, intercept=True), x)
    assert errs["udfc+intercept"] < 0.8 * errs["none"], errs
    assert errs["udfc"] < 0.8 * min(errs["merge"], errs["none"]), errs  # random filters: merging can hurt


def test_nothing_removed_nothing_changes_and_input_untouched():
    model = resnet.ResNet(widths=(4, 8, 8), blocks=1).eval()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(3, 1, 28, 28)
    res = udfc.compress(model, ratio=0.0, bits=None)
    torch.testing.assert_close(res.model(x), model(x))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    half = udfc.compress(model, ratio=0.5, bits=4)
    assert [b.conv1.out_channels for b in half.model.blocks] == [2, 4, 4]
    assert half.model.config["mids"] == [2, 4, 4]


def test_quantize_weight_levels():
    w = torch.randn(3, 2, 3, 3)
    q = udfc.quantize_weight(w, 4)
    for row, qrow in zip(w.reshape(3, -1), q.reshape(3, -1)):
        step = row.abs().max() / 7
        assert len(torch.unique(qrow)) <= 15
        torch.testing.assert_close(qrow / step, torch.round(qrow / step))
        assert (qrow - row).abs().max() <= step / 2 + 1e-6


@pytest.mark.parametrize("kwargs", [dict(ratio=1.0), dict(ratio=-0.1), dict(bits=1), dict(bits=17),
                                    dict(bits=4.5), dict(method="magic"), dict(quantize="some")])
def test_udfc_bad_options(kwargs):
    with pytest.raises(InputError):
        udfc.compress(resnet.ResNet(widths=(4, 8, 8), blocks=1), **kwargs)


def test_udfc_needs_a_pair():
    with pytest.raises(InputError, match="conv1"):
        udfc.compress(nn.Sequential(nn.Conv2d(1, 2, 3)), ratio=0.5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(ridge=float("inf")), "ridge must be a finite"), (dict(ridge=float("nan")), "ridge must be a finite"),
    (dict(blocks="blocks.0"), "got the string 'blocks.0'"),
])
def test_udfc_refuses_an_infinite_ridge_and_a_string_of_blocks(kwargs, message):
    model = resnet.ResNet(widths=(4, 8), blocks=1).eval()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(InputError, match=message):
        udfc.compress(model, ratio=0.5, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_quantize_weight_refuses_non_finite_weights(value):
    w = torch.tensor([[value, 1.0], [0.5, -0.25]])
    with pytest.raises(InputError, match="NaN or Inf"):
        udfc.quantize_weight(w, 4)


@pytest.mark.parametrize("kwargs, message", [
    (dict(stem_stride=0), "stem_stride"), (dict(in_channels=0), "in_channels"), (dict(num_classes=0), "num_classes"),
    (dict(blocks=2.5), "blocks"), (dict(blocks=True), "blocks"), (dict(in_channels="1"), "in_channels"),
])
def test_resnet_refuses_impossible_architectures(kwargs, message):
    with pytest.raises(InputError, match=message):
        resnet.ResNet(**{"widths": (4, 8), "blocks": 1, **kwargs})


# ---- TRP -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", trp.SCHEMES)
@pytest.mark.parametrize("stride,padding,bias", [(1, 1, False), (2, 1, True), (1, 0, True)])
def test_decomposed_layers_compute_the_low_rank_layer(scheme, stride, padding, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, stride, padding, bias=bias)
    low = copy.deepcopy(conv)
    with torch.no_grad():
        low.weight.copy_(trp.low_rank(conv.weight, scheme=scheme, rank=3)[0])
    two = trp.decompose_conv(conv, rank=3, scheme=scheme)
    assert two.rank == 3
    x = torch.randn(2, 6, 9, 10)
    torch.testing.assert_close(two(x), low(x), atol=1e-5, rtol=1e-5)
    full_rank = trp.decompose_conv(conv, rank=100, scheme=scheme)  # all singular values: the conv itself
    torch.testing.assert_close(full_rank(x), conv(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scheme", trp.SCHEMES)
def test_nuclear_term_is_autograd_gradient_of_nuclear_norm(scheme):
    torch.manual_seed(0)
    w = torch.randn(5, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    lam = 3e-4
    (lam * torch.linalg.matrix_norm(trp.to_matrix(w, scheme), ord="nuc")).backward()
    torch.testing.assert_close(lam * trp.nuclear_subgradient(w.detach(), scheme=scheme, energy=1.0), w.grad)


def test_trp_callback_substitutes_and_adds_the_subgradient():
    torch.manual_seed(0)
    model = resnet.ResNet(widths=(4, 8, 8), blocks=1)
    cb = trp.TRP(model, period=3, energy=0.6, nuclear=0.5)
    assert list(cb.layers) == ["blocks.0.conv1", "blocks.0.conv2", "blocks.1.conv1", "blocks.1.conv2",
                               "blocks.2.conv1", "blocks.2.conv2"]
    cb.on_batch_start(0)
    for name, conv in cb.layers.items():
        s = torch.linalg.svdvals(trp.to_matrix(conv.weight.detach(), "channel"))
        assert int((s > 1e-5 * s[0]).sum()) == cb.ranks[name] < min(conv.weight.shape[0], conv.weight[0].numel())
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    nn.functional.cross_entropy(model(x), y).backward()
    conv = cb.layers["blocks.1.conv2"]
    grad = conv.weight.grad.clone()
    cb.on_after_backward(0)
    sub = trp.nuclear_subgradient(conv.weight.detach(), scheme="channel", energy=1.0)  # W is rank r now
    torch.testing.assert_close(conv.weight.grad - grad, 0.5 * sub, atol=1e-5, rtol=1e-4)
    grad = conv.weight.grad.clone()
    cb.on_batch_start(1)
    cb.on_after_backward(1)  # not a substitution step: nothing changes
    assert torch.equal(conv.weight.grad, grad)


def test_trp_plugs_into_prunekit_train_and_decomposes():
    from prunekit import train as tr

    torch.manual_seed(0)
    model = resnet.ResNet(widths=(4, 8, 8), blocks=1)
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    cb = trp.TRP(model, period=2, energy=0.8, nuclear=1e-3)
    tr.train(model, x, y, epochs=2, batch_size=8, lr=0.05, callbacks=[cb], progress=False)
    assert cb.substitutions == 4  # steps 0, 2, 4, 6 of 8
    cb.on_batch_start(0)  # make the weights exactly low-rank, then the decomposition must be exact
    ref = model(x[:8])
    flops_before = flops.count_flops(model)
    ranks = cb.decompose()
    assert ranks and set(ranks) <= set(cb.layers)
    assert isinstance(model.get_submodule(next(iter(ranks))), trp.LowRankConv)
    torch.testing.assert_close(model(x[:8]), ref, atol=1e-4, rtol=1e-4)
    assert flops.count_flops(model) < flops_before


def test_energy_for_flops_meets_the_budget(tmp_path):
    torch.manual_seed(0)
    model = resnet.ResNet(widths=(8, 16, 16), blocks=1).eval()
    full = flops.count_flops(model)
    energy, ranks = trp.energy_for_flops(model, full // 2, scheme="spatial")
    small = copy.deepcopy(model)
    trp.decompose(small, scheme="spatial", ranks=ranks)
    assert flops.count_flops(small) <= full // 2 < flops.count_flops(model)
    assert 0 < energy < 1
    # saved and reloaded with its low-rank layers
    out = resnet.save_model(small, tmp_path / "m")
    back = resnet.load_model(out)
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(back(x), small(x))


@pytest.mark.parametrize("scheme", trp.SCHEMES)
@pytest.mark.parametrize("stride,padding,dilation,bias", [(1, 1, 1, False), (2, 1, 1, True), (1, 2, 2, True)])
def test_fused_lowrank_conv_computes_the_two_thin_convs(scheme, stride, padding, dilation, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, stride, padding, dilation, bias=bias)
    two = trp.decompose_conv(conv, rank=3, scheme=scheme)
    one = trp.fuse_lowrank(two)
    assert isinstance(one, nn.Conv2d) and one.weight.shape == conv.weight.shape
    s = torch.linalg.svdvals(trp.to_matrix(one.weight.detach().double(), scheme))
    assert int((s > 1e-5 * s[0]).sum()) == 3  # rank 3 up to float32 rounding
    x = torch.randn(2, 6, 11, 9)
    torch.testing.assert_close(one(x), two(x), atol=1e-5, rtol=1e-5)


def test_split_where_faster_keeps_the_faster_form_and_the_function(tmp_path):
    torch.manual_seed(0)
    model = resnet.ResNet(widths=(8, 16, 16), blocks=1).eval()
    ranks = trp.decompose(model, energy=0.5)
    x = torch.randn(4, 1, 28, 28)
    ref = model(x)

    def timer(module, inp):  # a machine where the split pays off on 7x7 maps and below, not on larger ones
        small_map = inp.shape[-1] <= 7
        return 1.0 if isinstance(module, trp.LowRankConv) == small_map else 2.0

    got = trp.split_where_faster(model, x, timer=timer)
    assert set(got) == set(ranks)
    sizes = {"blocks.0.conv1": 14, "blocks.0.conv2": 14, "blocks.1.conv1": 14, "blocks.1.conv2": 7,
             "blocks.2.conv1": 7, "blocks.2.conv2": 4}
    for name, info in got.items():
        assert info["split"] == (sizes[name] <= 7) and info["rank"] == ranks[name]
        assert isinstance(model.get_submodule(name), trp.LowRankConv) == info["split"]
    assert set(model.lowrank) == {n for n, i in got.items() if i["split"]}
    assert {n for n, i in got.items() if not i["split"]}  # the planted timer fused some layers
    torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)
    back = resnet.load_model(resnet.save_model(model, tmp_path / "m"))
    torch.testing.assert_close(back(x), ref, atol=1e-5, rtol=1e-5)
    # the default timer: every layer timed, the function unchanged whatever it picks
    again = trp.split_where_faster(model, x)
    assert set(again) == set(model.lowrank) | {n for n, i in again.items() if not i["split"]}
    assert all(i["split_ms"] > 0 and i["whole_ms"] > 0 for i in again.values())
    torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)
    for bad in (torch.zeros(3), torch.full((2, 1, 28, 28), float("nan"))):
        with pytest.raises(InputError):
            trp.split_where_faster(model, bad)
    with pytest.raises(InputError, match="not a decomposed layer"):
        trp.fuse_layers(model, ["fc"])


def test_trp_bad_options():
    model = resnet.ResNet(widths=(4, 8, 8), blocks=1)
    for kwargs in (dict(period=0), dict(energy=0.0), dict(energy=1.5), dict(nuclear=-1.0), dict(scheme="diag"),
                   dict(layers=["fc"])):
        with pytest.raises(InputError):
            trp.TRP(model, **kwargs)
    with pytest.raises(InputError):
        trp.decompose(model, energy=0.9, value=0.05)


@pytest.mark.parametrize("call, message", [
    (lambda m: trp.decompose(m, ranks={"blocks.0.conv2": 0}), "must be an integer >= 1, got 0"),
    (lambda m: trp.decompose(m, ranks={"blocks.0.conv2": -5}), "must be an integer >= 1, got -5"),
    (lambda m: trp.decompose(m, ranks={"blocks.0.conv2": 2.0}), "must be an integer >= 1"),
    (lambda m: trp.decompose(m, ranks={"blocks.0.conv2": 1, "blocks.0.conv1": 0}), "conv1'\\] must be"),
    (lambda m: trp.decompose(m, value=float("nan")), "finite singular-value threshold"),
    (lambda m: trp.decompose(m, value=float("inf")), "finite singular-value threshold"),
    (lambda m: trp.decompose(m, energy=0.9, layers="blocks.0.conv2"), "got the string"),
    (lambda m: trp.TRP(m, layers="blocks.0.conv2"), "got the string"),
    (lambda m: trp.energy_for_flops(m, float("nan")), "flops must be a positive"),
    (lambda m: trp.energy_for_flops(m, 0), "flops must be a positive"),
    (lambda m: trp.energy_for_flops(m, True), "flops must be a positive"),
    (lambda m: trp.energy_for_flops(m, 10**9, iters=0), "iters must be an integer >= 1"),
])
def test_decompose_and_energy_for_flops_refuse_bad_budgets_and_leave_the_model(call, message):
    torch.manual_seed(0)
    model = resnet.ResNet(widths=(4, 8), blocks=1).eval()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(InputError, match=message):
        call(model)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---- FLOPs -----------------------------------------------------------------------------------------------

def test_flops_hand_example():
    # conv 3->4, 3x3, stride 2, pad 1 on 8x8: out 4x4x4, each 3*9 MACs -> 16*4*27 = 1728
    # grouped conv 4->4, groups 2, 1x1 on 4x4: 16*4*2 = 128; linear 64->10: 640
    net = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.ReLU(), nn.Conv2d(4, 4, 1, groups=2), nn.Flatten(),
                        nn.Linear(64, 10))
    assert flops.count_flops(net, (3, 8, 8)) == 1728 + 128 + 640
    assert flops.count_params(net) == (3 * 9 * 4 + 4) + (2 * 4 + 4) + (640 + 10)
    lr = trp.decompose_conv(nn.Conv2d(8, 8, 3, padding=1), rank=2, scheme="channel")
    assert flops.count_flops(lr, (8, 5, 5)) == 25 * (2 * 8 * 9 + 8 * 2)
    lr = trp.decompose_conv(nn.Conv2d(8, 8, 3, padding=1), rank=2, scheme="spatial")
    assert flops.count_flops(lr, (8, 5, 5)) == 25 * (2 * 8 * 3 + 8 * 2 * 3)


def test_flops_and_timing_name_the_input_the_model_takes():
    model = resnet.ResNet(widths=(4, 8), blocks=1)
    with pytest.raises(InputError, match=r"takes 1 input channel: input_shape must be \(1, H, W\)"):
        flops.count_flops(model, (3, 28, 28))
    with pytest.raises(InputError, match=r"x must be a batch \[B, 1, H, W\], got \[2, 3, 28, 28\]"):
        flops.ms_per_batch(model, torch.randn(2, 3, 28, 28), repeats=1)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())  # any model: told after the failed forward
    with pytest.raises(InputError, match=r"takes 3 input channels: input_shape must be \(3, H, W\)"):
        flops.count_flops(net, (1, 8, 8))
    with pytest.raises(InputError, match=r"\[B, 3, H, W\]"):
        flops.ms_per_batch(net, torch.randn(2, 1, 8, 8), repeats=1, warmup=0)
    assert flops.count_flops(net, (3, 8, 8)) == 36 * 4 * 27


# ---- CLI -------------------------------------------------------------------------------------------------

@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    return resnet.save_model(resnet.ResNet(widths=(4, 8, 8), blocks=1).eval(), tmp_path / "base")


def test_cli_udfc_writes_a_loadable_model(saved, tmp_path, capsys):
    out = tmp_path / "small"
    assert main(["cnn", "udfc", str(saved), "--ratio", "0.5", "--bits", "6", "--out", str(out)]) == 0
    model = resnet.load_model(out)
    assert [b.conv1.out_channels for b in model.blocks] == [2, 4, 4]
    meta = json.loads((out / "config.json").read_text())["metadata"]
    assert meta["bits"] == 6 and meta["method"] == "udfc" and meta["quantize"] == "all"
    assert main(["cnn", "udfc", str(saved), "--ratio", "0.5", "--out", str(out)]) == 2  # exists
    assert "exists" in capsys.readouterr().err
    # --quantize without --bits changed nothing, without a word, and was recorded as used
    plain = tmp_path / "plain"
    assert main(["cnn", "udfc", str(saved), "--ratio", "0.5", "--quantize", "pairs", "--out", str(plain)]) == 0
    assert "--quantize is used with --bits only; ignored" in capsys.readouterr().err
    assert json.loads((plain / "config.json").read_text())["metadata"]["quantize"] is None
    # --ratio 0 removes nothing: the channel ranking and compensation flags were silently without effect
    assert main(["cnn", "udfc", str(saved), "--ratio", "0", "--method", "merge", "--criterion", "l1", "--out",
                 str(tmp_path / "zero")]) == 0
    assert "--ratio 0 removes no channel, so --method and --criterion change nothing" in capsys.readouterr().err
    # with --bits, udfc still compensates the quantization error at ratio 0: --method is used, --criterion is not
    assert main(["cnn", "udfc", str(saved), "--ratio", "0", "--bits", "4", "--method", "none", "--criterion", "l1",
                 "--out", str(tmp_path / "zero4")]) == 0
    assert "--ratio 0 removes no channel, so --criterion changes nothing; ignored" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [["--ratio", "1.0"], ["--ratio", "-0.2"], ["--bits", "1"], ["--bits", "40"]])
def test_cli_bad_input_exits_2_and_writes_nothing(saved, tmp_path, extra, capsys):
    out = tmp_path / "never"
    assert main(["cnn", "udfc", str(saved), *extra, "--out", str(out)]) == 2
    assert not out.exists()
    assert "prunekit: error:" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [saved]


def test_cli_missing_model_and_bad_training_options(tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["cnn", "udfc", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert main(["cnn", "eval", str(tmp_path / "nope")]) == 2
    assert main(["cnn", "trp", "--out", str(out), "--energy", "1.5"]) == 2
    assert main(["cnn", "trp", "--out", str(out), "--period", "0"]) == 2
    assert main(["cnn", "train", "--out", str(out), "--epochs", "0"]) == 2
    assert not out.exists()


def test_cli_udfc_refuses_to_replace_its_input_or_write_under_a_file(saved, tmp_path, capsys):
    # --out MODEL --overwrite replaced the input model; --out FILE/x was a FileExistsError traceback after the work
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    assert main(["cnn", "udfc", str(saved), "--ratio", "0.5", "--out", str(saved), "--overwrite"]) == 2
    assert "would replace the input" in capsys.readouterr().err
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert main(["cnn", "udfc", str(saved), "--ratio", "0.5", "--out", str(blocker / "x")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "which is a file, not a folder" in err
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before


def test_cli_refuses_the_working_folder_and_the_cached_testbed_as_output(saved, tmp_path, monkeypatch, capsys):
    # `--out . --overwrite` deleted the working folder (rmtree before the rename); `udfc testbed --out <the cached
    # testbed> --overwrite` replaced the testbed every later command uses
    work = tmp_path / "work" / "inner"
    work.mkdir(parents=True)
    (work / "precious.txt").write_text("keep me")
    monkeypatch.chdir(work)
    for out in (".", "..", ""):
        assert main(["cnn", "udfc", str(saved), "--ratio", "0.5", "--out", out, "--overwrite"]) == 2
        err = capsys.readouterr().err
        said = "--out is empty; give a path" if out == "" else "is the working folder or holds it"
        assert said in err and len(err.strip().splitlines()) == 1, err
    assert (work / "precious.txt").read_text() == "keep me"
    cache = tmp_path / "cache"
    monkeypatch.setenv("PRUNEKIT_CACHE", str(cache))
    shutil.copytree(saved, resnet.testbed_folder())  # stands in for the trained testbed
    before = {p.name: p.read_bytes() for p in resnet.testbed_folder().iterdir()}
    assert main(["cnn", "udfc", "testbed", "--ratio", "0.5", "--out", str(resnet.testbed_folder()), "--overwrite"]) == 2
    assert "would replace the input" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in resnet.testbed_folder().iterdir()} == before


def test_cli_says_when_the_testbed_is_trained_first(saved, tmp_path, monkeypatch, capsys):
    """`cnn udfc testbed` trained for minutes behind a bare progress bar, after the README's "seconds"."""
    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path / "cache"))
    trained = []

    def train_it(**_):
        trained.append(1)
        if not resnet.testbed_folder().exists():
            shutil.copytree(saved, resnet.testbed_folder())
        return resnet.load_model(resnet.testbed_folder())

    monkeypatch.setattr(resnet, "testbed", train_it)
    for note, out in ((True, "a"), (False, "b")):  # the second time it is cached: no note
        assert main(["cnn", "udfc", "testbed", "--ratio", "0.3", "--out", str(tmp_path / out)]) == 0
        assert ("training the testbed once (seed 0" in capsys.readouterr().err) is note
    assert trained == [1, 1]  # (the stand-in is called either way; the real one loads the cache)


def test_save_model_restores_the_old_folder_when_the_rename_fails(saved, tmp_path, monkeypatch):
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    real = os.replace

    def fail_second(src, dst):
        if str(src).startswith(str(tmp_path / ".base.")) and ".old-" not in str(src):
            raise OSError(5, "I/O error")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", fail_second)
    with pytest.raises(OSError):
        resnet.save_model(resnet.ResNet(widths=(4, 8, 8), blocks=1), saved, overwrite=True)
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


@pytest.mark.parametrize("metadata, message", [
    ({"acc": torch.tensor(0.9)}, r"metadata\['acc'\] is of type Tensor"),
    ({"runs": [{"seed": {1, 2}}]}, r"metadata\['runs'\]\[0\]\['seed'\] is of type set"),
    (["acc"], "metadata must be a dict"),
])
def test_save_model_refuses_metadata_json_cannot_hold(metadata, message, tmp_path):
    with pytest.raises(InputError, match=message):
        resnet.save_model(resnet.ResNet(widths=(4, 8), blocks=1), tmp_path / "m", metadata=metadata)
    assert list(tmp_path.iterdir()) == []


def test_cli_trp_refuses_to_save_a_diverged_model(tmp_path, capsys):
    from prunekit.zoo import cache_dir

    if not (cache_dir() / "datasets" / "fashion_mnist.npz").is_file():
        pytest.skip("Fashion-MNIST is not in the cache (make assets)")
    out = tmp_path / "trp"
    assert main(["cnn", "trp", "--out", str(out), "--examples", "256", "--epochs", "1", "--period", "1",
                 "--nuclear", "1e30", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "training diverged" in err and "lower --nuclear" in err and not out.exists()


def test_cli_trp_split_faster_keeps_slow_splits_whole(tmp_path, capsys):
    from prunekit.zoo import cache_dir

    if not (cache_dir() / "datasets" / "fashion_mnist.npz").is_file():
        pytest.skip("Fashion-MNIST is not in the cache (make assets)")
    out = tmp_path / "trp"
    assert main(["cnn", "trp", "--out", str(out), "--examples", "512", "--epochs", "1", "--split", "faster",
                 "--quiet"]) == 0
    meta = json.loads((out / "config.json").read_text())["metadata"]["trp"]
    model = resnet.load_model(out)
    whole, split = set(meta["kept_whole"]), set(getattr(model, "lowrank", {}))
    assert meta["split"] == "faster" and not whole & split and whole | split == set(meta["ranks"])
    said, err = capsys.readouterr()  # it counted every decomposed layer, the ones kept whole included
    assert (f"({len(split)} layers split)" in said) if split else "no layer split" in said
    # 512 images are 4 steps: any --period from 4 up substituted once, at step 0, the same model without a word
    assert "TRP substituted the truncated SVD once, at the first step: the run is no longer than --period 20" in err
    for name in whole:  # one conv, holding the rank the decomposition chose
        w = model.get_submodule(name).weight.detach().double()
        s = torch.linalg.svdvals(trp.to_matrix(w, "channel"))
        assert int((s > 1e-5 * s[0]).sum()) == meta["ranks"][name]
    # nothing decomposed (no split saves FLOPs at this energy), so nothing was timed: it said "none ran faster"
    out = tmp_path / "trp-all"
    assert main(["cnn", "trp", "--out", str(out), "--examples", "256", "--epochs", "1", "--split", "faster",
                 "--energy", "0.999999", "--quiet"]) == 0
    assert json.loads((out / "config.json").read_text())["metadata"]["trp"]["ranks"] == {}
    assert "no layer split: at this --energy none saves FLOPs" in capsys.readouterr().out


def _break(folder, case):
    """Damage a saved model folder the way a QA sweep did; each of these was an exit-1 traceback (or NaN accepted)."""
    cfg_file, weights = folder / "config.json", folder / "model.safetensors"
    cfg = json.loads(cfg_file.read_text())
    edits = {"cfg_list": [1], "cfg_nokeys": {"format": cfg["format"]}, "cfg_widths_str": dict(cfg, widths="abc"),
             "cfg_neg": dict(cfg, num_classes=-1), "cfg_bool": dict(cfg, blocks=True),
             "cfg_mids_short": dict(cfg, mids=[2]),
             "cfg_lowrank_bad": dict(cfg, lowrank={"blocks.0.conv1": {"rank": "x", "scheme": "foo"}}),
             "cfg_lowrank_name": dict(cfg, lowrank={"nope.conv": {"rank": 2, "scheme": "channel"}}),
             "cfg_widths_mismatch": dict(cfg, widths=[4, 8, 16]), "cfg_inch3": dict(cfg, in_channels=3),
             "cfg_huge": dict(cfg, widths=[4, 8, 10**9]), "cfg_hf": {"model_type": "llama", "hidden_size": 64}}
    if case == "cfg_binary":
        cfg_file.write_bytes(bytes(range(128, 256)) * 2)
    elif case in edits:
        cfg_file.write_text(json.dumps(edits[case]))
    elif case == "trunc":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif case == "st_binary":
        weights.write_bytes(bytes(range(256)) * 4)
    elif case in ("nanw", "infw"):
        from safetensors.torch import load_file, save_file

        state = load_file(str(weights))
        state["blocks.1.conv2.weight"][0, 0, 0, 0] = float("nan") if case == "nanw" else float("inf")
        save_file(state, str(weights))


@pytest.mark.parametrize("case,match", [
    ("cfg_binary", r"config\.json is not UTF-8 JSON text"),
    ("cfg_list", r"config\.json must hold a JSON object, got a list"),
    ("cfg_nokeys", r"config\.json lacks widths, blocks"),
    ("cfg_hf", r"config\.json has no \"format\", expected 'prunekit-cnn/1' \(a Hugging Face model's config; .*"
               r"give a folder written by `prunekit cnn train`"),
    ("cfg_widths_str", r"has widths='abc'; it must be a list of channel counts"),
    ("cfg_neg", r"has num_classes=-1; it must be an integer >= 1"),
    ("cfg_bool", r"has blocks=True; it must be an integer >= 1"),
    ("cfg_mids_short", r"has mids=\[2\]; it must be a list of 3 inner widths"),
    ("cfg_lowrank_bad", r"lowrank entry 'blocks\.0\.conv1'.*integer rank >= 1 and a scheme"),
    ("cfg_lowrank_name", r"low-rank layer 'nope\.conv', which is not a conv"),
    ("cfg_widths_mismatch", r"model\.safetensors does not match .*config\.json: blocks\.2\.conv2\.weight has shape "
                            r"\[8, 8, 3, 3\] in the weights, \[16, 8, 3, 3\] by the config"),
    ("cfg_inch3", r"stem\.weight has shape \[4, 1, 3, 3\] in the weights, \[4, 3, 3, 3\] by the config"),
    ("cfg_huge", r"does not match"),  # checked on shapes alone: nothing of 10^9 channels is allocated
    ("trunc", r"model\.safetensors is not a readable safetensors file"),
    ("st_binary", r"model\.safetensors is not a readable safetensors file"),
    ("nanw", r"base has NaN or Inf weights in blocks\.1\.conv2\.weight; repair or re-export the model"),
    ("infw", r"has NaN or Inf weights in blocks\.1\.conv2\.weight"),  # cnn eval reported accuracy 0.1
])
def test_cli_broken_model_folder_exits_2_and_writes_nothing(saved, tmp_path, case, match, capsys):
    _break(saved, case)
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    out = tmp_path / "never"
    for args in (["udfc", str(saved), "--out", str(out)], ["eval", str(saved)]):
        assert main(["cnn", *args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("prunekit: error:") and len(err.strip().splitlines()) == 1, err
        assert re.search(match, err) and (str(saved) in err), err
        if case not in ("nanw", "infw", "cfg_hf"):  # a model of another kind is not re-exported
            assert "re-export the model" in err, err
    assert not out.exists() and {p.name: p.read_bytes() for p in saved.iterdir()} == before
    with pytest.raises(InputError, match=match):
        resnet.load_model(saved)


@pytest.mark.parametrize("device, match", [("cuda:7", "sees no CUDA device|torch sees"), ("gpu", "must be a device"),
                                           ("meta", "")])
def test_cli_every_cnn_command_checks_device_before_loading_or_writing(saved, tmp_path, monkeypatch, capsys,
                                                                      device, match):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")

    def no_load(*_a, **_k):
        raise AssertionError("a model was loaded or trained before --device was checked")

    monkeypatch.setattr(resnet, "load_model", no_load)
    monkeypatch.setattr(resnet, "fashion_tensors", no_load)
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    out = tmp_path / "never"
    for args in (["train", "--out", str(out), "--epochs", "1"], ["trp", "--out", str(out)],
                 ["udfc", str(saved), "--out", str(out)], ["eval", str(saved)]):
        assert main(["cnn", *args, "--device", device]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("prunekit: error: --device") and re.search(match, err), err
    assert not out.exists() and {p.name: p.read_bytes() for p in saved.iterdir()} == before


def test_cli_cnn_commands_record_their_device(saved, tmp_path, capsys):
    out = tmp_path / "small"
    assert main(["cnn", "udfc", str(saved), "--ratio", "0.5", "--out", str(out), "--device", "cpu"]) == 0
    assert json.loads((out / "config.json").read_text())["metadata"]["device"] == "cpu"


def test_timing_moves_the_batch_to_the_model():
    """ms_per_batch and split_where_faster take a batch from anywhere: it was a dtype or device mismatch."""
    model = resnet.ResNet(widths=(4, 8, 8), blocks=1).double()
    assert flops.ms_per_batch(model, torch.randn(4, 1, 28, 28), repeats=1, warmup=0) > 0
    split = set(trp.decompose(model, energy=0.5))
    assert split and set(trp.split_where_faster(model, torch.randn(4, 1, 28, 28), rounds=1)) == split


def test_cli_negative_seed_and_three_channel_eval_refused(tmp_path, capsys):
    out = tmp_path / "never"
    for command in ("train", "trp"):  # cnn train --seed -1 trained and saved
        assert main(["cnn", command, "--seed", "-1", "--epochs", "1", "--examples", "8", "--out", str(out)]) == 2
        assert "--seed must be an integer >= 0, got -1" in capsys.readouterr().err
    rgb = resnet.save_model(resnet.ResNet(widths=(4, 8, 8), blocks=1, in_channels=3).eval(), tmp_path / "rgb")
    assert resnet.load_model(rgb).config["in_channels"] == 3  # a consistent 3-channel model loads
    assert main(["cnn", "eval", str(rgb)]) == 2
    assert "takes 3-channel images but evaluation uses Fashion-MNIST" in capsys.readouterr().err
    assert main(["cnn", "udfc", str(rgb), "--eval", "--out", str(out)]) == 2
    assert "or drop --eval" in capsys.readouterr().err
    assert not out.exists()


# ---------------------------------------------------------------- found by a user-style sweep

def test_compress_keeps_the_model_dtype_and_a_trp_split_conv1():
    model = resnet.ResNet(widths=(4, 8, 8), blocks=1).double().eval()  # new layers were built in float32
    out = udfc.compress(model, ratio=0.25, bits=6).model
    assert {p.dtype for p in out.parameters()} == {torch.float64}
    with torch.no_grad():
        assert out(torch.rand(2, 1, 28, 28, dtype=torch.float64)).dtype == torch.float64
    split = resnet.ResNet(widths=(4, 8, 8), blocks=2).eval()  # a conv1 TRP split is no Conv2d: 'mids' crashed
    trp.decompose(split, ranks={"blocks.3.conv1": 2})
    res = udfc.compress(split, ratio=0.25)
    assert "blocks.3" not in [b["name"] for b in res.blocks] and res.model.config["mids"][3] == 8


def test_spatial_split_of_a_strided_conv_is_kept_only_where_it_saves_flops():
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1)
    rank = 6  # at stride 1 it would pay: 6*8*3 + 16*6*3 = 432 < 1152; at stride 2 the kh x 1 factor runs at 2x
    assert trp._lowrank_cost(conv, rank, "spatial") == 6 * 8 * 3 * 2 + 16 * 6 * 3
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), conv).eval()
    before = flops.count_flops(model, (1, 16, 16))
    done = trp.decompose(model, ranks={"2": 14}, scheme="spatial")  # 14*8*3*2 + 16*14*3 = 1344 > 1152
    assert done == {} and flops.count_flops(model, (1, 16, 16)) == before


def test_trp_refuses_same_padding_and_a_model_with_nothing_to_decompose_before_changing_it():
    same = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding="same"))
    with pytest.raises(InputError, match="padding='same'.*numeric zero padding"):
        trp.TRP(same)
    with pytest.raises(InputError, match="padding='same'"):
        trp.decompose(same, energy=0.9)
    assert isinstance(same[2], nn.Conv2d)  # the model was left half-decomposed
    with pytest.raises(InputError, match="no Conv2d TRP can decompose"):
        trp.TRP(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1)))


def test_decompose_and_trp_refuse_a_nan_conv_before_changing_any_layer():
    """A NaN in the last conv was a raw LinAlgError after the earlier convs were replaced / substituted."""
    for call in (lambda m, names: trp.decompose(m, ranks={n: 2 for n in names}),
                 lambda m, names: trp.decompose(m, energy=0.5),
                 lambda m, names: trp.TRP(m, period=1).on_batch_start(0)):
        torch.manual_seed(0)
        model = resnet.ResNet(widths=(4, 8), blocks=1)
        names = list(trp.eligible_convs(model))
        with torch.no_grad():
            trp.eligible_convs(model)[names[-1]].weight[0, 0, 0, 0] = float("nan")
        before = {k: v.nan_to_num().clone() for k, v in model.state_dict().items()}
        with pytest.raises(InputError, match=f"conv {re.escape(names[-1])} has NaN or Inf weights.*nothing was "
                                             "changed"):
            call(model, names)
        after = model.state_dict()
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k].nan_to_num()) for k in before)
        assert not any(isinstance(m, trp.LowRankConv) for m in model.modules())


def test_overwrite_replaces_an_earlier_model_folder_only(tmp_path):
    model = resnet.ResNet(widths=(4, 8), blocks=1)
    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match=r"a folder of other files \(notes.txt, sub\) that no prunekit command wrote"):
        resnet.save_model(model, victim, overwrite=True)
    assert (victim / "notes.txt").read_text() == "mine"
    out = resnet.save_model(model, tmp_path / "m")
    assert resnet.save_model(model, out, overwrite=True) == out


def test_cnn_eval_refuses_other_class_counts_broken_statistics_and_absurd_configs(tmp_path, capsys):
    five = resnet.save_model(resnet.ResNet(widths=(4, 8), blocks=1, num_classes=5), tmp_path / "five")
    assert main(["cnn", "eval", str(five)]) == 2  # scored 0.1000 on Fashion-MNIST's 10 classes, exit 0
    assert "has 5 output classes but evaluation uses Fashion-MNIST's 10" in capsys.readouterr().err
    model = resnet.ResNet(widths=(4, 8), blocks=1)
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    bn.running_var[0] = -1.0  # every output NaN
    broken = resnet.save_model(model, tmp_path / "broken")
    with pytest.raises(InputError, match="negative variance"):
        resnet.load_model(broken)
    cfg = json.loads((five / "config.json").read_text())
    cfg["widths"] = [10**10, 10**10]  # a raw "Storage size calculation overflowed" traceback
    (five / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="describes a network too large to build"):
        resnet.load_model(five)


def test_a_pre_activation_block_is_not_taken_for_a_conv1_bn1_conv2_chain():
    """bn1 normalises conv1's input in a pre-activation block; names and widths matched, so compress returned a
    model that failed on its first forward (or, at ratio 0, compensated with the wrong statistics)."""

    class PreAct(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.bn1, self.conv1 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1, bias=False)
            self.bn2, self.conv2 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1, bias=False)

        def forward(self, x):
            return x + self.conv2(torch.relu(self.bn2(self.conv1(torch.relu(self.bn1(x))))))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.block, self.fc = nn.Conv2d(1, 8, 3, padding=1), PreAct(8), nn.Linear(8, 10)

        def forward(self, x):
            return self.fc(self.block(self.stem(x)).mean((2, 3)))

    net = Net().eval()
    assert udfc.find_pairs(net) == ["block"]  # by names and widths alone
    with pytest.raises(InputError, match="block: bn1 normalises conv1's input there"):
        udfc.compress(net, ratio=0.25)
    with pytest.raises(InputError, match="no conv1 -> bn1 -> conv2 chain in \\['block'\\]"):
        udfc.compress(net, ratio=0.25, blocks=["block"])
    # a post-activation block of the same shape is still compressed
    model = resnet.ResNet(widths=(4, 8, 8), blocks=1).eval()
    assert len(udfc.compress(model, ratio=0.25).blocks) == len(udfc.find_pairs(model))


def test_compress_and_decompose_leave_the_callers_global_rng_alone():
    """New convs were built with default init, drawing from the caller's global RNG before being overwritten."""
    net = resnet.ResNet().eval()
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    udfc.compress(net, ratio=0.3, bits=6)
    trp.decompose(copy.deepcopy(net), energy=0.9)
    assert torch.equal(torch.random.get_rng_state(), state)
