"""Connected components of a graph too large for one process: alternating large-star and small-star rounds
(Kiveris et al., "Connected Components in MapReduce and Beyond", SoCC 2014), each round one shuffle by node.

Edges are stored in both directions and partitioned by their source node, so a partition sees every neighbour of
its nodes. Large-star links each node's larger neighbours to the smallest node of its neighbourhood; small-star
links each node and its smaller neighbours to the smallest of those. Both keep connectivity and lower labels; when
a round pair changes nothing, every component is a star around its smallest node, which is its label.
O(log n) rounds; the edges in a partition are its only memory.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lmlab.data.ray_shuffle import as_list, gather, held_bytes, partition_of, remote, scatter

MAX_ROUNDS = 64


def _fingerprint(src: np.ndarray, dst: np.ndarray) -> tuple[int, int]:
    """(count, order-free hash) of a partition's edge set, to tell when a round changed nothing."""
    with np.errstate(over="ignore"):
        h = (src.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ (dst.astype(np.uint64) + np.uint64(0x632BE5AB))
        return len(src), int(h.sum(dtype=np.uint64))


def star_round(large: bool, parts: int, *pieces: tuple) -> Any:
    """One large- or small-star round over the edges of one partition; returns the next round's `parts` edge
    partitions, then (fingerprint of the input edges, bytes held)."""
    src, dst = gather(pieces, 2)
    pairs = np.unique(np.stack([src, dst], axis=1), axis=0) if len(src) else np.zeros((0, 2), np.int64)
    src, dst = pairs[:, 0], pairs[:, 1]  # sorted by source, then destination
    stats = (*_fingerprint(src, dst), held_bytes(src, dst))
    if len(src) == 0:
        return [*as_list(scatter(np.zeros(0, np.uint64), parts, src, dst), parts), stats]
    starts = np.flatnonzero(np.r_[True, src[1:] != src[:-1]])
    counts = np.diff(np.r_[starts, len(src)])
    u = src[starts]
    if large:  # every neighbour v > u joins min(u, neighbours of u)
        m = np.repeat(np.minimum(u, np.minimum.reduceat(dst, starts)), counts)
        sel = dst > src
        a, b = dst[sel], m[sel]
    else:  # u and every neighbour v < u join min(u, smaller neighbours of u)
        smaller = np.where(dst < src, dst, np.iinfo(np.int64).max)
        m_u = np.minimum(u, np.minimum.reduceat(smaller, starts))
        sel = dst < src
        a, b = np.r_[dst[sel], u], np.r_[np.repeat(m_u, counts)[sel], m_u]
    keep = a != b
    a, b = a[keep], b[keep]
    out_src, out_dst = np.r_[a, b], np.r_[b, a]
    return [*as_list(scatter(partition_of(out_src, parts), parts, out_src, out_dst), parts), stats]


def labels(groups: int, group_of: Any, *pieces: tuple) -> Any:
    """(node, label = smallest node of its component) for the nodes of one converged partition, split into
    `groups` by group_of(node)."""
    src, dst = gather(pieces, 2)
    if len(src) == 0:
        return scatter(np.zeros(0, np.int64), groups, src, dst)
    order = np.argsort(src, kind="stable")
    src, dst = src[order], dst[order]
    starts = np.flatnonzero(np.r_[True, src[1:] != src[:-1]])
    node = src[starts]
    label = np.minimum(node, np.minimum.reduceat(dst, starts))
    return scatter(group_of(node), groups, node, label)


def connected_components(
    edge_refs: list[list], parts: int, groups: int, group_of: Any
) -> tuple[list[list], dict[str, Any]]:
    """Components of the graph whose edges (both directions) arrive as edge_refs[task][partition] object refs.

    Returns refs[partition][group] of (node, label) columns and stats (rounds, largest partition in bytes).
    """
    import ray

    star = remote(star_round)
    refs = edge_refs
    previous, rounds, peak = None, 0, 0
    while rounds < MAX_ROUNDS:
        fingerprints = []
        for large in (True, False):
            outs = []
            for p in range(parts):
                task = star.options(num_returns=parts + 1).remote(large, parts, *[r[p] for r in refs])
                *edges, stats = task
                outs.append(edges)
                fingerprints.append(stats)
            refs = outs
            rounds += 1
        stats = ray.get(fingerprints)
        peak = max(peak, *(s[2] for s in stats))
        # the edge set entering this large-star round equals the one entering the last: nothing changes any more
        now = (sum(s[0] for s in stats[:parts]), sum(s[1] for s in stats[:parts]) % 2**64)
        if now == previous:
            break
        previous = now
    else:  # labels of an unconverged graph would split components: never hand them on
        raise RuntimeError(f"connected components did not converge in {MAX_ROUNDS} rounds")
    label = remote(labels)
    out = [as_list(label.options(num_returns=groups).remote(groups, group_of, *[r[p] for r in refs]), groups)
           for p in range(parts)]  # fmt: skip
    return out, {"rounds": rounds, "max_partition_bytes": peak}
