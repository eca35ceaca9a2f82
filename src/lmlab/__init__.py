"""lmlab: every step of building a large language model, as a command you can run and a module you can read."""

from lmlab import generate
from lmlab.errors import LmlabError
from lmlab.generate import GenerationConfig, stream
from lmlab.model import PRESETS, ModelConfig, Transformer, load_pretrained, save_pretrained
from lmlab.tokenizer import Tokenizer, load_tokenizer

__version__ = "0.1.0"
__all__ = [
    "PRESETS",
    "GenerationConfig",
    "LmlabError",
    "ModelConfig",
    "Tokenizer",
    "Transformer",
    "generate",
    "load_pretrained",
    "load_tokenizer",
    "save_pretrained",
    "stream",
]
