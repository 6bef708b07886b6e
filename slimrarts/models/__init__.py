"""Model factory: the CIFAR zoo, ``timm:<name>`` and ``torchvision:<name>``."""

from . import darts_cifar as _darts_cifar  # noqa: F401  (registers darts_cifar)
from .mobilenetv2_cifar import MobileNetV2Cifar as MobileNetV2Cifar
from .preresnet import PreResNet as PreResNet
from .registry import create_model as create_model
from .registry import is_model as is_model
from .registry import list_models as list_models
from .registry import model_info as model_info
from .registry import register_model as register_model
from .resnet_cifar import ResNetCifar as ResNetCifar

__all__ = [
    "MobileNetV2Cifar",
    "PreResNet",
    "ResNetCifar",
    "create_model",
    "is_model",
    "list_models",
    "model_info",
    "register_model",
]
