"""Small custom models that exercise each channel rule of fxprune (used by the tests)."""

from __future__ import annotations

import copy
import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxprune.testing import assert_equivalent, randomize_norms

__all__ = [
    "ConcatNet", "InvertedResidualNet", "FlattenHead", "SENet", "LinearSENet", "FunctionalNet",
    "CumsumNet", "GroupedConvNet", "MLPNet", "SharedConvNet", "TinyUNet", "randomize_bn", "init_normal",
    "assert_rolled_weight_fails", "assert_rolled_parameter_fails", "spread_parameters", "ZOO",
]


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give BatchNorms non-trivial statistics so equivalence tests can fail."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 2 - 1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                    m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model


def init_normal(model: nn.Module, std: float = 0.5) -> nn.Module:
    """Seeded N(0, std) parameters and random norm statistics, in eval mode.

    Default initialisations leave many weights near zero; large random ones make a wrong index
    in a rewrite visible in the output, so the proofs can fail.
    """
    torch.manual_seed(0)
    for p in model.parameters():
        nn.init.normal_(p, std=std)
    return randomize_norms(model).eval()


def spread_parameters(model: nn.Module, *names: str) -> nn.Module:
    """N(0, 1) values for every parameter whose name contains one of ``names`` (seeded by the caller).

    Position-bias tables and logit scales start at or near zero, where a column sliced for the
    wrong head changes nothing the proof can see.
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(n in name for n in names):
                p.normal_(0, 1.0)
    return model


def assert_rolled_weight_fails(model: nn.Module, pruned: nn.Module, plan: object, inputs: tuple,
                               module: str, dim: int) -> None:
    """The proof must fail once ``module``'s weight is rolled by one channel along ``dim``.

    A deliberately broken rewrite (every kept channel shifted to its neighbour's slot) shows the
    equivalence check is able to see an index error at that layer.
    """
    assert_rolled_parameter_fails(model, pruned, plan, inputs, f"{module}.weight", dim)


def assert_rolled_parameter_fails(model: nn.Module, pruned: nn.Module, plan: object, inputs: tuple,
                                  name: str, dim: int) -> None:
    """The proof must fail once parameter ``name`` of the pruned model is rolled by one along ``dim``
    (a bias table's or logit scale's entries moved to the wrong head, say)."""
    broken = copy.deepcopy(pruned)
    param = broken.get_parameter(name)
    assert param.shape[dim] > 1, f"{name} has one entry along dim {dim}: rolling it breaks nothing"
    with torch.no_grad():
        param.copy_(param.roll(1, dim))
    with pytest.raises(AssertionError):
        assert_equivalent(model, broken, plan, inputs, example_inputs=inputs)


def cbr(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ConcatNet(nn.Module):
    """Two branches concatenated (offsets into the consumer), a cat feeding BatchNorm, and a
    cat with the network input (whose channels are never pruned)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 16)
        self.a = cbr(16, 8)
        self.b = nn.Sequential(cbr(16, 12), cbr(12, 12))
        self.bn = nn.BatchNorm2d(20)
        self.mix = nn.Conv2d(20, 24, 1)
        self.c = cbr(24, 10)
        self.head = nn.Conv2d(10 + 24, 16, 3, padding=1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        y = torch.cat([self.a(s), self.b(s)], dim=1)
        y = self.mix(F.relu(self.bn(y)))
        y = torch.cat((self.c(y), y), 1)
        y = self.head(y)
        return self.fc(y.mean((2, 3)))


class InvertedResidual(nn.Module):
    def __init__(self, c: int, expand: int) -> None:
        super().__init__()
        h = c * expand
        self.expand = nn.Sequential(nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False), nn.BatchNorm2d(h), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(self.dw(self.expand(x)))


class InvertedResidualNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 16, stride=2)
        self.blocks = nn.Sequential(InvertedResidual(16, 4), InvertedResidual(16, 6))
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.hardswish(self.dw(self.blocks(self.stem(x))))
        return self.fc(torch.flatten(self.pool(y), 1))


