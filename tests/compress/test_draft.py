"""A draft for speculative decoding: the reduced-vocabulary head (exact against the full head, saved and
loaded, never proposing a token it lacks), its distillation loss against the closed form, frequent-token
selection, and the teacher's answers as sequence-level distillation data."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch

import lmlab
from lmlab.compress.distill import DistillConfig, DistillLoss, distill_loss, first_layers
from lmlab.compress.draft import (
    frequent_tokens,
    prompts_from,
    reduce_head,
    teacher_answers,
    teacher_prompts,
    user_prefix,
    user_turn,
)
from lmlab.data import fetch
from lmlab.errors import LmlabError
from lmlab.generate import GenerationConfig, generate
from lmlab.generate.speculative import speculative_generate
from lmlab.model.checkpoint import load_pretrained, save_pretrained
from lmlab.model.config import ModelConfig

IDS = [0, 3, 5, 17, 100, 101, 250, 511]


def _target(seed: int = 0) -> lmlab.Transformer:
    torch.manual_seed(seed)
    return lmlab.Transformer(ModelConfig.from_preset("llama-tiny", init_std=0.1, eos_token_id=None)).eval()


def test_reduced_head_equals_the_full_head_on_its_tokens_and_is_minus_inf_elsewhere():
    full = _target()
    draft = reduce_head(copy.deepcopy(full), IDS)
    assert draft.lm_head.weight.shape == (len(IDS), full.cfg.d_model) and not draft.cfg.tie_embeddings
    x = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        want, got = full(x), draft(x)
    assert got.shape == want.shape  # the whole vocabulary, as every consumer of logits expects
    # the same dot products (a matmul of another width may round differently in the last bit)
    torch.testing.assert_close(got[..., IDS], want[..., IDS], rtol=1e-5, atol=1e-6)
    others = torch.ones(512, dtype=torch.bool)
    others[IDS] = False
    assert torch.isneginf(got[..., others]).all()
    # the loss path (targets) agrees with the logits; a token the head lacks costs infinity
    y = torch.tensor([IDS + IDS[:1]] * 2)  # (2, 9)
    want_ce = torch.nn.functional.cross_entropy(got.flatten(0, 1), y.flatten())
    with torch.no_grad():
        torch.testing.assert_close(draft(x, targets=y), want_ce)
        assert math.isinf(float(draft(x, targets=torch.full((2, 9), 1))))


def test_reduced_head_survives_save_and_load(tmp_path):
    draft = reduce_head(first_layers(_target(), 1), IDS).eval()
    save_pretrained(draft, None, tmp_path / "d")
    assert json.loads((tmp_path / "d" / "config.json").read_text())["model_type"] == "lmlab"
    back, _ = load_pretrained(tmp_path / "d")
    assert back.cfg.head_tokens == IDS
    x = torch.randint(0, 512, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(back(x), draft(x), rtol=0, atol=0)


def test_a_reduced_head_draft_keeps_speculative_decoding_exact():
    target = _target()
    prompt = torch.randint(0, 512, (6,)).tolist()
    cfg = GenerationConfig(max_new_tokens=20)
    want = generate(target, None, prompt, cfg)[0].token_ids
    # a draft over the tokens the target actually says (it agrees often) and one over a few others
    often = sorted(set(want) | {1, 2})
    for ids in (often, IDS):
        draft = reduce_head(copy.deepcopy(target), ids)
        got, stats = speculative_generate(target, draft, None, prompt, cfg, num_draft_tokens=3)
        assert got.token_ids == want
    assert stats.proposed > 0
    # with the full layers and the said tokens, the draft agrees with every greedy choice
    _, stats = speculative_generate(target, reduce_head(copy.deepcopy(target), often), None, prompt, cfg, 3, tree=None)
    assert stats.acceptance_rate == 1.0
    # sampling: the draft's distribution is zero off its head, and the output stays seeded-reproducible
    s = GenerationConfig(max_new_tokens=12, temperature=0.9, seed=1)
    draft = reduce_head(first_layers(target, 1), IDS).eval()
    a, _ = speculative_generate(target, draft, None, prompt, s)
    b, _ = speculative_generate(target, draft, None, prompt, s)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 12


def test_reduced_head_distillation_loss_is_the_kl_of_the_renormalized_teacher():
    target = _target()
    student = reduce_head(first_layers(target, 1), IDS)
    x = torch.randint(0, 512, (2, 5))
    y = torch.tensor([[3, 5, 1, 17, -100], [0, 0, 2, 511, 100]])  # 1 and 2 are not in the head
    with torch.no_grad():
        s_full, t_full = student(x), target(x)
    s, t = s_full[..., IDS], t_full[..., IDS]
    p, logq = t.softmax(-1), s.log_softmax(-1)
    kl = (p * (p.log() - logq)).sum(-1)  # (2, 5): the teacher renormalized over the head's tokens
    keep = y != -100
    alpha = 0.6
    where = {tok: i for i, tok in enumerate(IDS)}
    ce_terms = [-float(logq[b, i, where[int(y[b, i])]]) for b in range(2) for i in range(5) if int(y[b, i]) in where]
    want = alpha * float(kl[keep].mean()) + (1 - alpha) * sum(ce_terms) / len(ce_terms)
    dc = DistillConfig(temperature=1.0, alpha=alpha)
    loss = DistillLoss(dc, target, None, IDS)
    assert float(loss(student.eval(), (x, y, None)).detach()) == pytest.approx(want, rel=1e-5)

    # the cached top-k: the teacher's top tokens the head lacks drop out, the rest are renormalized
    top = t_full.topk(12, dim=-1)
    cache = {"values": top.values[None].half().float()[0], "indices": top.indices.int()}
    loss = DistillLoss(DistillConfig(temperature=1.0, alpha=1.0, teacher_logits="cache"), target, cache, IDS)
    got = float(loss(student.train(), (x, y, torch.arange(2))).detach())
    terms = []
    for b in range(2):
        for i in range(5):
            if int(y[b, i]) == -100:
                continue
            vals = [(float(v), int(j)) for v, j in zip(cache["values"][b, i], top.indices[b, i]) if int(j) in where]
            pk = torch.tensor([v for v, _ in vals]).softmax(-1)
            lq = logq[b, i, [where[j] for _, j in vals]]
            terms.append(float((pk * (pk.log() - lq)).sum()))
    assert got == pytest.approx(sum(terms) / len(terms), rel=1e-4)
    # with every token in the head, the reduced loss is the ordinary one
    all_ids = list(range(512))
    full_head = reduce_head(first_layers(target, 1), all_ids)
    with torch.no_grad():
        want = distill_loss(full_head(x), target(x), y, 1.0, 1.0)
    torch.testing.assert_close(DistillLoss(DistillConfig(temperature=1.0, alpha=1.0), target, None, all_ids)(
        full_head.eval(), (x, y, None)), want)  # fmt: skip


def test_frequent_tokens_keeps_the_commonest_and_the_special_ones():
    w = torch.tensor([[5, 5, 5, 7, 7, 9], [9, 9, 9, 9, 1, 2]])
    assert frequent_tokens(w, 2) == [5, 9]
    assert frequent_tokens(w, 3, always=[42]) == [5, 9, 42]
    assert frequent_tokens(w, 4) == [1, 5, 7, 9]  # ties (1 and 2 once each): the lower id
    assert frequent_tokens(w, 100) == [1, 2, 5, 7, 9]  # never more than the text has
    with pytest.raises(LmlabError, match="head_vocab 1 is smaller than the 2 special tokens"):
        frequent_tokens(w, 1, always=[0, 1])


def test_bad_head_tokens_are_named():
    with pytest.raises(LmlabError, match="head_tokens"):
        ModelConfig.from_preset("llama-tiny", head_tokens=[1, 1])
    with pytest.raises(LmlabError, match="head_tokens"):
        ModelConfig.from_preset("llama-tiny", head_tokens=[600])
    with pytest.raises(LmlabError, match="untied"):
        ModelConfig.from_preset("llama-tiny", head_tokens=[1], tie_embeddings=True)
    with pytest.raises(LmlabError, match=r"already reduced \(to 8 tokens\)"):
        reduce_head(reduce_head(_target(), IDS), IDS)
    with pytest.raises(LmlabError, match="unknown key 'prompts'"):
        DistillConfig(teacher_answers={"datasets": ["chatterbot"], "prompts": 3})
    for bad in ({"self_prompts": -1}, {"max_prompts": 2.5}, {"max_prompts": 0}, {"batch": 0}, {"max_new_tokens": True}):
        key = next(iter(bad))
        with pytest.raises(LmlabError, match="whole number") as e:
            DistillConfig(teacher_answers={"datasets": ["chatterbot"], **bad})
        assert e.value.field == f"distill.teacher_answers.{key}"


def test_gguf_export_refuses_a_reduced_head(smollm2_gguf, tmp_path):
    from lmlab.compress.gguf_export import export_gguf

    _, tok = load_pretrained(smollm2_gguf)
    draft = reduce_head(_target(), IDS)
    with pytest.raises(LmlabError, match="reduced vocabulary head has no GGUF form"):
        export_gguf(draft, tok, tmp_path / "d.gguf")
    assert not (tmp_path / "d.gguf").exists()


def test_prompts_are_user_turns_questions_or_texts(tmp_path):
    f = tmp_path / "a.jsonl"
    recs = [
        {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]},
        {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hey."}]},
        {"question": "2 + 2?", "choices": ["3", "4"], "answer": "B"},
        {"text": "  tell me  "},
        {"messages": [{"role": "system", "content": "no user first"}]},
    ]
    f.write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
    assert prompts_from([f]) == ["Hi?", "2 + 2?\nA. 3\nB. 4", "tell me"]
    assert prompts_from([f], max_prompts=2) == ["Hi?", "2 + 2?\nA. 3\nB. 4"]
    assert user_turn({"messages": []}) is None
    f.write_text(json.dumps(recs[0]) + "\n{broken\n")
    with pytest.raises(LmlabError) as e:
        prompts_from([f])
    assert e.value.line == 2 and str(f) in str(e.value)


def test_teacher_answers_are_its_greedy_chat_answers_written_once(smollm2_gguf, tmp_path, monkeypatch):
    from lmlab.compress import draft

    _, tok = load_pretrained(smollm2_gguf)
    torch.manual_seed(0)
    teacher = lmlab.Transformer(ModelConfig.from_preset("llama-tiny", vocab_size=49152, init_std=0.1)).eval()
    prompts = ["What is AI?", "Name a colour, please, any colour at all."]
    path = teacher_answers(teacher, tok, prompts, tmp_path / "a.jsonl", max_new_tokens=6, batch=2, progress=False)
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["messages"][0]["content"] for r in recs] == prompts
    for p, r in zip(prompts, recs):  # batched and left-padded, each answer is the prompt's own greedy answer
        ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
        alone = generate(teacher, tok, ids, GenerationConfig(max_new_tokens=6))[0].token_ids
        assert r["messages"][1] == {"role": "assistant", "content": tok.decode(alone, skip_special_tokens=True).strip()}
    mtime = path.stat().st_mtime_ns
    teacher_answers(teacher, tok, prompts, path, max_new_tokens=6, progress=False)
    assert path.stat().st_mtime_ns == mtime  # reused
    calls: list[int] = []
    real = draft.generate
    monkeypatch.setattr(draft, "generate", lambda m, t, rows, c: calls.append(len(rows)) or real(m, t, rows, c))
    teacher_answers(teacher, tok, prompts, path, max_new_tokens=5, progress=False)
    assert calls == [2]  # another length: made again


def test_teacher_answers_reuse_stored_answers_of_the_same_teacher(smollm2_gguf, tmp_path, monkeypatch):
    """A longer prompt list generates only its new prompts' answers; another teacher makes all again."""
    from lmlab.compress import draft

    _, tok = load_pretrained(smollm2_gguf)
    torch.manual_seed(0)
    teacher = lmlab.Transformer(ModelConfig.from_preset("llama-tiny", vocab_size=49152, init_std=0.1)).eval()
    path = teacher_answers(teacher, tok, ["What is AI?"], tmp_path / "a.jsonl", max_new_tokens=4, progress=False)
    first = path.read_text().splitlines()
    path.write_text(first[0].replace('"assistant", "content": "', '"assistant", "content": "STORED ') + "\n")
    asked: list[int] = []
    real = draft.generate
    monkeypatch.setattr(draft, "generate", lambda m, t, rows, c: asked.append(len(rows)) or real(m, t, rows, c))
    prompts = ["Name a colour.", "What is AI?"]
    recs = [json.loads(line) for line in teacher_answers(teacher, tok, prompts, path, 4, progress=False)
            .read_text().splitlines()]  # fmt: skip
    assert asked == [1] and [r["messages"][0]["content"] for r in recs] == prompts
    assert recs[1]["messages"][1]["content"].startswith("STORED ")  # reused, not regenerated
    ids = tok.apply_chat_template([{"role": "user", "content": prompts[0]}], add_generation_prompt=True, tokenize=True)
    alone = generate(teacher, tok, ids, GenerationConfig(max_new_tokens=4))[0].token_ids
    assert recs[0]["messages"][1]["content"] == tok.decode(alone, skip_special_tokens=True).strip()
    other = lmlab.Transformer(ModelConfig.from_preset("llama-tiny", vocab_size=49152, init_std=0.1)).eval()
    recs = [json.loads(line) for line in teacher_answers(other, tok, prompts, path, 4, progress=False)
            .read_text().splitlines()]  # fmt: skip
    assert asked == [1, 2] and not recs[1]["messages"][1]["content"].startswith("STORED ")


