"""An EAGLE draft: its inputs (the target's hidden states), its loss against an independent per-position
computation, its checkpoint, and speculative decoding with it: the target's greedy output, and every
proposal equal to a from-scratch recompute of the draft on the target's true states."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import lmlab
from lmlab.compress.distill import cache_features
from lmlab.compress.draft import reduce_head
from lmlab.compress.eagle import eagle_draft, eagle_loss
from lmlab.errors import LmlabError
from lmlab.generate import GenerationConfig, generate
from lmlab.generate.speculative import speculative_generate
from lmlab.model.checkpoint import load_pretrained, save_pretrained
from lmlab.model.config import ModelConfig
from lmlab.model.hf import config_to_hf

IDS = list(range(0, 512, 2))  # a reduced head over half the vocabulary


def _target(seed: int = 0) -> lmlab.Transformer:
    torch.manual_seed(seed)
    return lmlab.Transformer(ModelConfig.from_preset("llama-tiny", init_std=0.1, eos_token_id=None)).eval()


def _draft(target: lmlab.Transformer, seed: int = 1, ids: list[int] | None = None) -> lmlab.Transformer:
    torch.manual_seed(seed)
    draft = eagle_draft(target)
    if ids is not None:
        reduce_head(draft, ids)
    return draft.eval()


def test_eagle_draft_reads_features_copies_the_targets_vocabulary_and_caches_exactly():
    target = _target()
    draft = _draft(target)
    assert draft.cfg.n_layer == 1 and draft.cfg.eagle and not draft.cfg.tie_embeddings
    assert torch.equal(draft.embed.weight, target.embed.weight)
    assert torch.equal(draft.lm_head.weight, target.lm_head.weight)
    assert draft.embed.weight.data_ptr() != target.embed.weight.data_ptr()  # a copy, not shared
    x = torch.randint(0, 512, (1, 9))
    f = torch.randn(1, 9, 64)
    with torch.no_grad():
        full = draft.hidden_states(x, features=f)
        cache = lmlab.generate.kv_cache.KVCache.for_model(draft, 1, 16)
        parts = [draft.hidden_states(x[:, :5], features=f[:, :5], kv_cache=cache)]
        parts += [draft.hidden_states(x[:, i : i + 1], features=f[:, i : i + 1], kv_cache=cache) for i in range(5, 9)]
        torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)  # cached == recomputed
        # the features matter: other features, other states
        assert not torch.allclose(draft.hidden_states(x, features=f + 1), full)
        with pytest.raises(LmlabError, match="EAGLE draft"):
            draft.hidden_states(x)  # (what `lmlab generate --model DRAFT` meets: one line, with a hint)


def test_eagle_loss_equals_a_per_position_computation():
    target = _target()
    draft = _draft(target, ids=IDS)
    torch.manual_seed(3)
    tokens = torch.randint(0, 512, (2, 8))
    feats = torch.randn(2, 7, 64)
    w = 0.3
    with torch.no_grad():
        for unroll in (1, 2):
            got, agree = eagle_loss(draft, feats, tokens, cls_weight=w, unroll=unroll)
            # independently: position by position, each from a fresh forward over the prefix
            total, inp, agree_ref = 0.0, feats[:, :-1].clone(), None
            for step in range(unroll):
                hs = torch.stack([draft.hidden_states(tokens[:, 1 : i + 2], features=inp[:, : i + 1])[:, -1]
                                  for i in range(6)], 1)  # fmt: skip
                reg = F.smooth_l1_loss(hs, feats[:, 1:])
                p = torch.softmax(feats[:, 1:] @ draft.lm_head.weight.T, -1)
                logq = torch.log_softmax(hs @ draft.lm_head.weight.T, -1)
                total += reg + w * -(p * logq).sum(-1).mean()
                if step == 0:
                    agree_ref = (logq.argmax(-1) == p.argmax(-1)).float().mean()
                inp = torch.cat([feats[:, :1], hs[:, :-1]], 1)
            torch.testing.assert_close(got, total / unroll, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(agree, agree_ref)


def _reference_rounds(target, draft, prompt: list[int], out: list[int], k: int) -> tuple[int, int, list[int]]:
    """(rounds, accepted, every proposal in order) of greedy EAGLE speculative decoding with confidence 0,
    recomputed from scratch each round: the draft reads the target's true states for every known
    position, then its own."""
    seq_all = prompt + out
    with torch.no_grad():
        true = target.hidden_states(torch.tensor([seq_all]))[0]  # (N, d): state after each token
    m, rounds, accepted, proposals = len(prompt), 0, 0, []
    while m < len(seq_all):
        n_draft = min(k, len(seq_all) - m)
        toks, feats, drafted = seq_all[1:m], true[: m - 1], []
        for _ in range(n_draft if m > 1 else 0):
            with torch.no_grad():
                h = draft.hidden_states(torch.tensor([toks]), features=feats[None])[0, -1]
                d = int(draft.full_vocab(draft.lm_head(h)).argmax())
            drafted.append(d)
            toks, feats = [*toks, d], torch.cat([feats, h[None]])
        a = 0
        while a < len(drafted) and drafted[a] == seq_all[m + a]:
            a += 1
        rounds, accepted, m, proposals = rounds + 1, accepted + a, m + a + 1, proposals + drafted
    return rounds, accepted, proposals


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("prompt_len", [1, 6])
def test_eagle_speculative_decoding_is_the_targets_greedy_output_with_exact_draft_state(k, prompt_len):
    torch.manual_seed(0)
    target = lmlab.Transformer(ModelConfig.from_preset("llama-tiny", n_layer=1, init_std=0.1, eos_token_id=None))
    draft = _draft(target.eval(), ids=IDS)
    # a draft that agrees often enough for multi-token rounds: fc passes the token's embedding through
    # and the layer is the target's only one, so the draft is the target without the first token (the
    # states' part of the path is the next test's)
    with torch.no_grad():
        draft.layers[0].load_state_dict(target.layers[0].state_dict())
        draft.fc.bias.zero_()
        draft.fc.weight.zero_()
        draft.fc.weight[:, 64:] = torch.eye(64)
    proposals: list[int] = []  # every drafted token, in order (greedy: the argmax of the draft's head)
    hook = draft.lm_head.register_forward_hook(
        lambda mod, args, out: proposals.extend(draft.head_ids[out.argmax(-1)].flatten().tolist())
    )
    torch.manual_seed(5)
    prompt = torch.randint(0, 512, (prompt_len,)).tolist()
    gen = GenerationConfig(max_new_tokens=24)
    want = generate(target, None, prompt, gen)[0].token_ids
    got, stats = speculative_generate(target, draft, None, prompt, gen, num_draft_tokens=k, confidence=0.0, tree=None)
    hook.remove()
    assert got.token_ids == want
    rounds, accepted, ref = _reference_rounds(target, draft, prompt, want, k)
    assert proposals == ref and (stats.rounds, stats.accepted) == (rounds, accepted)
    assert stats.accepted > 0  # (the check above means something only if some drafts were accepted)
    got, _ = speculative_generate(target, draft, None, prompt, gen, num_draft_tokens=k)  # confidence 0.4
    assert got.token_ids == want


def test_eagle_proposals_follow_the_targets_states_exactly():
    """A random draft whose states dominate: every round's proposals equal a from-scratch recompute."""
    target = _target()
    draft = _draft(target, seed=3, ids=IDS)
    with torch.no_grad():
        draft.fc.weight[:, :64] *= 10  # the states, not the token, decide
    proposals: list[int] = []
    hook = draft.lm_head.register_forward_hook(
        lambda mod, args, out: proposals.extend(draft.head_ids[out.argmax(-1)].flatten().tolist())
    )
    prompt = [5, 9, 200, 31, 7]
    gen = GenerationConfig(max_new_tokens=20)
    want = generate(target, None, prompt, gen)[0].token_ids
    got, stats = speculative_generate(target, draft, None, prompt, gen, num_draft_tokens=3, confidence=0.0, tree=None)
    hook.remove()
    assert got.token_ids == want
    assert proposals == _reference_rounds(target, draft, prompt, want, 3)[2] and len(proposals) == stats.proposed


