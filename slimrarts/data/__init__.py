"""CIFAR data: sources and caching, a device-resident loader with on-device augmentation, and index splits."""

from .cifar import CIFAR10_CLASSES as CIFAR10_CLASSES
from .cifar import CIFAR10_MEAN as CIFAR10_MEAN
from .cifar import CIFAR10_STD as CIFAR10_STD
from .cifar import CIFAR100_MEAN as CIFAR100_MEAN
from .cifar import CIFAR100_STD as CIFAR100_STD
from .cifar import default_cache_dir as default_cache_dir
from .cifar import load_cifar as load_cifar
from .cifar import stats_for as stats_for
from .factory import Loaders as Loaders
from .factory import as_loaders as as_loaders
from .factory import make_loaders as make_loaders
from .imageset import ImageSet as ImageSet
from .loader import DeviceLoader as DeviceLoader
from .loader import augment_batch as augment_batch
from .loader import epoch_generator as epoch_generator
from .split import limit_per_class as limit_per_class
from .split import split_halves as split_halves

__all__ = [
    "CIFAR10_CLASSES", "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD", "DeviceLoader", "ImageSet",
    "Loaders", "as_loaders", "make_loaders",
    "augment_batch", "default_cache_dir", "epoch_generator", "limit_per_class", "load_cifar", "split_halves",
    "stats_for",
]
