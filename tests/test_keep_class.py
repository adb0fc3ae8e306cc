"""keep_class=True: the pruned model keeps the user's own class where that is proven (issue 15).

The class copy is returned only when it is structurally the pruned GraphModule: the same
module and tensor objects at every target the graph reads, and its forward re-traced into the
same graph. Otherwise the GraphModule comes back with an FxPruneWarning saying why.
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, Tuple

import pytest
import torch
import torch.nn as nn
import torchvision

import fxprune
import fxprune.api as api
from fxprune.errors import FxPruneWarning
from fxprune.testing import assert_equivalent

X = torch.randn(2, 3, 32, 32)


def _no_warnings(fn: Any, *args: Any, **kwargs: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("error", FxPruneWarning)
        return fn(*args, **kwargs)


def test_resnet18_keeps_its_class_and_computes_the_pruned_graph() -> None:
    model = torchvision.models.resnet18().eval()
    kept = _no_warnings(fxprune.prune, model, 0.5, keep_class=True)
    graph = fxprune.prune(model, 0.5)  # the default: today's GraphModule
    assert isinstance(graph, torch.fx.GraphModule)
    assert type(kept) is torchvision.models.ResNet and not isinstance(kept, torch.fx.GraphModule)
    assert kept.layer1[0].conv1.out_channels == 32 and model.layer1[0].conv1.out_channels == 64  # user's untouched
    assert kept.meta["fxprune_plan"].keep("layer1.0.conv1") == graph.meta["fxprune_plan"].keep("layer1.0.conv1")
    with torch.no_grad():
        torch.testing.assert_close(kept.eval()(X), graph.eval()(X))
    assert_equivalent(model, kept, kept.meta["fxprune_plan"], [X])


def test_apply_keep_class_and_training_flags_are_the_users() -> None:
    model = torchvision.models.resnet18().train()
    model.bn1.eval()  # a frozen norm stays frozen in the copy
    p = fxprune.plan(model, 0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # trace-mode notes are not what this test is about
        kept = fxprune.apply(model, p, keep_class=True)
    assert type(kept) is torchvision.models.ResNet
    assert kept.training and not kept.bn1.training and kept.layer1[0].bn1.training
    assert isinstance(fxprune.apply(model, p), torch.fx.GraphModule)


class ReadsWidth(nn.Module):
    """forward scales by 1 / conv1.out_channels: a Python constant that pruning changes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv1(x))
        return self.conv2(y * (1.0 / self.conv1.out_channels))


def test_forward_reading_a_pruned_size_falls_back_with_a_warning() -> None:
    model = ReadsWidth().eval()
    with pytest.warns(FxPruneWarning, match=r"keep_class=True: returning a GraphModule, not a ReadsWidth.*mul"):
        out = fxprune.prune(model, 0.5, keep_class=True)
    assert isinstance(out, torch.fx.GraphModule)
    assert out.conv1.out_channels == 4
    assert_equivalent(model, out, out.meta["fxprune_plan"], [X])  # the GraphModule is still right


def test_a_hook_on_the_model_itself_falls_back() -> None:
    """fx traces the root's forward, not its __call__: the GraphModule has no root hook, the copy would."""
    model = torchvision.models.resnet18().eval()
    model.register_forward_hook(lambda m, args, out: out * 2)
    with pytest.warns(FxPruneWarning, match=r"forward_hooks on the model itself"):
        out = fxprune.prune(model, 0.5, keep_class=True)
    assert isinstance(out, torch.fx.GraphModule)