def test_eagle_speculative_sampling_is_seeded_and_a_wrong_width_is_named():
    target = _target()
    draft = _draft(target)
    cfg = GenerationConfig(max_new_tokens=12, temperature=0.8, seed=7)
    a, _ = speculative_generate(target, draft, None, [1, 2, 3], cfg)
    b, _ = speculative_generate(target, draft, None, [1, 2, 3], cfg)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 12
    other = eagle_draft(lmlab.Transformer(ModelConfig.from_preset("llama-tiny", d_model=32, n_head=2, n_kv_head=1)))
    with pytest.raises(LmlabError, match="width 32"):
        speculative_generate(target, other, None, [1, 2, 3], cfg)


def test_eagle_draft_survives_save_and_load_and_has_no_hf_or_gguf_form(tmp_path, smollm2_gguf):
    from lmlab.compress.gguf_export import export_gguf

    draft = _draft(_target(), ids=IDS)
    assert config_to_hf(draft.cfg) is None
    save_pretrained(draft, None, tmp_path / "d")
    assert json.loads((tmp_path / "d" / "config.json").read_text())["model_type"] == "lmlab"
    back, _ = load_pretrained(tmp_path / "d")
    assert back.cfg.eagle and back.cfg.head_tokens == IDS
    x, f = torch.randint(0, 512, (1, 6)), torch.randn(1, 6, 64)
    with torch.no_grad():
        torch.testing.assert_close(back(x, features=f), draft(x, features=f), rtol=0, atol=0)
    _, tok = load_pretrained(smollm2_gguf)
    with pytest.raises(LmlabError, match="EAGLE draft has no GGUF form"):
        export_gguf(draft, tok, tmp_path / "d.gguf")
    with pytest.raises(LmlabError, match="head 'lm' and a causal"):
        ModelConfig.from_preset("llama-tiny", eagle=True, causal=False)


