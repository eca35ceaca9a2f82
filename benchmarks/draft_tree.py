"""Which candidate tree a draft wants: the rank of the target's greedy token among the draft's guesses,
position by position along held-out answers, and the tokens per round each tree shape would give.

For every position of the target's greedy answer (64 tokens) to each held-out prompt, the draft reads
the target's states of the sequence so far (as a round's catch-up does) and then drafts down the
target's own continuation for `--depth` tokens, recording at each depth the rank of the target's
token among its guesses. A round over a tree accepts the longest prefix of those ranks that is one of
its candidates (`DraftTree.paths`), so each shape's tokens per round follows without running it; the
rounds are laid end to end along the answer, as decoding takes them. (No timing here: what a round
costs is benchmarks/speculative_check.py's; the two together pick a tree. Confidence cuts are not
modelled: the chain rows are without one.)

    PYTHONPATH=src .venv/bin/python benchmarks/draft_tree.py --draft out/compress/eagle-int4
    PYTHONPATH=src .venv/bin/python benchmarks/draft_tree.py --draft PATH --trees "0 00 000 0000" "0 1 2 00 01 000"
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch

from lmlab.generate import GenerationConfig, generate
from lmlab.generate.draft_tree import DEFAULT_TREE, DraftTree
from lmlab.generate.kv_cache import KVCache
from lmlab.generate.speculative import load_draft
from lmlab.model.checkpoint import load_pretrained

sys.path.insert(0, str(Path(__file__).parent))
from compress import chat_prompts  # held-out chat prompts
from serve import TOPICS  # the serving benchmark's prompts

TREES = ["0 00 000 0000", DEFAULT_TREE, "0 1 2 00 01 000 0000", "0 1 2 00 01 10 000 0000", "0 1 2 3 00 01 10 000"]


@torch.inference_mode()
def ranks(target, draft, prompt: list[int], answer: list[int], depth: int) -> list[list[int]]:
    """Per answer position n (with `depth` tokens after it), the rank of each of the target's next
    `depth` tokens among an EAGLE draft's guesses, drafting down the target's own continuation."""
    seq = prompt + answer
    states = target.hidden_states(torch.tensor([seq]))  # (1, T, d)
    head = draft.cfg.head_tokens
    where = {t: i for i, t in enumerate(head)} if head is not None else None
    out = []
    for n in range(len(prompt), len(seq) - depth):
        cache = KVCache.for_model(draft, 1, n + depth)
        h = draft.hidden_states(torch.tensor([seq[1 : n + 1]]), kv_cache=cache, features=states[:, :n])[:, -1:]
        row = []
        for j in range(1, depth + 1):
            order = draft.lm_head(h)[0, -1].argsort(descending=True)
            true = seq[n + j] if where is None else where.get(seq[n + j])
            row.append(int((order == true).nonzero()[0]) if true is not None else 10**6)
            h = draft.hidden_states(torch.tensor([[seq[n + j]]]), kv_cache=cache, features=h)
        out.append(row)
    return out


def tokens_per_round(per_answer: list[list[list[int]]], tree: DraftTree) -> float:
    """Mean tokens per round (accepted candidates + the target's own) with rounds laid end to end."""
    paths, tokens, rounds = set(tree.paths), 0, 0
    for rows in per_answer:
        n = 0
        while n < len(rows):
            r = rows[n]
            a = 0
            while a < len(r) and tuple(r[: a + 1]) in paths:
                a += 1
            tokens, rounds, n = tokens + a + 1, rounds + 1, n + a + 1
    return tokens / max(rounds, 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--draft", required=True, help="an EAGLE draft checkpoint")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--depth", type=int, default=7)
    ap.add_argument("--trees", nargs="+", default=TREES)
    args = ap.parse_args()
    target, tok = load_pretrained(args.model, dequantize=True)
    target.eval()
    draft = load_draft(args.draft, target).eval()
    if not draft.cfg.eagle:
        print("this measures EAGLE drafts (they read the target's states); a standalone draft needs its own reads")
        return 2
    trees = [DraftTree.parse(t) for t in args.trees]
    cfg = GenerationConfig(max_new_tokens=args.new_tokens, stop_token_ids=[])
    print(f"{args.model} (float32), draft {args.draft}: {args.prompts} prompts per set x {args.new_tokens} tokens")
    for name in ("tweets-en", "chatterbot", "topics"):
        if name == "topics":
            asks = [f"Write a short paragraph about {t} (request {i})." for i, t in enumerate(TOPICS.split())]
            prompts = [tok.apply_chat_template([{"role": "user", "content": a}], add_generation_prompt=True,
                                               tokenize=True) for a in asks[: args.prompts]]  # fmt: skip
        else:
            prompts = chat_prompts(tok, args.prompts, name)
        per_answer = [ranks(target, draft, p, generate(target, tok, p, cfg)[0].token_ids, args.depth) for p in prompts]
        first = Counter(min(r[0], 3) for rows in per_answer for r in rows)
        total = sum(first.values())
        shares = ", ".join(f"{'rank ' + str(k) if k < 3 else 'lower'} {first[k] / total:.0%}" for k in range(4))
        print(f"{name}: the target's next token among the draft's guesses: {shares}")
        for tree in trees:
            print(
                f"  {tree!s:<28} {len(tree):>2} candidates: {tokens_per_round(per_answer, tree):.2f} tokens per round"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
