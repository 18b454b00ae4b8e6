"""DBNet: backbone, neck and head assembled from the model configuration."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dbnet.config import ModelConfig
from dbnet.model.backbones import build_backbone
from dbnet.model.head import DBHead
from dbnet.model.necks import build_neck


def init_db_weights(module: nn.Module) -> None:
    """Initialises one layer as DB does: Kaiming convs, BatchNorm weight 1 and bias 1e-4.

    Meant for `nn.Module.apply` on the parts trained from scratch (neck and head).
    """
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.kaiming_normal_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.ones_(module.weight)
        nn.init.constant_(module.bias, 1e-4)


class DBNet(nn.Module):
    """Differentiable binarisation text detector.

    The backbone keeps torchvision's initialisation (or its ImageNet weights); the neck and
    the head get DB's initialisation.

    Args:
        backbone: Module returning four maps at strides 4-32, with `out_channels`.
        neck: Module fusing them into one map at stride 4.
        head: Module turning that map into the DB maps.
    """

    def __init__(self, backbone: nn.Module, neck: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.head = head
        self.neck.apply(init_db_weights)
        self.head.apply(init_db_weights)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Predicts the DB maps.

        Args:
            x: Normalised images (N, 3, H, W), H and W multiples of 32.

        Returns:
            Training mode: `prob_logits`, `prob`, `thresh`, `binary_logits`, `binary`, each
            (N, 1, H, W). Eval mode: `prob` (N, 1, H, W) in [0, 1] only.
        """
        features = self.backbone(x)  # 4 maps, strides 4, 8, 16, 32
        fused = self.neck(features)  # (N, inner, H/4, W/4)
        return self.head(fused)


def build_model(config: ModelConfig) -> DBNet:
    """Builds DBNet from the model configuration.

    Args:
        config: Backbone, width, pretrained weights, neck, inner channels, k, BatchNorm
            momentum, memory format.

    Returns:
        The model in training mode, in channels-last memory format when
        `config.channels_last` (inputs should then be channels-last too).

    Raises:
        ConfigError: A backbone, neck or width that is not allowed.
        CheckpointError: Pretrained weights that cannot be read or do not fit.
    """
    backbone = build_backbone(config.backbone, config.width, config.pretrained)
    neck = build_neck(config.neck, backbone.out_channels, config.inner_channels)
    head = DBHead(config.inner_channels, config.k)
    model = DBNet(backbone, neck, head)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = config.bn_momentum
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model