def test_feature_cache_is_the_targets_states_written_once(tmp_path):
    target = _target()
    windows = torch.randint(0, 512, (5, 9))
    path = tmp_path / "f.safetensors"
    feats = cache_features(target, windows, path, batch=2, progress=False)
    with torch.no_grad():
        want = target.hidden_states(windows[:, :-1])
    assert feats.dtype == torch.float16 and feats.shape == (5, 8, 64)
    torch.testing.assert_close(feats.float(), want, rtol=1e-3, atol=1e-3)  # (float16)
    mtime = path.stat().st_mtime_ns
    assert (
        torch.equal(cache_features(target, windows, path, progress=False), feats) and path.stat().st_mtime_ns == mtime
    )
    # a grown, reordered corpus: only its new windows go through the teacher (the first saved window is
    # recomputed as the teacher's check), the rest come from the file
    grown = torch.cat([torch.randint(0, 512, (3, 9)), windows.flip(0)])
    seen: list[int] = []
    target.embed.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    got = cache_features(target, grown, path, batch=2, progress=False)
    assert seen == [1, 2, 1] and path.stat().st_mtime_ns != mtime
    with torch.no_grad():
        torch.testing.assert_close(got.float(), target.hidden_states(grown[:, :-1]), rtol=1e-3, atol=1e-3)
    assert torch.equal(got[3:], feats.flip(0))  # reused as saved
    seen.clear()
    assert torch.equal(cache_features(target, grown.flip(0), path, progress=False), got.flip(0)) and seen == [1]
    mtime = path.stat().st_mtime_ns
    other = cache_features(_target(seed=1), windows[:4], path, progress=False)  # another teacher: made again
    assert path.stat().st_mtime_ns != mtime and not torch.allclose(other, feats[:4])


def test_distill_recipe_trains_an_eagle_draft_that_agrees_more(tiny_chat_teacher, tmp_path):
    """`lmlab distill` with student {eagle: true, head_vocab}: the features are cached, the draft's
    agreement with the teacher rises, and the checkpoint it writes keeps speculative decoding exact."""
    from lmlab.compress.distill import distill
    from lmlab.train.config import recipe_from_dict

    _, tok = tiny_chat_teacher
    recipe = recipe_from_dict({
        "distill": {"teacher": str(tmp_path / "teacher"),
                    "student": {"eagle": True, "head_vocab": 256, "unroll": 2, "noise": 0.05}},
        "data": {"datasets": ["kjv"], "max_windows": 16, "max_val_windows": 4},
        "train": {"out_dir": str(tmp_path / "run"), "max_steps": 40, "block_size": 32, "micro_batch_size": 4,
                  "lr": 3e-3, "warmup_steps": 0, "eval_every": 1000, "eval_batches": 1},
    })  # fmt: skip
    summary = distill(recipe, progress=False)
    assert (tmp_path / "run" / "teacher_features.safetensors").exists()
    assert summary["val_after"] < summary["val_before"]
    assert summary["val_agreement_after"] > summary["val_agreement_before"]
    draft, _ = load_pretrained(summary["model"])
    assert draft.cfg.eagle and tok.eos_token_id in draft.cfg.head_tokens and len(draft.cfg.head_tokens) <= 256
    teacher, _ = load_pretrained(tmp_path / "teacher")
    prompt = tok.encode("In the beginning God created")
    gen = GenerationConfig(max_new_tokens=12)
    got, _ = speculative_generate(teacher, draft, tok, prompt, gen, num_draft_tokens=3)
    assert got.token_ids == generate(teacher, tok, prompt, gen)[0].token_ids
    assert math.isfinite(summary["val_after"])
    # training goes on from a saved draft (its reduced head kept); a checkpoint that is no EAGLE draft is named
    more = recipe.to_dict()
    more["distill"]["student"]["init_from"] = summary["model"]  # (head_vocab stays: the saved head is kept)
    more["train"].update(out_dir=str(tmp_path / "run2"), max_steps=2)
    again = distill(recipe_from_dict(more), progress=False)
    assert again["val_before"] == pytest.approx(summary["val_after"], rel=1e-4)
    assert load_pretrained(again["model"])[0].cfg.head_tokens == draft.cfg.head_tokens
    more["distill"]["student"]["init_from"] = str(tmp_path / "teacher")
    with pytest.raises(LmlabError, match="is not an EAGLE draft"):
        distill(recipe_from_dict(more), progress=False)
    with pytest.raises(LmlabError, match="unknown key 'layers'"):
        distill(recipe_from_dict({**recipe.to_dict(), "distill": {"teacher": str(tmp_path / "teacher"),
                                                                  "student": {"eagle": True, "layers": 2}}}),
                progress=False)  # fmt: skip


