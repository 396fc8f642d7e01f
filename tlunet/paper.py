"""The TL-U-Net paper's Table 1 (test set, slice-level split) and how its rows map to our runs.

Definitions (see README "Which metric is the paper's Mean Dice?"): the paper *writes* that its
"Mean Dice"/"Mean IoU" are class-frequency weighted means over background and tumour (our
``dice_mean_paper``/``iou_mean_paper``), but that definition cannot give its values on this
data (predicting no tumour at all already scores about 0.98). Its 3005/393/531 split is that of
the Keras notebooks widely copied for this dataset, whose "dice_coef"/"iou_coef" are smoothed
Dice/IoU of soft predictions per batch, averaged over batches: our ``dice_keras_batch`` and
``iou_keras_batch``, which land on the paper's scale on a paper-protocol run. The report puts
the paper's Mean Dice/IoU beside those (:data:`COMPARABLE`) and shows ``dice_mean_paper``
apart. Its "Accuracy" (77-94 %) cannot be pixel accuracy on this data (> 99 %) and is read as
the image-level tumour/no-tumour accuracy of the auxiliary head (our ``detect_accuracy``). Its
"Loss" is its own training loss, not comparable with ours and not shown beside our numbers.
"""

from __future__ import annotations

#: model label -> (Accuracy %, Mean IoU %, Mean Dice %, Loss)
TABLE1: dict[str, tuple[float, float, float, float]] = {
    "VGG16": (88.23, 61.60, 74.50, 0.142),
    "VGG19": (89.35, 77.25, 87.05, 0.140),
    "DenseNet201": (89.34, 89.41, 90.31, 0.114),
    "DenseNet121": (94.22, 91.14, 94.26, 0.090),
    "MobileNetV2": (87.50, 75.79, 86.03, 0.123),
    "Inception": (86.34, 76.13, 85.81, 0.127),
    "InceptionResNetV2": (88.43, 78.98, 88.14, 0.126),
    "EfficientNetB7": (78.97, 78.96, 88.07, 0.131),
    "U-Net (scratch)": (77.21, 78.25, 84.62, 0.145),
    "ResU-Net (scratch)": (78.36, 78.27, 81.33, 0.183),
}

#: our metric -> (paper column, index in TABLE1 rows); values in the paper are percentages.
#: The paper's Mean Dice/IoU sit beside the metric that lands on their scale (not the one its
#: text describes, ``dice_mean_paper``): README "Which metric is the paper's Mean Dice?".
COMPARABLE = {
    "dice_keras_batch": ("Mean Dice", 2),
    "iou_keras_batch": ("Mean IoU", 1),
    "detect_accuracy": ("Accuracy", 0),
}

_ENCODER_LABELS = {
    "vgg16": "VGG16",
    "vgg19": "VGG19",
    "densenet201": "DenseNet201",
    "densenet121": "DenseNet121",
    "mobilenet_v2": "MobileNetV2",
    "inceptionv4": "Inception",
    "tu-inception_v3": "Inception",
    "tu-inception_v4": "Inception",
    "inceptionresnetv2": "InceptionResNetV2",
    "tu-inception_resnet_v2": "InceptionResNetV2",
    "efficientnet-b7": "EfficientNetB7",
    "tu-efficientnet_b7": "EfficientNetB7",
}
_SCRATCH_LABELS = {"unet_scratch": "U-Net (scratch)", "resunet": "ResU-Net (scratch)"}


def paper_label(model: str, encoder: str) -> str | None:
    """The Table 1 row a run of ``model`` with ``encoder`` reproduces, or None."""
    if model in _SCRATCH_LABELS:
        return _SCRATCH_LABELS[model]
    return _ENCODER_LABELS.get(encoder)