def test_user_prefix_is_where_the_templates_user_turn_begins(smollm2_gguf):
    _, tok = load_pretrained(smollm2_gguf)
    prefix = user_prefix(tok)
    for text in ("What is AI?", "写一首诗"):
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
        assert list(ids[: len(prefix)]) == prefix and len(ids) > len(prefix)
    assert tok.decode(prefix).endswith("<|im_start|>user\n") and "system" in tok.decode(prefix)


def _ending_teacher(seed: int = 0) -> lmlab.Transformer:
    """A tiny random model that ends a turn on ~10% of its tokens (5,000 stop ids): some of its user
    turns end within a dozen tokens, some do not."""
    torch.manual_seed(seed)
    cfg = ModelConfig.from_preset("llama-tiny", vocab_size=49152, init_std=0.1, eos_token_id=list(range(100, 5100)))
    return lmlab.Transformer(cfg).eval()


def test_teacher_prompts_are_turns_it_ends_itself_and_grow_as_if_uninterrupted(smollm2_gguf, tmp_path, monkeypatch):
    """Magpie: sampled from the user prefix, only the turns the teacher ends are kept, distinct; a larger
    n continues from the rounds already done and gives what one uninterrupted run gives."""
    from lmlab.compress import draft

    _, tok = load_pretrained(smollm2_gguf)
    teacher = _ending_teacher()
    seeds: list[int] = []
    real = draft.generate
    monkeypatch.setattr(draft, "generate", lambda m, t, rows, c: seeds.append(c.seed) or real(m, t, rows, c))
    kw = {"max_new_tokens": 12, "batch": 4, "progress": False}
    few = teacher_prompts(teacher, tok, 3, tmp_path / "p.jsonl", **kw)
    done = len(seeds)
    more = teacher_prompts(teacher, tok, 9, tmp_path / "p.jsonl", **kw)
    assert seeds == list(range(len(seeds)))  # the second call went on from round `done`, repeating none
    assert done < len(seeds)
    fresh = teacher_prompts(teacher, tok, 9, tmp_path / "q.jsonl", **kw)
    assert more == fresh and more[:3] == few and len(set(more)) == 9
    # against generation itself: every kept prompt is a turn its round ended; cut-off turns are left out
    ended, cut = set(), set()
    config = GenerationConfig(max_new_tokens=12, temperature=1.0, top_p=0.95)
    for s in range(max(seeds) + 1):
        for g in real(teacher, tok, [user_prefix(tok)] * 4, dataclasses.replace(config, seed=s)):
            (ended if g.finish_reason == "stop" else cut).add(g.text.strip())
    assert cut and set(more) <= ended and not set(more) & cut
    # what the file holds is served without a round; prompts the caller has are left out
    seeds.clear()
    assert teacher_prompts(teacher, tok, 9, tmp_path / "p.jsonl", **kw) == more and seeds == []
    others = teacher_prompts(teacher, tok, 5, tmp_path / "p.jsonl", exclude=more[:4], **kw)
    assert others == more[4:9] and seeds == []
    # another teacher's file is not continued
    teacher_prompts(_ending_teacher(1), tok, 2, tmp_path / "p.jsonl", **kw)
    assert seeds[0] == 0


