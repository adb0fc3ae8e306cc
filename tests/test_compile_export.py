"""A pruned model goes through torch.compile, torch.export, ONNX and TorchScript; and exported
(ATen-level) graphs come into the pass through fxprune.export.from_exported."""

from __future__ import annotations

import importlib.util
import io
import warnings
from pathlib import Path
from typing import Tuple

import pytest
import torch
import torch.nn as nn
import torchvision

import fxprune
from fxprune.export import (DeploymentError, ExportedGraphError, export_program, from_exported, graph_breaks,
                            is_aten_graph, to_onnx, to_torchscript)
from fxprune.testing import assert_equivalent

X = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _bn_stats(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def r18() -> Tuple[nn.Module, torch.fx.GraphModule]:
    torch.manual_seed(0)
    model = _bn_stats(torchvision.models.resnet18())
    return model, fxprune.prune(model, 0.5).eval()


# --------------------------------------------------------------------------- torch.compile


def test_no_graph_breaks(r18) -> None:
    _, pruned = r18
    assert graph_breaks(pruned, X) == 0


def test_compile_fullgraph_matches_eager(r18) -> None:
    # Inductor on CPU compiles C++ kernels: about a minute cold on 2 cores, so one model, one shape.
    _, pruned = r18
    torch._dynamo.reset()
    compiled = torch.compile(pruned, fullgraph=True)
    with torch.no_grad():
        expected = pruned(X)
        actual = compiled(X)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()


# --------------------------------------------------------------------------- torch.export


def test_export_matches_eager_and_survives_save_load(r18, tmp_path: Path) -> None:
    _, pruned = r18
    ep = export_program(pruned, (X,))
    assert isinstance(ep, torch.export.ExportedProgram)
    with torch.no_grad():
        assert torch.equal(ep.module()(X), pruned(X))
    torch.export.save(ep, tmp_path / "r18.pt2")
    reloaded = torch.export.load(tmp_path / "r18.pt2")
    with torch.no_grad():
        assert torch.equal(reloaded.module()(X), pruned(X))
    # The saved program holds the pruned layers, not the original ones.
    shapes = {k: tuple(v.shape) for k, v in reloaded.state_dict.items()}
    assert shapes == {k: tuple(v.shape) for k, v in pruned.state_dict().items()}
    assert shapes["layer1.0.conv1.weight"] == (32, 32, 3, 3)


def test_export_dynamic_batch(r18) -> None:
    _, pruned = r18
    ep = export_program(pruned, torch.randn(2, 3, 32, 32), dynamic_batch=True)
    x5 = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x5), pruned(x5))


def test_export_failure_is_a_deployment_error() -> None:
    class DataDependent(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # control flow on a tensor's value: export cannot capture it
                return x + 1
            return x - 1

    with pytest.raises(DeploymentError, match="torch.export.export failed on DataDependent"):
        export_program(DataDependent(), torch.randn(4), dynamic_batch=True)


# --------------------------------------------------------------------------- ONNX / TorchScript


_HAS_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript", "onnxruntime"))


@pytest.mark.skipif(not _HAS_ONNX, reason="optional extra 'onnx' (onnx, onnxscript, onnxruntime) not installed")
def test_onnx_export_matches_eager_in_onnxruntime(r18, tmp_path: Path) -> None:
    import onnxruntime

    _, pruned = r18
    path = to_onnx(pruned, X, tmp_path / "r18.onnx")
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    x3 = torch.randn(3, 3, 32, 32)  # dynamic batch
    (out,) = session.run(None, {"input": x3.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), pruned(x3), rtol=1e-4, atol=1e-4)


def test_torchscript_script_and_save(r18) -> None:
    _, pruned = r18
    scripted = to_torchscript(pruned)
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    reloaded = torch.jit.load(buf)
    with torch.no_grad():
        assert torch.equal(reloaded(X), pruned(X))
    assert "def forward" in pruned.code  # the standalone, readable Python of the pruned model


# --------------------------------------------------------------------------- exported graphs in


def test_exported_resnet18_lifts_to_the_same_layers_and_plan() -> None:
    torch.manual_seed(0)
    model = _bn_stats(torchvision.models.resnet18())
    exported = torch.export.export(model, (X,)).module()
    assert is_aten_graph(exported) and not is_aten_graph(torch.fx.symbolic_trace(model))
    lifted = from_exported(exported)
    assert not is_aten_graph(lifted)
    assert isinstance(lifted.get_submodule("layer2.0.downsample.0"), nn.Conv2d) and isinstance(lifted.fc, nn.Linear)
    with torch.no_grad():
        assert torch.equal(lifted(X), model(X))
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxprune.FxPruneWarning)  # every op was lifted to a known one
        plan_lifted = fxprune.plan(lifted, 0.5)
        pruned = fxprune.apply(lifted, plan_lifted)
    plan_module = fxprune.plan(model, 0.5)
    assert [(g.key, g.keep) for g in plan_lifted.groups] == [(g.key, g.keep) for g in plan_module.groups]
    assert_equivalent(lifted, pruned, plan_lifted, (X,))
    with torch.no_grad():
        torch.testing.assert_close(pruned(X), fxprune.apply(model, plan_module)(X))


