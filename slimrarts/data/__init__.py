"""Image data: CIFAR and ImageFolder sources with caching, a device-resident loader with on-device augmentation,
a streaming loader for sets that do not fit in memory, and index splits."""

from .augment import augment_batch as augment_batch
from .augment import cutout_batch as cutout_batch
from .augment import random_resized_boxes as random_resized_boxes
from .augment import resized_crop_batch as resized_crop_batch
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
from .factory import imagefolder_sizes as imagefolder_sizes
from .factory import make_loaders as make_loaders
from .imagefolder import IMAGENET_MEAN as IMAGENET_MEAN
from .imagefolder import IMAGENET_STD as IMAGENET_STD
from .imagefolder import load_imagefolder as load_imagefolder
from .imageset import ImageSet as ImageSet
from .loader import DeviceLoader as DeviceLoader
from .loader import epoch_generator as epoch_generator
from .registry import get_dataset as get_dataset
from .registry import list_datasets as list_datasets
from .registry import register_dataset as register_dataset
from .split import limit_per_class as limit_per_class
from .split import split_halves as split_halves
from .stream import ImageFiles as ImageFiles
from .stream import StreamLoader as StreamLoader
from .stream import index_imagefolder as index_imagefolder
from .tasksets import CocoDetection as CocoDetection
from .tasksets import SegmentationFolder as SegmentationFolder
from .tasksets import detection_collate as detection_collate
from .tasksets import detection_transform as detection_transform
from .tasksets import segmentation_transform as segmentation_transform
from .tasksets import task_loaders as task_loaders

__all__ = [
    "CIFAR10_CLASSES", "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD", "CocoDetection", "DeviceLoader",
    "IMAGENET_MEAN", "IMAGENET_STD", "ImageFiles", "ImageSet", "Loaders", "SegmentationFolder", "StreamLoader",
    "as_loaders", "detection_collate", "detection_transform",
    "get_dataset", "index_imagefolder", "list_datasets", "make_loaders", "register_dataset",
    "augment_batch", "cutout_batch", "default_cache_dir", "epoch_generator", "imagefolder_sizes", "limit_per_class",
    "load_cifar", "load_imagefolder", "random_resized_boxes", "resized_crop_batch", "segmentation_transform",
    "split_halves", "stats_for", "task_loaders",
]
