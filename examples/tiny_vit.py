"""A ViT at Fashion-MNIST scale, for the main job: ``fxprune run --model examples.tiny_vit:tiny_vit``.

timm's ``vit_tiny_patch16_224`` widths (embedding 192, 3 heads of 64, MLP 768) with 4 blocks
and 4-pixel patches, so a 28 px image is 49 tokens plus the class token. Random weights (timm
is in the ``test`` extra). Run from the repository root (the job puts the current directory on
the import path for ``--model package.module:callable``):

    fxprune run --model examples.tiny_vit:tiny_vit --limit 12000 --baseline-epochs 6 --epochs 3

The job calls the factory with the data's classes, channels and image size. fxprune prunes the
embedding width (one renormalising group under the LayerNorms, proven against the masked-norm
reference), whole heads and the MLP widths.

>>> import torch
>>> model = tiny_vit(num_classes=10, in_channels=1, image_size=28)
>>> tuple(model(torch.randn(2, 1, 28, 28)).shape)
(2, 10)
"""

from __future__ import annotations

import timm
import torch.nn as nn

__all__ = ["tiny_vit"]


def tiny_vit(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> nn.Module:
    """A 4-block ViT-Tiny with 4-pixel patches for ``image_size`` images (``image_size`` % 4 == 0)."""
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=image_size, patch_size=4,
                             in_chans=in_channels, depth=4, num_classes=num_classes)