class Calls(nn.Module):
    """A class whose __call__ adds 1 after forward: fx traces forward only."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.conv1(x)))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().__call__(x) + 1


def test_a_class_overriding_call_falls_back() -> None:
    with pytest.warns(FxPruneWarning, match=r"overrides __call__"):
        out = fxprune.prune(Calls().eval(), 0.5, keep_class=True)
    assert isinstance(out, torch.fx.GraphModule)


def test_graph_module_input_has_no_class_to_keep() -> None:
    gm = torch.fx.symbolic_trace(torchvision.models.resnet18())
    out = _no_warnings(fxprune.prune, gm, 0.5, keep_class=True)
    assert isinstance(out, torch.fx.GraphModule)
    assert out.get_submodule("layer1.0.conv1").out_channels == 32


def test_a_copy_missing_one_pruned_module_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    real = api._replacements

    def skip_one(model: nn.Module, pruned: torch.fx.GraphModule) -> Dict[str, Tuple[Any, Any]]:
        pairs = real(model, pruned)
        del pairs["layer1.0.conv1"]  # the copy keeps a copy of the original, unpruned conv there
        return pairs

    monkeypatch.setattr(api, "_replacements", skip_one)
    model = torchvision.models.resnet18().eval()
    with pytest.warns(FxPruneWarning, match=r"layer1\.0\.conv1 in the copy is not the pruned module"):
        out = fxprune.prune(model, 0.5, keep_class=True)
    assert isinstance(out, torch.fx.GraphModule)


def test_a_copy_whose_forward_traces_otherwise_is_refused() -> None:
    """The re-trace, not only object identity: the same objects under another forward are refused."""
    model = ReadsWidth().eval()
    pruned = fxprune.prune(model, 0.5)
    other = ReadsWidth().eval()
    other.conv1, other.conv2 = pruned.conv1, pruned.conv2  # the very objects, but forward reads 1/4 now
    reason = api._mismatch(other, pruned)
    assert reason is not None and "mul" in reason and "0.125" in reason


def test_timm_model_keeps_its_class_and_methods() -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet10t", pretrained=False).eval()
    x = torch.randn(1, 3, 64, 64)
    # ignore the head: its input width stays, so num_features (which reset_classifier builds the
    # new head from, a plain int the class keeps) stays right.
    kept = _no_warnings(fxprune.prune, model, 0.5, keep_class=True, example_inputs=x, ignore="fc")
    assert type(kept) is type(model) and hasattr(kept, "reset_classifier") and hasattr(kept, "forward_features")
    assert kept.pretrained_cfg == model.pretrained_cfg
    assert kept.get_submodule("layer1.0.conv1").out_channels < model.get_submodule("layer1.0.conv1").out_channels
    assert_equivalent(model, kept, kept.meta["fxprune_plan"], [x], example_inputs=[x])
    kept.reset_classifier(10)
    assert kept(x).shape == (1, 10)


def test_timm_efficientnet_keeps_its_class() -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model("efficientnet_b0", pretrained=False).eval()
    x = torch.randn(1, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # groups frozen by ops without a rule are another matter
        kept = fxprune.prune(model, 0.3, keep_class=True, example_inputs=x)
        assert_equivalent(model, kept, kept.meta["fxprune_plan"], [x], example_inputs=[x])
    assert type(kept) is type(model) and kept.pretrained_cfg == model.pretrained_cfg
    assert sum(p.numel() for p in kept.parameters()) < sum(p.numel() for p in model.parameters())
    # The head's width is pruned too now that timm's BatchNormAct2d (F.batch_norm) is followed.
    assert kept.forward_features(x).shape[1] == kept.conv_head.out_channels < model.forward_features(x).shape[1]


class Shared(nn.Module):
    """One conv registered under two names and held in a Python list too."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.alias = self.conv1
        self.layers = [self.conv1]
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.alias(x)))


def test_a_module_under_two_names_is_replaced_everywhere() -> None:
    model = Shared().eval()
    kept = _no_warnings(fxprune.prune, model, 0.5, keep_class=True)
    assert type(kept) is Shared
    assert kept.conv1 is kept.alias is kept.layers[0] and kept.conv1.out_channels == 4
    assert_equivalent(model, kept, kept.meta["fxprune_plan"], [X])


class RootScale(nn.Module):
    """A per-channel parameter on the model itself, read directly (get_attr) by forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.scale = nn.Parameter(torch.randn(1, 8, 1, 1))
        self.register_buffer("shift", torch.randn(1, 8, 1, 1))
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.conv1(x) * self.scale + self.shift))


def test_root_parameters_and_buffers_are_sliced_in_place() -> None:
    model = RootScale().eval()
    kept = _no_warnings(fxprune.prune, model, 0.5, keep_class=True, example_inputs=X)
    assert type(kept) is RootScale
    assert isinstance(kept.scale, nn.Parameter) and kept.scale.shape == (1, 4, 1, 1)
    assert "shift" in dict(kept.named_buffers()) and kept.shift.shape == (1, 4, 1, 1)
    assert_equivalent(model, kept, kept.meta["fxprune_plan"], [X], example_inputs=[X])
