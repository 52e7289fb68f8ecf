"""CIFAR-style ResNets (He et al. 2016, sec. 4.2), registered with timm.

timm's ``ResNet`` hard-codes four ImageNet stages; the paper's CIFAR experiments use the
three-stage ResNets of depth ``6n + 2`` instead, among them the 110-layer "ResNet with constant
depth" (RCD-110): the plain ResNet-110, "constant" as opposed to the stochastic-depth variant of
Huang et al. 2016, where residual blocks are dropped at random during training.

Importing this module registers ``resnet8_cifar``, ``resnet20_cifar``, ``resnet32_cifar``,
``resnet44_cifar``, ``resnet56_cifar`` and ``resnet110_cifar`` with timm's ``@register_model``,
so ``timm.create_model("resnet110_cifar", num_classes=100)`` builds the RCD-110. Passing
``drop_path_rate > 0`` turns any of them into the stochastic-depth variant.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

__all__ = ["CIFAR_DEPTHS", "CifarResNet"]

#: Registered depths (``6n + 2`` with ``n`` basic blocks per stage).
CIFAR_DEPTHS = (8, 20, 32, 44, 56, 110)

# Per-channel statistics of the CIFAR-10 training set.
_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR_STD = (0.2470, 0.2435, 0.2616)


class _BasicBlock(nn.Module):
    """Two 3x3 convolutions with a shortcut; option A pads channels with zeros (no weights)."""

    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: str, drop_path: float):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.downsample: nn.Module | None = None
        self.pad = 0
        self.stride = stride
        if stride != 1 or in_planes != planes:
            if shortcut == "B":
                self.downsample = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                    nn.BatchNorm2d(planes),
                )
            else:
                self.pad = planes - in_planes

    def _shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            return self.downsample(x)
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad:
            x = F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(self.drop_path(out) + self._shortcut(x))


class CifarResNet(nn.Module):
    """Three-stage ResNet of depth ``6n + 2`` for small images (16, 32, 64 channels).

    Args:
        depth: Total number of weighted layers; ``(depth - 2)`` must be a multiple of 6.
        num_classes: Classifier outputs (0 for a feature extractor).
        in_chans: Input channels (3 for CIFAR, 1 for MNIST).
        width: Channels of the first stage; the others double it.
        shortcut: ``"A"``: identity with zero-padded channels, as in He et al. for CIFAR;
            ``"B"``: 1x1 projection convolutions where the shape changes.
        drop_rate: Dropout before the classifier.
        drop_path_rate: Stochastic depth: the drop probability grows linearly over the blocks
            up to this value (Huang et al. 2016); 0 keeps the depth constant.
        global_pool: Only ``"avg"`` is supported.
    """

    def __init__(
        self,
        depth: int = 20,
        num_classes: int = 10,
        in_chans: int = 3,
        width: int = 16,
        shortcut: str = "A",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        global_pool: str = "avg",
    ):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n + 2 with n >= 1, got {depth}")
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        if global_pool != "avg":
            raise ValueError(f"only global_pool='avg' is supported, got {global_pool!r}")
        blocks = (depth - 2) // 6
        self.depth = depth
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.conv1 = nn.Conv2d(in_chans, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        total = 3 * blocks
        planes, in_planes, index = width, width, 0
        self.feature_info = [{"num_chs": width, "reduction": 1, "module": "bn1"}]
        for stage in range(3):
            stride = 1 if stage == 0 else 2
            layers = []
            for b in range(blocks):
                rate = drop_path_rate * index / max(total - 1, 1)
                layers.append(
                    _BasicBlock(in_planes, planes, stride if b == 0 else 1, shortcut, rate)
                )
                in_planes, index = planes, index + 1
            self.add_module(f"layer{stage + 1}", nn.Sequential(*layers))
            self.feature_info.append(
                {"num_chs": planes, "reduction": 2**stage, "module": f"layer{stage + 1}"}
            )
            planes *= 2
        self.num_features = self.head_hidden_size = in_planes
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes) if num_classes > 0 else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        return {
            "stem": r"^conv1|bn1",
            "blocks": r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)",
        }

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> str | nn.Module:
        return "fc" if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool not in (None, "avg"):
            raise ValueError(f"only global_pool='avg' is supported, got {global_pool!r}")
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        for layer in (self.layer1, self.layer2, self.layer3):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x).flatten(1)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs) -> dict:
    return {
        "url": "",
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "pool_size": (8, 8),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": _CIFAR_MEAN,
        "std": _CIFAR_STD,
        "first_conv": "conv1",
        "classifier": "fc",
        "license": "apache-2.0",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({f"resnet{d}_cifar": _cfg() for d in CIFAR_DEPTHS})


def _create(depth: int, pretrained: bool, **kwargs) -> CifarResNet:
    if pretrained:
        raise ValueError(
            f"resnet{depth}_cifar has no pretrained weights; create it with pretrained=False"
        )
    return build_model_with_cfg(
        CifarResNet,
        f"resnet{depth}_cifar",
        pretrained,
        feature_cfg={"flatten_sequential": True},
        depth=depth,
        **kwargs,
    )


@register_model
def resnet8_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-8 for CIFAR (one basic block per stage): a fast model for smoke tests."""
    return _create(8, pretrained, **kwargs)


@register_model
def resnet20_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-20 for CIFAR (He et al. 2016)."""
    return _create(20, pretrained, **kwargs)


@register_model
def resnet32_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-32 for CIFAR (He et al. 2016)."""
    return _create(32, pretrained, **kwargs)


@register_model
def resnet44_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-44 for CIFAR (He et al. 2016)."""
    return _create(44, pretrained, **kwargs)


@register_model
def resnet56_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-56 for CIFAR (He et al. 2016)."""
    return _create(56, pretrained, **kwargs)


@register_model
def resnet110_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-110 for CIFAR: the paper's RCD-110 (constant depth; ``drop_path_rate=0``)."""
    return _create(110, pretrained, **kwargs)