def test_distill_recipe_adds_the_teachers_own_prompts_after_the_data_sets(smollm2_gguf, tmp_path):
    """self_prompts: the teacher's answers cover the data sets' prompts, then as many it wrote itself."""
    from lmlab.compress.distill import distill
    from lmlab.train.config import recipe_from_dict

    _, tok = load_pretrained(smollm2_gguf)
    save_pretrained(_ending_teacher(), tok, tmp_path / "teacher")
    recipe = recipe_from_dict({
        "distill": {"teacher": str(tmp_path / "teacher"), "student": {"layers": 1},
                    "teacher_answers": {"datasets": ["chatterbot"], "max_prompts": 2, "self_prompts": 3,
                                        "max_new_tokens": 4}},
        "data": {"datasets": ["kjv"], "max_windows": 4, "max_val_windows": 1},
        "train": {"out_dir": str(tmp_path / "run"), "max_steps": 1, "block_size": 16, "micro_batch_size": 2,
                  "warmup_steps": 0, "eval_every": 1000, "eval_batches": 1},
    })  # fmt: skip
    distill(recipe, progress=False)
    asked = [json.loads(line)["messages"][0]["content"]
             for line in (tmp_path / "run" / "teacher_answers.jsonl").read_text().splitlines()]  # fmt: skip
    written = [
        json.loads(line)["text"] for line in (tmp_path / "run" / "teacher_prompts.jsonl").read_text().splitlines()
    ]
    assert asked[:2] == prompts_from([fetch("chatterbot") / "train.jsonl"], 2)
    assert len(asked) == 5 and asked[2:] == [t for t in written if t not in asked[:2]][:3]