def test_exported_mobilenet_v3_with_inplace_ops_and_se() -> None:
    torch.manual_seed(0)
    model = _bn_stats(torchvision.models.mobilenet_v3_small())
    lifted = from_exported(torch.export.export(model, (X,)))  # an ExportedProgram works too
    with torch.no_grad():
        assert torch.equal(lifted(X), model(X))
    plan = fxprune.plan(lifted, 0.4)
    assert sum(g.size - len(g.keep) for g in plan.groups) > 0
    assert_equivalent(lifted, fxprune.apply(lifted, plan), plan, (X,))


def test_exported_transposed_convs_lift_with_their_output_padding() -> None:
    from fxprune.testing import randomize_norms

    from .zoo import TinyUNet

    torch.manual_seed(0)
    model = randomize_norms(TinyUNet()).eval()
    x = torch.randn(2, 3, 16, 16)
    lifted = from_exported(torch.export.export(model, (x,)))
    up = lifted.get_submodule("up")
    # forward passed output_size; export fixed it as output_padding, which the layer now holds.
    assert isinstance(up, nn.ConvTranspose2d) and up.output_padding == (0, 0) and up.stride == (2, 2)
    assert isinstance(lifted.get_submodule("grouped_up"), nn.ConvTranspose2d) and lifted.grouped_up.groups == 2
    with torch.no_grad():
        assert torch.equal(lifted(x), model(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxprune.FxPruneWarning)
        plan = fxprune.plan(lifted, 0.5)
    assert [(g.key, g.keep) for g in plan.groups] == [(g.key, g.keep) for g in fxprune.plan(model, 0.5).groups]
    assert_equivalent(lifted, fxprune.apply(lifted, plan), plan, (x,))

    class OddUp(nn.Module):  # 16 -> 8 -> 16 needs output_padding=1 from output_size
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.up = nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1)
            self.b = nn.Conv2d(6, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.relu(self.up(torch.relu(self.a(x)), output_size=x.shape)))

    odd = OddUp().eval()
    lifted = from_exported(torch.export.export(odd, (x,)))
    assert lifted.up.output_padding == (1, 1)
    with torch.no_grad():
        assert torch.equal(lifted(x), odd(x))
    plan = fxprune.plan(lifted, 0.5)
    assert_equivalent(lifted, fxprune.apply(lifted, plan), plan, (x,))


def test_prune_accepts_an_exported_module_directly() -> None:
    # Needs fxprune.tracing.as_graph_module to route ATen graphs through from_exported.
    model = _bn_stats(torchvision.models.resnet18())
    exported = torch.export.export(model, (X,)).module()
    pruned = fxprune.prune(exported, 0.5)
    assert pruned.get_submodule("layer1.0.conv1").out_channels == 32
    assert sum(p.numel() for p in pruned.parameters()) < 0.3 * sum(p.numel() for p in model.parameters())


def test_unknown_aten_op_is_kept_and_freezes_its_channels() -> None:
    class Cumsum(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Conv2d(8, 8, 3, padding=1)
            self.c = nn.Conv2d(8, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(torch.relu(self.b(torch.cumsum(self.a(x), dim=1))))

    model = Cumsum().eval()
    lifted = from_exported(torch.export.export(model, (X,)))
    assert is_aten_graph(lifted)  # aten.cumsum stays: lifting again must be harmless
    relifted = from_exported(lifted)
    assert relifted.a is lifted.a
    with torch.no_grad():
        assert torch.equal(relifted(X), model(X))
    with pytest.warns(fxprune.FxPruneWarning, match="cumsum"):
        plan = fxprune.plan(lifted, 0.5)
    assert len(plan.keep("a")) == 8  # mixed by cumsum: frozen
    assert len(plan.keep("b")) == 4  # after it: pruned as usual
    with torch.no_grad():
        assert torch.equal(lifted(X), model(X))


def test_training_mode_export_is_refused_clearly() -> None:
    model = torchvision.models.resnet18().train()
    exported = torch.export.export(model, (torch.randn(2, 3, 32, 32),)).module()
    with pytest.raises(ExportedGraphError, match="exported in training mode.*model.eval\\(\\)"):
        from_exported(exported)


def test_keyword_inputs_are_refused_clearly() -> None:
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x: torch.Tensor, *, scale: torch.Tensor) -> torch.Tensor:
            return self.conv(x) * scale

    exported = torch.export.export(Scaled().eval(), (X,), {"scale": torch.ones(1)}).module()
    with pytest.raises(ExportedGraphError, match="nested or keyword inputs.*original nn.Module"):
        from_exported(exported)
    with pytest.raises(fxprune.FxPruneError, match="expected an ExportedProgram or a torch.fx.GraphModule"):
        from_exported(nn.Conv2d(1, 1, 1))  # type: ignore[arg-type]
