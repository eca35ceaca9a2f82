"""How often EAGLE drafts' first guesses are the target's next token, teacher-forced on the target's own
greedy answers: on answers the drafts were trained on and on held-out ones (`compress.eagle_agreement`:
"first" reads the target's states, "unrolled" the draft's own, as from its second drafted token).

    PYTHONPATH=src python benchmarks/eagle_agreement.py --eagle out/compress/eagle2-int4 out/compress/eagle3-int4 \\
        --answers out/compress/eagle3/teacher_answers.jsonl --split 1704
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from compress import MODEL, chat_prompts, eagle_agreement
from lmlab.generate import GenerationConfig, generate
from lmlab.model.checkpoint import load_pretrained


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--eagle", type=Path, nargs="+", default=[Path("out/compress/eagle3-int4")])
    p.add_argument("--answers", type=Path, default=Path("out/compress/eagle3/teacher_answers.jsonl"),
                   help="the drafts' training answers (lmlab distill's OUT/teacher_answers.jsonl)")  # fmt: skip
    p.add_argument("--split", type=int, default=1704, help="answers before this index and from it on are sampled apart")
    p.add_argument("--samples", type=int, default=40, help="training answers sampled from each part")
    p.add_argument("--held-out", type=int, nargs=2, default=[30, 12], help="held-out tweets, chatterbot prompts")
    args = p.parse_args()
    if missing := [str(x) for x in [*args.eagle, args.answers] if not x.exists()]:
        print(f"not found: {', '.join(missing)} (recipes/compress/eagle-smollm2.yaml makes them); skipped")
        return
    target, tok = load_pretrained(MODEL, dequantize="auto")  # as lmlab generate runs it
    drafts = {x.name: load_pretrained(x)[0].eval() for x in args.eagle}
    records = [json.loads(line) for line in args.answers.read_text(encoding="utf-8").splitlines()]
    rng = random.Random(0)

    def stored(recs: list[dict]) -> tuple[list[list[int]], list[list[int]]]:
        prompts, answers = [], []
        for r in recs:
            ids = tok.apply_chat_template(r["messages"][:1], add_generation_prompt=True, tokenize=True)
            prompts.append(ids)
            answers.append(tok.apply_chat_template(r["messages"], tokenize=True)[len(ids) :])
        return prompts, answers

    def answered(prompts: list[list[int]]) -> tuple[list[list[int]], list[list[int]]]:
        cfg = GenerationConfig(max_new_tokens=128)
        return prompts, [generate(target, tok, q, cfg)[0].token_ids for q in prompts]

    head, tail = records[: args.split], records[args.split :]
    sets = {
        f"{args.samples} training answers before {args.split}": stored(rng.sample(head, min(args.samples, len(head))))
    }
    if tail:
        sets[f"{args.samples} training answers from {args.split}"] = stored(
            rng.sample(tail, min(args.samples, len(tail)))
        )
    sets[f"{args.held_out[0]} held-out tweets"] = answered(chat_prompts(tok, args.held_out[0], "tweets-en"))
    sets[f"{args.held_out[1]} held-out chatterbot prompts"] = answered(chat_prompts(tok, args.held_out[1]))
    for name, (prompts, answers) in sets.items():
        print(name, {d: eagle_agreement(target, m, prompts, answers) for d, m in drafts.items()}, flush=True)


if __name__ == "__main__":
    main()