def test_bad_eagle_settings_are_named():
    from lmlab.compress.distill import eagle_options

    assert eagle_options({"eagle": True}) == {"cls_weight": 0.1, "unroll": 1, "noise": 0.0}
    assert eagle_options({"unroll": 2, "noise": 0.1, "cls_weight": 1}) == {"cls_weight": 1.0, "unroll": 2, "noise": 0.1}
    bad = [
        ("unroll", 0),
        ("unroll", 1.5),
        ("noise", -0.1),
        ("noise", float("inf")),
        ("cls_weight", "x"),
        ("unroll", True),
    ]
    for key, value in bad:
        with pytest.raises(LmlabError) as e:
            eagle_options({key: value}, "r.yaml")
        assert e.value.field == f"distill.student.{key}" and "r.yaml" in str(e.value)


@pytest.mark.parametrize("swap", [False, True])
def test_eagle_tree_rounds_read_the_targets_states_exactly(monkeypatch, swap):
    """Tree rounds (generate/draft_tree.py) keep the target's states of the accepted candidates for the
    draft: a random draft whose states dominate guesses at each round's root exactly what a
    from-scratch read of the target's states of the whole sequence gives."""
    from lmlab.generate.speculative import Speculation

    torch.manual_seed(0)
    target = lmlab.Transformer(ModelConfig.from_preset("llama-tiny", n_layer=1, init_std=0.1, eos_token_id=None))
    draft = _draft(target.eval(), ids=IDS)
    with torch.no_grad():  # the target's layer over the token (it agrees often), and the states mixed in
        draft.layers[0].load_state_dict(target.layers[0].state_dict())
        draft.fc.bias.zero_()
        draft.fc.weight[:, :64] *= 0.05
        draft.fc.weight[:, 64:] = torch.eye(64)
    rounds: list[tuple[list[int], list[int]]] = []  # (the sequence, the root's guesses) each round
    real_round, real_guesses = Speculation._tree_round, Speculation._guesses

    recomputed: list[int] = []  # tokens the target ran again for their states, each round

    def tree_round(self, seq, *a, **k):
        rounds.append((list(seq), []))
        recomputed.append(self.recomputed)
        return real_round(self, seq, *a, **k)

    def guesses(self, h, z, n):
        out = real_guesses(self, h, z, n)
        if not rounds[-1][1]:
            rounds[-1][1].extend(out)
        # swap: the draft's best guess becomes candidate (1,), so accepted paths leave the first
        # candidates' rows (the states kept must be the path's, not the check's first rows)
        return [out[1], out[0], *out[2:]] if swap and len(out) > 1 else out

    monkeypatch.setattr(Speculation, "_tree_round", tree_round)
    monkeypatch.setattr(Speculation, "_guesses", guesses)
    torch.manual_seed(5)
    prompt = torch.randint(0, 512, (3,)).tolist()
    gen = GenerationConfig(max_new_tokens=24)
    want = generate(target, None, prompt, gen)[0].token_ids
    got, stats = speculative_generate(target, draft, None, prompt, gen, tree="0 1 2 00 01 000")
    assert got.token_ids == want and len(rounds) == stats.rounds > 1 and stats.accepted > 0
    assert recomputed[0] == len(prompt) - 1 and not any(recomputed[1:])  # the states come from the checks
    ids = torch.tensor(IDS)
    with torch.no_grad():
        for seq, root in rounds:
            states = target.hidden_states(torch.tensor([seq]))
            h = draft.hidden_states(torch.tensor([seq[1:]]), features=states[:, :-1])[:, -1]
            ref = ids[draft.lm_head(h)[0].topk(len(root)).indices].tolist()
            assert root == ref, len(seq)
