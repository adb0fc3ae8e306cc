"""Hugging Face vision models from configs (no downloads): pruned, proven, and kept in their own class.

torch.fx cannot trace these ``*ForImageClassification`` models, so fxprune exports them (issue
11); ``keep_class=True`` returns the Hugging Face class (issue 15), whose ``save_pretrained``
writes the pruned weights. The config's widths (``hidden_sizes`` ...) are not rewritten, so
``from_pretrained`` on that folder refuses the pruned shapes; the reload route is the plan:
``fxprune.apply(Cls(config), plan, example_inputs=x, keep_class=True)`` then ``load_state_dict``.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fxprune  # noqa: E402
from fxprune.testing import assert_equivalent  # noqa: E402

X = torch.randn(1, 3, 64, 64)


def _quiet(fn: Any, *args: Any, **kwargs: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the export-route note is tested in test_export_fallback
        return fn(*args, **kwargs)


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _resnet() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64], depths=[1, 1, 1],
                                       layer_type="bottleneck", num_labels=5)
    return transformers.ResNetForImageClassification(config).eval()


def _mobilenet_v2() -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.MobileNetV2ForImageClassification(transformers.MobileNetV2Config(num_labels=5)).eval()


@pytest.mark.parametrize("build", [_resnet, pytest.param(_mobilenet_v2, marks=pytest.mark.slow)],
                         ids=["resnet", "mobilenet_v2"])
def test_keep_class_returns_the_hf_class_and_save_pretrained_writes_the_pruned_weights(build: Any, tmp_path: Any) -> None:
    from safetensors.torch import load_file

    model = build()
    cls = type(model)
    kept = _quiet(fxprune.prune, model, 0.5, example_inputs=(X,), keep_class=True)
    graph = _quiet(fxprune.prune, model, 0.5, example_inputs=(X,))
    assert isinstance(kept, cls) and not isinstance(kept, torch.fx.GraphModule)
    assert _params(kept) == _params(graph) < _params(model)
    with torch.no_grad():
        torch.testing.assert_close(kept(X)["logits"], graph(X)["logits"])  # the GraphModule returns a dict
    _quiet(assert_equivalent, model, kept, kept.meta["fxprune_plan"], [X], example_inputs=(X,))

    kept.save_pretrained(str(tmp_path))
    saved = load_file(os.path.join(str(tmp_path), "model.safetensors"))
    state = kept.state_dict()
    assert all(saved[k].shape == state[k].shape for k in saved) and any(
        saved[k].shape != v.shape for k, v in model.state_dict().items() if k in saved)
    # from_pretrained builds the config's (unpruned) widths and refuses the pruned shapes ...
    with pytest.raises(Exception, match="(?i)size|mismatch|shape"):
        _quiet(cls.from_pretrained, str(tmp_path))
    # ... the plan rebuilds the pruned architecture, and the saved weights load into it.
    plan = fxprune.PruningPlan.from_json(kept.meta["fxprune_plan"].to_json())
    rebuilt = _quiet(fxprune.apply, cls(model.config).eval(), plan, example_inputs=(X,), keep_class=True)
    assert isinstance(rebuilt, cls)
    rebuilt.load_state_dict(saved)  # every key and shape
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(X).logits, kept(X).logits)


def test_mobilenet_v2_prunes_through_pad() -> None:
    """aten.pad (TF 'same' padding) maps onto F.pad's rule: no frozen depthwise chains (2.23 M -> 0.58 M)."""
    model = _mobilenet_v2()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruned = fxprune.prune(model, 0.5, example_inputs=(X,))
    assert not [w for w in caught if "aten." in str(w.message)], [str(w.message)[:200] for w in caught]
    assert _params(pruned) < 0.3 * _params(model)


@pytest.mark.slow
def test_convnext_prunes_its_mlp_widths_without_unknown_ops() -> None:
    """aten.permute and aten.layer_norm map onto their rules; the LayerNorm width is pruned (renormalising)."""
    torch.manual_seed(0)
    model = transformers.ConvNextForImageClassification(transformers.ConvNextConfig()).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kept = fxprune.prune(model, 0.5, example_inputs=(X,), keep_class=True)
    assert not [w for w in caught if "aten." in str(w.message)]
    assert isinstance(kept, transformers.ConvNextForImageClassification)
    assert _params(kept) < 0.27 * _params(model)  # 27.8 M -> 7.06 M (Torch-Pruning 1.6: 7.1 M)
    assert len(kept.meta["fxprune_plan"].renormalising_groups) == 4
    _quiet(assert_equivalent, model, kept, kept.meta["fxprune_plan"], [X], example_inputs=(X,))
