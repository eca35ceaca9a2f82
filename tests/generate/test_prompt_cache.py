"""A prompt cache: keys/values kept from one call to the next run only a prompt's new tokens, and the
output is what a fresh prefill of the whole prompt gives."""

from __future__ import annotations

import pytest
import torch

import lmlab
from lmlab.generate import GenerationConfig, decode
from lmlab.generate.kv_cache import PromptCache
from lmlab.generate.speculative import (
    RECOMPUTE_WINDOW,
    Speculation,
    SpeculativeStats,
    speculative_rounds,
    truncated_draft,
)
from tests.generate.conftest import tiny_llama


def _prefills(model: lmlab.Transformer) -> list[int]:
    """The token count of each of `model`'s forward calls, in order (the first of a call: its prefill)."""
    calls: list[int] = []
    model.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[1]))
    return calls


def _decode(model, ids: list[int], cfg: GenerationConfig, past: PromptCache | None) -> tuple[list[int], torch.Tensor]:
    state = decode.new_state(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), cfg)
    for _ in decode.decode_steps(model, state, cfg, [], 0, past):
        pass
    return state.generated[0].tolist(), state.logprobs[0].clone()


@pytest.mark.parametrize("compiles", [(False, False, False), ("auto", "auto", "auto"), (False, "auto", False)])
def test_a_conversation_runs_only_its_new_tokens_and_answers_as_from_scratch(compiles, pending_warmups):
    """Three turns, each prompt the last one, its answer and a new question (the third with an earlier
    token edited): each turn's prefill runs the tokens after the kept prefix (all but the answer's last
    token, which was never fed back), and its tokens and log-probabilities are those of a fresh run.
    The compile setting may change between turns (an eager cache kept, a static one filled, and back);
    with "auto" the compiles never finish, so the static cache's eager steps run."""
    model = tiny_llama(0)
    calls = _prefills(model)
    past = PromptCache()
    torch.manual_seed(5)
    prompt = torch.randint(0, 512, (9,)).tolist()
    kept = 0
    for turn, compile in enumerate(compiles):
        cfg = GenerationConfig(max_new_tokens=12, compile=compile, logprobs=True)
        calls.clear()
        got, got_lp = _decode(model, prompt, cfg, past)
        assert calls[0] == len(prompt) - kept, turn  # the prefill
        assert past.ids == prompt + got[:-1]
        want, want_lp = _decode(model, prompt, cfg, None)
        assert got == want
        torch.testing.assert_close(got_lp, want_lp, atol=1e-5, rtol=0)
        extra = torch.randint(0, 512, (5,)).tolist()
        prompt, kept = prompt + got + extra, len(prompt) + len(got) - 1
        if turn == 1:  # an edited earlier turn: only the part before the edit is reused
            prompt[4] = (prompt[4] + 1) % 512
            kept = 4


def test_keys_and_values_of_another_model_are_not_reused():
    a, b = tiny_llama(0), tiny_llama(1)
    past, cfg = PromptCache(), GenerationConfig(max_new_tokens=6)
    prompt = torch.randint(0, 512, (9,)).tolist()
    _decode(a, prompt, cfg, past)
    assert past.reusable([*prompt, 1, 2], decode.prompt_cache_owner(a)) == len(prompt)
    assert past.reusable([*prompt, 1, 2], decode.prompt_cache_owner(b)) == 0
    assert _decode(b, prompt, cfg, past)[0] == _decode(b, prompt, cfg, None)[0]
    # the whole prompt kept: its last token still runs (its logits start the answer)
    assert past.reusable(past.ids, decode.prompt_cache_owner(b)) == len(past.ids) - 1


def _spy(monkeypatch, target, draft) -> dict[str, list]:
    """Record each model's forward widths, each draft head's argmaxes (its proposals) and each
    Speculation.adopt's answer."""
    seen: dict[str, list] = {"target": [], "draft": [], "proposals": [], "adopted": []}
    for name, model in (("target", target), ("draft", draft)):
        real = model.hidden_states

        def hidden(ids, *a, real=real, name=name, **k):
            seen[name].append(ids.shape[1])
            return real(ids, *a, **k)

        monkeypatch.setattr(model, "hidden_states", hidden)
    head, adopt = Speculation._head, Speculation.adopt

    def spy_head(self, model, h, z=None, full=True):
        out = head(self, model, h, z, full)
        if model is self.draft:
            seen["proposals"].append(out.argmax(-1).tolist())
        return out

    def spy_adopt(self, *a):
        seen["adopted"].append(adopt(self, *a))
        return seen["adopted"][-1]

    monkeypatch.setattr(Speculation, "_head", spy_head)
    monkeypatch.setattr(Speculation, "adopt", spy_adopt)
    return seen


