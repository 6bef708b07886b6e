"""The submodules whose outputs are a detection model's raw predictions, before its post-processing.

torchvision's detection models return boxes after decoding, score thresholds, top-k and non-maximum suppression: a
function of the predictions that jumps where a score crosses a threshold, and that detaches the region proposals of a
two-stage model. So the channel groups are traced to the heads' outputs (`attach_gates(..., outputs=...)`) and the
removal invariant is checked there (`remove_channels(..., check_modules=...)`); this module names those heads.
"""

from __future__ import annotations

import torch.nn as nn
from torchvision.models.detection.fcos import FCOS
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.retinanet import RetinaNet
from torchvision.models.detection.ssd import SSD

__all__ = ["raw_output_modules"]

# one-stage detectors: `head` maps the FPN features to {"cls_logits": ..., "bbox_regression": ...} (and FCOS'
# "bbox_ctrness"), every anchor of every level
_ONE_STAGE = (RetinaNet, FCOS, SSD)  # SSDLite is an SSD
# two-stage (R-CNN) models: the region proposal head, then the predictors run on the pooled proposals
_RCNN_PREDICTORS = ("box_predictor", "mask_predictor", "keypoint_predictor")


def raw_output_modules(model: nn.Module) -> list[str]:
    """Names of the submodules of a torchvision detection model whose outputs are its raw predictions.

    R-CNN models (`GeneralizedRCNN`: Faster, Mask, Keypoint R-CNN): `rpn.head` and the ROI heads' predictors it has
    (`roi_heads.box_predictor`, `roi_heads.mask_predictor`, `roi_heads.keypoint_predictor`); RetinaNet, FCOS, SSD
    and SSDlite: `head`. Any other model: [] (its own output is the prediction).
    """
    if isinstance(model, GeneralizedRCNN):
        names = ["rpn.head"]
        roi = model.roi_heads
        names += [f"roi_heads.{p}" for p in _RCNN_PREDICTORS if getattr(roi, p, None) is not None]
        return names
    if isinstance(model, _ONE_STAGE):
        return ["head"]
    return []
