"""Inference: a checkpoint's network run on images, without the training module.

The layer the commands that only run a model stand on (``tlunet.predict``; ``predict_onnx``
is its numpy twin on the exported graph). It imports the models, not the LightningModule,
its callbacks, Lightning, torchmetrics or matplotlib: importing a command built on it stays
light (``tests/unit/test_inference.py``).
"""

from tlunet.inference.network import NET_PREFIX, TrainedNetwork, network_from_checkpoint
from tlunet.models.runtime import ForwardPrecision

__all__ = ["NET_PREFIX", "ForwardPrecision", "TrainedNetwork", "network_from_checkpoint"]
