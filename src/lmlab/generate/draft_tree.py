"""A token tree for speculative decoding: several of the draft's guesses checked in one target forward.

A chain drafts one token per position and loses the rest of the round at the first miss. Where the
draft's best guess misses, its second or third often hits (on held-out chat prompts SmolLM2's EAGLE
draft ranks the target's next token first about half the time and second or third another fifth), so
a round can check a small tree of candidates (Medusa, Cai et al. 2024; EAGLE, Li et al. 2024):

    paths (0,) (1,) (2,) (0, 0) (0, 1) (0, 0, 0)      the draft's best three first tokens; after the
                                                      best, its best two; after those, its best one
    ids   [newest token] a0 a1 a2 b00 b01 c000        one forward over the sequence's newest token
                                                      and the 6 candidates

Each candidate sees the cached sequence and its own ancestors only (`attention_rows`), at the position
its depth gives it, so its logits are exactly what the target would compute had the sequence gone down
that branch. Greedy verification (`walk`) follows the target's argmax from the root through the
children that match it: the longest matching path is accepted, plus the target's own next token, so the
output is the target's greedy output whatever the tree. Where a check's extra rows cost next to
nothing (a GPU) the extra candidates are nearly free; on 2 CPU cores a 7-row check costs about a
5-row one with float32 weights, but the tree's rounds measured no faster than the chain's
(docs/compress.md), so there the default stays the chain (`speculative.default_tree`).

The shape is static (fixed per round, as Medusa's and EAGLE-1's trees), so compiled rounds keep one
graph per call; the draft runs once per depth, over that depth's candidates that have children.
Sampled rounds use the same shapes with ranks read as draw order: a node's children are drawn from the
draft without replacement, and verified by recursive rejection sampling (speculative.py).
`DynamicTree` instead picks each round's candidates by the draft's path probabilities (EAGLE-2), for
greedy rounds, with the same widths every round.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from lmlab.errors import LmlabError

DEFAULT_TREE = "0 1 2 00 01 000"
"""Six candidates (seven rows in a check): the draft's top three first tokens, its top two after the
best, and its best third token. On held-out chat prompts it gives about a fifth more tokens per round
than a chain of four (benchmarks/draft_tree.py)."""


@dataclass(frozen=True)
class DraftTree:
    """A static candidate tree: each candidate as the ranks of its tokens among the draft's guesses,
    from the root down: (0,) is the draft's best next token, (1,) its second, (0, 2) its third guess
    after the best (sampling: the first, second, ... token drawn at that node). Every candidate's
    parent path must be in the tree too."""

    paths: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        if not self.paths:
            raise LmlabError("a draft tree needs at least one candidate", field="tree")
        seen = set()
        for p in self.paths:
            if not p or any(not isinstance(r, int) or r < 0 for r in p):
                raise LmlabError(f"a tree candidate is a non-empty list of ranks >= 0, not {p!r}", field="tree")
            if p in seen:
                raise LmlabError(f"the tree lists candidate {_show(p)} twice", field="tree")
            seen.add(p)
        for p in self.paths:
            if len(p) > 1 and p[:-1] not in seen:
                raise LmlabError(f"tree candidate {_show(p)} has no parent {_show(p[:-1])} in the tree", field="tree")
        # candidates in breadth-first order: a parent always comes before its children
        object.__setattr__(self, "paths", tuple(sorted(self.paths, key=lambda p: (len(p), p))))

    @classmethod
    def parse(cls, spec: str | DraftTree) -> DraftTree:
        """A tree from its text form: candidates separated by spaces, each its ranks as digits
        ("0 1 2 00 01 000"), or by commas within a candidate where a rank has two digits ("0 10 0,12")."""
        if isinstance(spec, DraftTree):
            return spec
        paths = []
        for word in spec.split():
            parts = word.split(",") if "," in word else list(word)
            if not all(x.isdigit() for x in parts):
                raise LmlabError(f"{word!r} in draft tree {spec!r}: want ranks as digits, e.g. 0 1 00 01",
                                 field="tree")  # fmt: skip
            paths.append(tuple(int(x) for x in parts))
        return cls(tuple(paths))

    def __len__(self) -> int:
        return len(self.paths)

    def __str__(self) -> str:
        return " ".join(_show(p) for p in self.paths)

    @functools.cached_property
    def depth(self) -> int:
        """The longest candidate path: the most draft tokens a round can accept."""
        return max(map(len, self.paths))

    @functools.cached_property
    def parents(self) -> list[int]:
        """Each candidate's parent's index in `paths` (-1: a child of the root, the newest token)."""
        index = {p: i for i, p in enumerate(self.paths)}
        return [index[p[:-1]] if len(p) > 1 else -1 for p in self.paths]

    @functools.cached_property
    def children(self) -> dict[int, list[int]]:
        """Candidate index (-1: the root) -> its children's indices."""
        out: dict[int, list[int]] = {}
        for i, parent in enumerate(self.parents):
            out.setdefault(parent, []).append(i)
        return out

    @functools.cached_property
    def levels(self) -> list[list[int]]:
        """Per depth after the first, the candidates one level up that have children: the rows of the
        draft's call at that depth (the first depth's guesses come from the draft's catch-up)."""
        return [[i for i, p in enumerate(self.paths) if len(p) == d and i in self.children]
                for d in range(1, self.depth)]  # fmt: skip

    def ancestors(self, i: int) -> list[int]:
        """Candidate i's ancestors' indices, root side first, then i itself."""
        out = []
        while i >= 0:
            out.append(i)
            i = self.parents[i]
        return out[::-1]

    @functools.cached_property
    def draft_widths(self) -> list[int]:
        """The widths of the draft's calls a round makes over the tree (one per level)."""
        return sorted({len(level) for level in self.levels})

    @functools.cached_property
    def entries(self) -> int:
        """The most cache entries a round writes past the sequence: its check's (the newest token and
        every candidate) or the draft's calls' (never more)."""
        return len(self.paths) + 1

    def wanted(self, node: int) -> int:
        """How many guesses node `node` (-1: the root) needs: one more than its children's top rank."""
        return 1 + max(self.paths[c][-1] for c in self.children[node])

    @functools.cached_property
    def check_rows(self) -> torch.Tensor:
        """(1 + n, 1 + n) bool: which of a check's tokens each sees: the sequence's newest token, then
        the n candidates, each seeing the newest token, its ancestors and itself (the same every round)."""
        n = len(self.paths)
        vis = torch.zeros(1 + n, 1 + n, dtype=torch.bool)
        vis[:, 0] = True
        for i in range(n):
            vis[1 + i, [1 + a for a in self.ancestors(i)]] = True
        return vis

    @functools.cached_property
    def level_rows(self) -> list[torch.Tensor]:
        """Per draft call (`levels`), which of the tree's draft cache entries so far each of its rows
        sees, (T, R): its expanded ancestors' entries, in the order the calls wrote them, and its own."""
        out, written = [], []
        for level in self.levels:
            paths = [self.paths[i] for i in level]
            out.append(ancestor_rows(written, paths))
            written += paths
        return out

    def walk(self, roots: int, best: list[int], tokens: list[int]) -> tuple[list[int], list[int]]:
        """Greedy verification: (accepted candidates' indices, new tokens). `best` is the target's
        argmax at each check row (`roots` rows of the sequence, then one per candidate); the path goes
        down while a child's token is the target's choice at its parent, and ends with the target's
        own choice after the last accepted candidate."""
        path: list[int] = []
        node, row = -1, roots - 1
        while True:
            want = best[row]
            child = next((c for c in self.children.get(node, ()) if tokens[c] == want), None)
            if child is None:
                return path, [tokens[c] for c in path] + [want]
            path.append(child)
            node, row = child, roots + child