def test_a_teacher_that_never_ends_a_turn_is_named(smollm2_gguf, tmp_path):
    _, tok = load_pretrained(smollm2_gguf)
    torch.manual_seed(0)
    teacher = lmlab.Transformer(ModelConfig.from_preset("llama-tiny", vocab_size=49152, init_std=0.1)).eval()
    with pytest.raises(LmlabError, match=r"ended 0 of the 16 user turns it began within 3 tokens"):
        teacher_prompts(teacher, tok, 5, tmp_path / "p.jsonl", max_new_tokens=3, batch=2, progress=False)


def test_distill_recipe_makes_a_reduced_head_draft_from_teacher_answers(tiny_chat_teacher, tmp_path):
    """`lmlab distill` with head_vocab and teacher_answers on a tiny teacher with SmolLM2's tokenizer:
    the answers are written, the head keeps the commonest tokens and EOS, and the draft it writes
    loads and keeps speculative decoding exact."""
    from lmlab.compress.distill import distill
    from lmlab.train.config import recipe_from_dict

    _, tok = tiny_chat_teacher
    recipe = recipe_from_dict({
        "distill": {"teacher": str(tmp_path / "teacher"), "student": {"layers": 1, "head_vocab": 64},
                    "teacher_logits": "cache", "top_k": 8, "alpha": 0.8,
                    "teacher_answers": {"datasets": ["chatterbot"], "max_prompts": 3, "max_new_tokens": 4}},
        "data": {"datasets": ["kjv"], "max_windows": 8, "max_val_windows": 2},
        "train": {"out_dir": str(tmp_path / "run"), "max_steps": 2, "block_size": 16, "micro_batch_size": 2,
                  "warmup_steps": 0, "eval_every": 1000, "eval_batches": 1},
    })  # fmt: skip
    summary = distill(recipe, progress=False)
    answers = (tmp_path / "run" / "teacher_answers.jsonl").read_text().splitlines()
    assert len(answers) == 3 and json.loads(answers[0])["messages"][1]["role"] == "assistant"
    draft, _ = load_pretrained(summary["model"])
    assert len(draft.cfg.head_tokens) == 64 and tok.eos_token_id in draft.cfg.head_tokens
    assert math.isfinite(summary["val_after"])  # (validation text the 64-token head mostly lacks: no NaN)
    teacher, _ = load_pretrained(tmp_path / "teacher")
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is AI?"}], add_generation_prompt=True,
                                     tokenize=True)  # fmt: skip
    gen = GenerationConfig(max_new_tokens=10)
    got, _ = speculative_generate(teacher, draft, tok, prompt, gen, num_draft_tokens=3)
    assert got.token_ids == generate(teacher, tok, prompt, gen)[0].token_ids


