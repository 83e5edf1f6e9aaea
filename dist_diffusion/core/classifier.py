"""The domain classifier: a small CNN trained on the dataset's own images.

It is the feature extractor for a *domain FID* where Inception-v3 means little (32 px
digits) or its weights are absent, and it judges whether a conditional sample shows the
class it was asked for. A diffusers ``ModelMixin`` so export and loading work like the
UNet's (``save_pretrained`` / ``from_pretrained``).
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class DomainClassifier(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 32, resolution: int = 32):
        super().__init__()
        layers, channels = [], in_channels
        for mult in (1, 2, 4):  # three stride-2 stages; global average pool after
            layers += [nn.Conv2d(channels, width * mult, 3, stride=2, padding=1), nn.GroupNorm(8, width * mult),
                       nn.SiLU(), nn.Conv2d(width * mult, width * mult, 3, padding=1), nn.SiLU()]
            channels = width * mult
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(channels, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled penultimate features of images in [-1, 1]."""
        return self.body(images).mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))
