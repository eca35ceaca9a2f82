"""The model layer: configuration and presets, the Transformer, and checkpoint I/O."""

from lmlab.model.checkpoint import load_pretrained, save_pretrained
from lmlab.model.config import PRESETS, ModelConfig
from lmlab.model.transformer import Transformer

__all__ = ["PRESETS", "ModelConfig", "Transformer", "load_pretrained", "save_pretrained"]