def test_a_position_whose_top_k_the_head_lacks_adds_nothing_and_no_nan():
    target = _target()
    student = reduce_head(first_layers(target, 1), IDS).train()
    x = torch.randint(0, 512, (1, 4))
    outside = torch.tensor([[[1, 2], [1, 3], [0, 3], [2, 4]]])  # position 0: neither token is in the head
    cache = {"values": torch.tensor([[[2.0, 1.0]] * 4]), "indices": outside.int()}
    loss = DistillLoss(DistillConfig(temperature=1.0, alpha=0.5, teacher_logits="cache"), target, cache, IDS)
    y = torch.tensor([[1, 2, 4, 4]])  # no target in the head either: the cross-entropy counts none
    value = loss(student, (x, y, torch.tensor([0])))
    value.backward()
    assert math.isfinite(float(value.detach()))
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)
    # positions 0 and 3 add nothing; 1 keeps token 3 alone (p = 1); 2 keeps both tokens
    with torch.no_grad():
        logq = student(x)[0][:, IDS].log_softmax(-1)  # (4, len(IDS))
    p = torch.tensor([2.0, 1.0]).softmax(-1)
    kl1 = -float(logq[1, IDS.index(3)])
    kl2 = float((p * (p.log() - logq[2, [IDS.index(0), IDS.index(3)]])).sum())
    assert float(value.detach()) == pytest.approx(0.5 * (kl1 + kl2) / 4, rel=1e-5)  # alpha x mean KL; no CE term
