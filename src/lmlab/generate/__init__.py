"""Generation: KV cache, logits processors, greedy/sampled/beam/speculative decoding, streaming.

`lmlab.generate(model, tokenizer, prompts, config)` calls `generate` below: this package is
callable, so the function and the modules (`lmlab.generate.sampling`, ...) share one name.
"""

import sys
import types

from lmlab.generate.config import GenerationConfig
from lmlab.generate.decode import Generation, generate, generate_ids, stream
from lmlab.generate.explain import top_next_tokens
from lmlab.generate.kv_cache import KVCache

__all__ = ["Generation", "GenerationConfig", "KVCache", "generate", "generate_ids", "stream", "top_next_tokens"]


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
