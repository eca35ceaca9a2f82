"""compile="auto": eager steps over the static cache until the background compile is ready, then the
compiled graph; tokens equal plain eager decoding whatever the moment of the switch, and a failed
compile leaves decoding eager with one warning."""

from __future__ import annotations

import pytest
import torch

import lmlab
from lmlab.errors import LmlabError
from lmlab.generate import GenerationConfig, generate_ids
from lmlab.generate import decode as dec
from lmlab.generate.decode import left_pad
from lmlab.model.config import ModelConfig


def _model() -> lmlab.Transformer:
    torch.manual_seed(0)
    return lmlab.Transformer(ModelConfig.from_preset("llama-tiny")).eval()


def _prompts():
    torch.manual_seed(1)
    return left_pad([torch.randint(3, 512, (n,)).tolist() for n in (6, 9)], 0)


class _Ready:
    """A stand-in for the warm-up's event: set from the n-th time a decode step asks."""

    def __init__(self, after: int) -> None:
        self.after, self.asked = after, 0

    def is_set(self) -> bool:
        self.asked += 1
        return self.asked > self.after


class _Gate:
    def __init__(self, after: int) -> None:
        self.ready, self.failed = _Ready(after), None


@pytest.mark.parametrize("switch_after", [0, 3, 100])
def test_auto_equals_eager_wherever_the_switch_happens(monkeypatch, switch_after):
    model = _model()
    ids, mask = _prompts()
    eager = generate_ids(model, ids, mask, GenerationConfig(max_new_tokens=10), eos=[])
    used = []
    real_compiled = dec.compiled

    def counting_compiled(model, batch, capacity, key=None):
        fn = real_compiled(model, batch, capacity, key)

        def call(*a, **k):
            used.append(1)
            return fn(*a, **k)

        return call

    monkeypatch.setattr(dec, "warmup", lambda *a: _Gate(switch_after))
    monkeypatch.setattr(dec, "compiled", counting_compiled)
    auto = generate_ids(model, ids, mask, GenerationConfig(max_new_tokens=10, compile="auto"), eos=[])
    assert torch.equal(auto, eager)
    assert len(used) == max(0, 9 - switch_after)  # 9 steps after the prefill; the graph takes over once ready


def test_background_compile_really_compiles_and_matches(monkeypatch):
    model = _model()
    ids, mask = _prompts()
    cfg = GenerationConfig(max_new_tokens=6, compile="auto")
    first = generate_ids(model, ids, mask, cfg, eos=[])
    key = dec._key(model, ids.shape[0], dec.capacity_for(ids.shape[1] + 6))
    warm = dec._warming[key]
    assert warm.ready.wait(timeout=600) and warm.failed is None
    again = generate_ids(model, ids, mask, cfg, eos=[])  # now through the compiled graph
    assert torch.equal(first, again)
    assert torch.equal(first, generate_ids(model, ids, mask, GenerationConfig(max_new_tokens=6), eos=[]))


def test_failed_compile_stays_eager_with_a_warning(monkeypatch):
    model = _model()
    ids, mask = _prompts()

    def broken(model, batch, capacity, key=None, width=0, tree=False):
        def fail(*a, **k):
            raise RuntimeError("no compiler here")

        return fail

    monkeypatch.setattr(dec, "compiled", broken)
    dec._warming.clear()
    with pytest.warns(UserWarning, match="decoding stays eager: no compiler here"):
        out = generate_ids(model, ids, mask, GenerationConfig(max_new_tokens=6, compile="auto"), eos=[])
        key = dec._key(model, ids.shape[0], dec.capacity_for(ids.shape[1] + 6))
        dec._warming[key].ready.wait(timeout=60)
        out = generate_ids(model, ids, mask, GenerationConfig(max_new_tokens=6, compile="auto"), eos=[])
    assert torch.equal(out, generate_ids(model, ids, mask, GenerationConfig(max_new_tokens=6), eos=[]))
    dec._warming.clear()


def test_compile_setting_is_validated():
    with pytest.raises(LmlabError, match="must be true, false or 'auto'"):
        GenerationConfig(compile="sometimes")