@functools.lru_cache(maxsize=256)
def _tree_of(paths: tuple[tuple[int, ...], ...]) -> DraftTree:
    # a dynamic tree's rounds pick from a few shapes over and over: each builds its masks once
    return DraftTree(paths)


@dataclass(frozen=True)
class DynamicTree:
    """A candidate tree chosen every round by the draft's confidence (EAGLE-2, Li et al. 2024): from
    the root, `depth` - 1 times, the `topk` likeliest candidates of the newest level (by the product of
    the draft's probabilities along their paths) are run through the draft and each gets its `topk`
    best next tokens; of everything drafted, the `size` likeliest candidates are checked. A path's
    probability is never above its parent's, so the chosen ones always include their ancestors.

    Where the draft is sure it drafts deep, where it is torn it drafts wide, with the same check
    width and draft calls every round (so compiled rounds keep their graphs: the draft's calls are
    `topk` rows each, the check `size` + 1)."""

    topk: int = 3
    depth: int = 3
    size: int = 6

    def __post_init__(self) -> None:
        for name in ("topk", "depth", "size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise LmlabError(f"a dynamic tree's {name} is an integer >= 1, not {value!r}", field="tree")
        if self.size > self.drafted:
            raise LmlabError(f"a dynamic tree of top {self.topk} over depth {self.depth} drafts {self.drafted} "
                             f"candidates: it cannot check {self.size}", field="tree")  # fmt: skip

    @property
    def drafted(self) -> int:
        """How many candidates a round drafts: topk at the first level, topk * topk at each after."""
        return self.topk + (self.depth - 1) * self.topk * self.topk

    def __len__(self) -> int:
        return self.size

    def __str__(self) -> str:
        return f"dynamic:{self.topk},{self.depth},{self.size}"

    @property
    def draft_widths(self) -> list[int]:
        return [self.topk] if self.depth > 1 else []

    @property
    def entries(self) -> int:
        """The most cache entries a round writes past the sequence: the check's, or the draft's."""
        return max(self.size + 1, (self.depth - 1) * self.topk)

    def select(self, scores: dict[tuple[int, ...], float]) -> DraftTree:
        """The `size` candidates with the highest scores (log-probabilities of their paths; ties: the
        shallower first, so a parent precedes its children), as a tree."""
        chosen: set[tuple[int, ...]] = set()
        for p in sorted(scores, key=lambda p: (-scores[p], len(p), p)):
            if len(p) == 1 or p[:-1] in chosen:  # (a NaN score could order a child first: it waits)
                chosen.add(p)
                if len(chosen) == self.size:
                    break
        return _tree_of(tuple(sorted(chosen, key=lambda p: (len(p), p))))


def parse_tree(spec: str | DraftTree | DynamicTree) -> DraftTree | DynamicTree:
    """A candidate tree from its text form: a static tree's rank paths ("0 1 2 00 01 000",
    `DraftTree.parse`), or "dynamic" (`DynamicTree`'s defaults) or "dynamic:TOPK,DEPTH,SIZE"."""
    if isinstance(spec, (DraftTree, DynamicTree)):
        return spec
    if not spec.startswith("dynamic"):
        return DraftTree.parse(spec)
    rest = spec[len("dynamic") :]
    if not rest:
        return DynamicTree()
    parts = rest[1:].split(",") if rest.startswith(":") else []
    if len(parts) != 3 or not all(x.strip().isdigit() for x in parts):
        raise LmlabError(f"draft tree {spec!r}: want dynamic or dynamic:TOPK,DEPTH,SIZE, e.g. dynamic:3,3,6",
                         field="tree")  # fmt: skip
    return DynamicTree(*(int(x) for x in parts))


def ancestor_rows(written: list[tuple[int, ...]], level: list[tuple[int, ...]]) -> torch.Tensor:
    """(T, R) bool for a draft call over the candidates `level` (T paths) after the tree's draft cache
    entries `written` (in the order the earlier calls wrote them): each row sees its ancestors among
    those and its own entry, R = len(written) + T."""
    rows = torch.zeros(len(level), len(written) + len(level), dtype=torch.bool)
    for j, p in enumerate(level):
        rows[j, [i for i, q in enumerate(written) if p[: len(q)] == q]] = True
        rows[j, len(written) + j] = True
    return rows


def _show(p: tuple[int, ...]) -> str:
    return ",".join(map(str, p)) if any(r > 9 for r in p) else "".join(map(str, p))


def attention_rows(prefix: int, region: torch.Tensor, columns: int, width: int) -> torch.Tensor:
    """A (1, 1, width, columns) boolean tree mask: every query sees the `prefix` cached columns, then
    `region` (T, R) says which of the next R columns each of the T queries sees; padding rows (up to
    `width`) see all of those (no row sees nothing, which would give NaN), and no real row sees the
    columns after the region (where padding writes)."""
    T, R = region.shape
    mask = torch.zeros(width, columns, dtype=torch.bool)
    mask[:, :prefix] = True
    mask[:T, prefix : prefix + R] = region
    mask[T:, prefix : prefix + R] = True
    return mask[None, None]
