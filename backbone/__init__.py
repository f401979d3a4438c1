"""The frozen GLIP core: a faithful pure-PyTorch GLIP that loads the official checkpoints.

Knows nothing about adapters or datasets. See `GLIP` (model + hooks; `GLIP.from_pretrained` loads every kind of
checkpoint) and `GLIPDetector` (detect API).
"""
from backbone.checkpoints import CHECKPOINTS, list_checkpoints
from backbone.config import GLIPConfig, get_preset
from backbone.model import GLIP
from backbone.outputs import Detections, HeadOutputs, PromptFeatures, VisualFeatures

__all__ = ["CHECKPOINTS", "GLIP", "GLIPConfig", "Detections", "HeadOutputs", "PromptFeatures", "VisualFeatures",
           "get_preset", "list_checkpoints"]