class FlattenHead(nn.Module):
    """conv -> flatten(1) of a 4x4 map -> Linear -> BN1d -> Linear: every channel owns 16
    consecutive columns of fc1."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(cbr(3, 12), nn.MaxPool2d(2), cbr(12, 20), nn.AdaptiveAvgPool2d(4))
        self.fc1 = nn.Linear(20 * 16, 64)
        self.bn = nn.BatchNorm1d(64)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(64, 32)
        self.fc3 = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.features(x)
        y = y.view(y.size(0), -1)
        y = self.drop(F.gelu(self.bn(self.fc1(y))))
        return self.fc3(torch.tanh(self.fc2(y)))


class SEBlock(nn.Module):
    def __init__(self, c: int, r: int = 4) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(c, c // r, 1)
        self.fc2 = nn.Conv2d(c // r, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(self.pool(x)))))
        return x * s


class SENet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 16)
        self.body = cbr(16, 32)
        self.se = SEBlock(32)
        self.out = nn.Conv2d(32, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.se(self.body(self.stem(x)))
        return self.out(y).mean(dim=(-1, -2))


class LinearSE(nn.Module):
    """The classic SE with Linear layers and views (shapes are needed to follow the views)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(c, c // 4)
        self.fc2 = nn.Linear(c // 4, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, _, _ = x.size()
        y = F.adaptive_avg_pool2d(x, 1).view(b, c)
        y = torch.sigmoid(self.fc2(F.relu(self.fc1(y)))).view(b, c, 1, 1)
        return x * y


class LinearSENet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 24)
        self.se = LinearSE(24)
        self.conv = cbr(24, 16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(self.se(self.stem(x))).mean((2, 3)))


class FunctionalNet(nn.Module):
    """Functional, method and in-place forms of activations and residual arithmetic."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.b1 = nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.c3 = nn.Conv2d(16, 16, 1)
        self.c4 = nn.Conv2d(16, 16, 1)
        self.c5 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.c6 = nn.Conv2d(32, 32, 1)
        self.fc = nn.Linear(32, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.b1(self.c1(x)))
        z = torch.relu(self.c2(y))
        z += y
        w = self.c3(z).relu()
        w = torch.add(w, z)
        v = operator.sub(self.c4(w), w) * 0.5
        v = F.silu(v) + 1.0
        u = F.max_pool2d(v, 2)
        u = self.c5(u)
        u = F.relu6(u) * torch.sigmoid(self.c6(u))
        u = u.mean((2, 3), keepdim=True)
        return self.fc(u.reshape(u.size(0), -1))


class CumsumNet(nn.Module):
    """An op with no rule (cumsum over channels mixes them)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = cbr(3, 8)
        self.b = cbr(8, 8)
        self.c = cbr(8, 8)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.b(self.a(x))
        y = torch.cumsum(y, dim=1)
        return self.fc(self.c(y).mean((2, 3)))


class GroupedConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = cbr(3, 16)
        self.g = nn.Conv2d(16, 32, 3, padding=1, groups=4)
        self.b = cbr(32, 16)
        self.fc = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.b(F.relu(self.g(self.a(x)))).mean((2, 3)))


class MLPNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(20, 64)
        self.fc2 = nn.Linear(64, 48)
        self.fc3 = nn.Linear(48, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class SharedConvNet(nn.Module):
    """One conv applied twice: both call sites must keep the same channels."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.shared = nn.Conv2d(16, 16, 3, padding=1)
        self.out = nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.a(x))
        y = F.relu(self.shared(y))
        y = F.relu(self.shared(y))
        return self.out(y).mean((2, 3))


class TinyUNet(nn.Module):
    """Encoder, a stride-2 transposed conv up, a skip concatenation, and a decoder head.

    The up-sampling layer reads the bottleneck group on its weight's dim 0 and produces a new
    group on dim 1; the concat feeds a conv with offsets; a depthwise transposed conv is
    per-channel; a grouped one is left whole.
    """

    def __init__(self) -> None:
        super().__init__()
        self.enc = cbr(3, 8)
        self.down = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.up = nn.ConvTranspose2d(16, 12, 4, stride=2, padding=1)
        self.up_bn = nn.BatchNorm2d(12)
        self.dw_up = nn.ConvTranspose2d(20, 20, 3, padding=1, groups=20)
        self.dec = cbr(20, 10)
        self.grouped_up = nn.ConvTranspose2d(10, 6, 3, padding=1, groups=2)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.enc(x)
        u = F.relu(self.up_bn(self.up(self.down(e), output_size=e.shape)))
        y = self.dec(self.dw_up(torch.cat([u, e], dim=1)))
        return self.head(self.grouped_up(y))


# name -> (constructor, input shape)
ZOO = {
    "concat": (ConcatNet, (2, 3, 16, 16)),
    "inverted_residual": (InvertedResidualNet, (2, 3, 16, 16)),
    "flatten_head": (FlattenHead, (2, 3, 16, 16)),
    "se": (SENet, (2, 3, 16, 16)),
    "functional": (FunctionalNet, (2, 3, 16, 16)),
    "mlp": (MLPNet, (3, 20)),
    "shared": (SharedConvNet, (2, 3, 12, 12)),
    "unet": (TinyUNet, (2, 3, 16, 16)),
}