@pytest.mark.parametrize("eagle", [False, True])
@pytest.mark.parametrize("compile", [False, "auto"])
def test_speculative_rounds_reuse_the_targets_kept_keys_and_values(eagle, compile, pending_warmups, monkeypatch):
    """Turns of speculative rounds over one prompt cache: the output is the target's greedy one, the
    cache keeps everything but the newest token, and the target's first call runs only the new tokens
    (with the drafted ones); the draft starts from its kept state, reads only the new tokens and
    proposes exactly what a fresh run over the whole prompt proposes. Without a kept draft state an
    EAGLE draft's first call instead runs the prompt for its states, from the last RECOMPUTE_WINDOW
    kept tokens on once more are kept (turn 3); the state it then keeps (base > 0) is adopted next
    (turn 4); after a plain answer (turn 5) the older state is adopted and catches up (turn 6)."""
    from lmlab.compress.eagle import eagle_draft

    target = tiny_llama(0)
    torch.manual_seed(1)
    draft = eagle_draft(target).eval() if eagle else truncated_draft(target, 1)
    seen = _spy(monkeypatch, target, draft)
    past, k = PromptCache(), 3
    torch.manual_seed(5)
    prompt = torch.randint(0, 512, (9,)).tolist()
    kept, state_start, from_scratch = 0, 0, True  # from_scratch: the kept state's chain began with a full read
    for turn in range(7):
        cfg = GenerationConfig(max_new_tokens=16, compile=compile)
        want = decode.generate(target, None, prompt, cfg.replace(compile=False))[0].token_ids
        if turn == 5:  # a plain answer: the target's cache moves on, the draft's state stays
            got = decode.generate(target, None, prompt, cfg, past=past)[0].token_ids
            assert got == want and past.draft is not None
            prompt, kept = prompt + got + torch.randint(0, 512, (6,)).tolist(), len(prompt) + len(got) - 1
            continue
        if turn == 3:
            past.draft = None  # nothing kept for the draft (as after a cache from plain answers only)
        had = past.draft is not None
        restart = eagle and not had and kept > RECOMPUTE_WINDOW
        seen["proposals"].clear()
        list(speculative_rounds(target, draft, None, prompt, cfg, k, 0.0, SpeculativeStats(), None, None))
        fresh = list(seen["proposals"])  # the same prompt, nothing kept
        for key in seen:
            seen[key].clear()
        got = [t for new in speculative_rounds(target, draft, None, prompt, cfg, k, 0.0, SpeculativeStats(), past, None)
               for t in new]  # fmt: skip
        assert got == want, turn
        assert past.ids == prompt + got[:-1]
        assert seen["adopted"] == [had], turn
        if eagle:
            first = len(prompt) - 1 - (kept - RECOMPUTE_WINDOW if restart else state_start if had else kept)
            assert seen["target"][0] == first, turn
        else:
            assert seen["target"][0] == len(prompt) - kept + k, turn
            assert seen["draft"][0] == len(prompt) - (state_start if had else 0), turn  # its kept keys/values
        from_scratch = from_scratch and not restart
        if from_scratch:  # a state whose chain began with a full read proposes what a fresh run does
            assert seen["proposals"] == fresh, turn
        state_start = len(prompt) + len(got) - 1  # where the kept state ends: all but the newest token
        prompt, kept = prompt + got + torch.randint(0, 512, (6,)).tolist(), state_start
    assert not eagle or not from_scratch  # (turn 3 did restart an EAGLE draft's window)


