"""Generation: from a prompt to the next tokens."""

from lmlab.generate.explain import top_next_tokens

__all__ = ["top_next_tokens"]