@pytest.mark.parametrize("eagle", [False, True])
def test_a_kept_draft_state_serves_only_its_own_draft_and_conversation(eagle, monkeypatch):
    """A kept draft state is refused by another draft object, and cut back where the conversation
    changed: edited at the last token it read (a plain answer in between keeps the target's cache on
    the edited one), or a prompt that ends where it does (a regenerated answer: nothing of it left to
    check against). Cut back, the draft reads only from the cut and proposes exactly what a fresh run
    over the whole prompt proposes; every answer is the target's greedy one."""
    from lmlab.compress.eagle import eagle_draft

    target = tiny_llama(0)
    torch.manual_seed(1)
    make = (lambda: eagle_draft(target).eval()) if eagle else (lambda: truncated_draft(target, 1))
    first, other = make(), make()
    other.load_state_dict(first.state_dict())  # the same weights, another object
    seen = _spy(monkeypatch, target, other)
    past, cfg = PromptCache(), GenerationConfig(max_new_tokens=8)
    torch.manual_seed(5)
    prompt = torch.randint(0, 512, (9,)).tolist()

    def turn(draft, prompt, kept=True) -> list[int]:
        for key in seen:
            seen[key].clear()
        out = [t for new in speculative_rounds(target, draft, None, prompt, cfg, 3, 0.0, SpeculativeStats(),
                                               past if kept else None) for t in new]  # fmt: skip
        assert out == decode.generate(target, None, prompt, cfg)[0].token_ids
        return out

    prompt = prompt + turn(first, prompt) + [7, 8]
    prompt = prompt + turn(other, prompt) + [9]
    assert seen["adopted"] == [False]  # another draft's state
    prompt = prompt + turn(other, prompt) + [10]
    assert seen["adopted"] == [True]  # its own
    kept = past.draft
    # after whole rounds the state read all but the newest token: change the last one it read
    assert kept.start == len(kept.ids) - 1
    last = len(kept.ids) - 2
    edited = [*prompt[:last], (prompt[last] + 1) % 512, *prompt[last + 1 :]]
    answer = decode.generate(target, None, edited, cfg, past=past)[0].token_ids
    assert past.draft is kept and past.ids[last] == edited[last]
    for case in ("edited", "regenerated", "edited at the last token its keys/values read"):
        if case == "edited":
            prompt, cut = edited + answer + [9], last
        elif case == "regenerated":  # the answer just given again: the prompt ends where the state does
            prompt = past.draft.ids[: past.draft.start]
            cut = len(prompt) - 1  # the target's kept keys/values stop one short (its last token runs)
        else:  # the token its last cache entry read (an EAGLE entry at p reads token p + 1): that entry goes
            kept = past.draft
            cut = kept.base + kept.length - (0 if eagle else 1)
            edited = [*kept.ids[:cut], (kept.ids[cut] + 1) % 512, *kept.ids[cut + 1 :]]
            answer = decode.generate(target, None, edited, cfg, past=past)[0].token_ids  # moves the target's cache
            prompt = edited + answer + [11]
        turn(other, prompt, kept=False)
        fresh = list(seen["proposals"])  # the same prompt, nothing kept
        turn(other, prompt)
        assert seen["adopted"] == [True]  # cut back
        assert seen["proposals"] == fresh
        if eagle:  # the target reruns (for the draft's states) at most from the token before the cut
            assert seen["target"][0] <= len(prompt) - cut, (cut, seen["target"])
        if not eagle or case.startswith("edited at"):  # the draft's kept keys/values end where its reads
            assert seen["draft"][0] == len(prompt) - cut, (cut, seen["draft"])  # met the change: it reads on


def test_generate_and_speculative_generate_take_a_prompt_cache():
    """The library calls a notebook makes turn by turn: with `past` each prompt after the first runs its
    new tokens only and the outputs are those without; a batch, several sequences or beams are refused."""
    from lmlab.errors import LmlabError
    from lmlab.generate.speculative import speculative_generate

    model = tiny_llama(0)
    draft = truncated_draft(model, 1)
    cfg = GenerationConfig(max_new_tokens=10)
    torch.manual_seed(5)
    prompt = torch.randint(0, 512, (9,)).tolist()
    plain, spec = PromptCache(), PromptCache()
    for _ in range(3):
        want = decode.generate(model, None, prompt, cfg)[0].token_ids
        assert decode.generate(model, None, prompt, cfg, past=plain)[0].token_ids == want
        assert speculative_generate(model, draft, None, prompt, cfg, 3, past=spec)[0].token_ids == want
        assert plain.ids == spec.ids == prompt + want[:-1]
        prompt = prompt + want + torch.randint(0, 512, (4,)).tolist()
    for bad in ({"prompts": [prompt, prompt]}, {"num_return_sequences": 2, "temperature": 1.0}, {"num_beams": 2}):
        with pytest.raises(LmlabError, match="one prompt and one sequence"):
            decode.generate(model, None, bad.pop("prompts", prompt), cfg, past=plain, **bad)


def test_under_the_gpu_policy_the_kept_keys_and_values_are_a_copy_of_the_shared_cache(monkeypatch, pending_warmups):
    """Where the policy replays CUDA graphs (forced here on the CPU), a compiled decode runs over a static
    cache kept for every decode of its shape. A prompt cache keeps a copy of it: another decode of the
    same shape between two turns overwrites the shared buffers, and the second turn still answers as a
    fresh prefill does."""
    from lmlab.utils.device import forced_policy, policy

    monkeypatch.setattr(decode, "_caches", {})
    model = tiny_llama(0)
    cfg = GenerationConfig(max_new_tokens=8, compile="auto", logprobs=True)
    torch.manual_seed(5)
    prompt, other = torch.randint(0, 512, (9,)).tolist(), torch.randint(0, 512, (9,)).tolist()
    past = PromptCache()
    with forced_policy(policy("cuda")):
        got, _ = _decode(model, prompt, cfg, past)
        shared = list(decode._caches.values())
        assert len(shared) == 1 and past.cache is not shared[0]
        _decode(model, other, cfg, None)  # the same shape: the same kept cache, written over
        assert list(decode._caches.values()) == shared
        prompt = prompt + got + [7, 8, 9]
        got, got_lp = _decode(model, prompt, cfg, past)
    want, want_lp = _decode(model, prompt, cfg.replace(compile=False), None)
    assert got == want
    torch.testing.assert_close(got_lp, want_lp, atol=1e-5, rtol=0)
