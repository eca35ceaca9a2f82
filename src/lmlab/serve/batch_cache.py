"""The shared KV cache of continuous batching: one row ("slot") per running sequence, one column per step.

Layout. Every running row writes the same column each decode step (the shared `length`, which is
what the model's KV-cache protocol expects), so a row's cached tokens are one contiguous run of
columns ending at `length`: row i holds real keys/values in [start[i], length) and masked holes
before. A new sequence's prompt K/V (prefilled on its own) are copied in right-aligned, ending
at `length`; the model derives positions from the attention mask (cumsum of real tokens), so
a row's positions start at 0 wherever its run begins and the holes cost nothing but compute.

Housekeeping, all copies of the live region only:
- a prompt longer than `length` shifts every live row to the right so the prompt fits;
- when every row has a dead prefix (min start > 0) that is at least half the columns, or the
  buffer is full, the dead prefix is dropped (compaction), so the columns attended over stay
  close to the longest live row instead of growing for as long as the batch is never empty;
- the buffer grows by doubling (up to the model's context) and drops back to its first size
  whenever the batch empties, so memory follows the longest live row, not the context;
- a finished row is replaced by the last row, so rows 0..rows-1 are always the live ones and a
  decode step runs on a view of them with no gathering.

Compiled decode steps (`static_view`) see the first b rows (b: the next batch-size bucket) and all
columns, as `generate`'s compiled steps see a StaticKVCache; the mask hides what is not a row's own.
For that the mask is kept zero from column `length` on, in every row, live or free; and each layer
has a tensor of its own (a compiled step writing into views of one shared buffer would copy it).
"""

from __future__ import annotations

import torch

from lmlab.generate.kv_cache import StaticKVCache, move_columns
from lmlab.model.transformer import Transformer


class SlotKVCache:
    """Keys/values, per layer (max_rows, H_kv, capacity, head_dim), plus each row's attention mask.
    Its buffers are inference tensors: use it under `torch.inference_mode()`, as the engine does."""

    def __init__(
        self,
        n_layer: int,
        max_rows: int,
        n_kv_head: int | list[int],
        head_dim: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        initial_len: int = 256,
    ) -> None:
        # n_kv_head: one count, or one per layer (a structurally pruned model)
        self.heads = n_kv_head if isinstance(n_kv_head, list) else [n_kv_head] * n_layer
        self.n_layer, self.max_rows, self.head_dim = n_layer, max_rows, head_dim
        self.max_len, self.dtype, self.device = max_len, dtype, device
        self.initial_len = min(initial_len, max_len)
        self.rows = 0  # live rows are 0..rows-1
        self.length = 0  # columns in use; the next decode step writes column `length`
        self.start = [0] * max_rows  # first real column of each live row
        self.shifts = self.compactions = self.grows = 0  # housekeeping counts, for tests and curiosity
        self._allocate(self.initial_len)

    @classmethod
    def for_model(cls, model: Transformer, max_rows: int, max_len: int, initial_len: int = 256) -> SlotKVCache:
        """A cache shaped for `model` with `max_rows` slots of up to `max_len` tokens."""
        cfg, p = model.cfg, next(model.parameters())
        heads = [cfg.heads(i)[1] for i in range(cfg.n_layer)]
        return cls(cfg.n_layer, max_rows, heads, cfg.head_dim, max_len, p.dtype, p.device, initial_len)

    @torch.inference_mode()
    def _allocate(self, capacity: int) -> None:
        # inference tensors always, wherever this runs: a compiled graph checks that its inputs are the
        # kind of tensor it was built for (generate's caches are inference tensors), and another kind
        # would compile it again
        shapes = [(self.max_rows, h, capacity, self.head_dim) for h in self.heads]
        self.k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for shape in shapes]
        self.v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for shape in shapes]
        self.mask = torch.zeros((self.max_rows, capacity), dtype=torch.long, device=self.device)
        self.capacity = capacity

    # --- the model's KV-cache protocol -------------------------------------------------------------

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a decode step's keys/values (rows, H_kv, T, hd) at column `length`; return all of them."""
        n, start, end = k.shape[0], self.length, self.length + k.shape[2]
        self.k[layer][:n, :, start:end] = k
        self.v[layer][:n, :, start:end] = v
        if layer == self.n_layer - 1:
            self.length = end
        return self.k[layer][:n, :, :end], self.v[layer][:n, :, :end]

    def move(self, src: list[int], dst: int) -> None:
        """Copy the entries at columns `src` to columns dst, dst + 1, ... in every row (a lone row's
        speculative round over a candidate tree: its accepted candidates, as `KVCache.move`)."""
        move_columns(self.k + self.v, src, dst)

    # --- slots ---------------------------------------------------------------------------------------

    def step_mask(self) -> torch.Tensor:
        """Open column `length` for every live row and return the mask (rows, length + 1) of the next step."""
        self.mask[: self.rows, self.length] = 1
        return self.mask[: self.rows, : self.length + 1]

    def static_view(self, rows: int) -> tuple[StaticKVCache, torch.Tensor]:
        """For a compiled decode step over the first `rows` rows (live ones, then free ones as padding):
        a StaticKVCache over views of this cache's buffers, writing column `length`, and the mask
        (rows, capacity). Column `length` is opened for every one of the rows (a free row attending to
        nothing would compute NaNs, which its keys/values would carry into the cache). Call
        `advance_static()` after the step."""
        self.mask[:rows, self.length] = 1
        view = StaticKVCache.over([k[:rows] for k in self.k], [v[:rows] for v in self.v], self.length)
        return view, self.mask[:rows]

    def advance_static(self) -> None:
        """A compiled step wrote column `length`."""
        self.length += 1

    def add_row(self, k: torch.Tensor, v: torch.Tensor) -> int:
        """Place a prefilled prompt's keys/values (n_layer, H_kv, P, hd) in a free row; return the row."""
        if self.rows >= self.max_rows:
            raise RuntimeError("no free slot")
        P = k[0].shape[1]
        self._compact_if(lambda s: s > 0 and self.length < P)  # dead columns first: less to shift
        if self.length < P:
            self._reserve(P)
            self._shift_right(P - self.length)
        row, L = self.rows, self.length
        for layer in range(self.n_layer):
            self.k[layer][row, :, L - P : L] = k[layer]
            self.v[layer][row, :, L - P : L] = v[layer]
        self.mask[row, : L - P] = 0
        self.mask[row, L - P : L] = 1
        self.start[row] = L - P
        self.rows += 1
        return row

    def row_kv(self, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A live row's keys/values, (n_layer, H_kv, n, hd) each (n: its tokens; a layer with fewer KV
        heads, in a structurally pruned model, padded with zeros to the most), copies."""
        start, H = self.start[row], max(self.heads)
        out = []
        for buffers in (self.k, self.v):
            t = torch.zeros(self.n_layer, H, self.length - start, self.head_dim, dtype=self.dtype, device=self.device)
            for layer, b in enumerate(buffers):
                t[layer, : b.shape[1]] = b[row, :, start : self.length]
            out.append(t)
        return out[0], out[1]

    def remove_row(self, row: int) -> None:
        """Free a row: the last live row moves into it, so live rows stay 0..rows-1."""
        last, L = self.rows - 1, self.length
        if row != last:
            for layer in range(self.n_layer):
                self.k[layer][row, :, :L] = self.k[layer][last, :, :L]
                self.v[layer][row, :, :L] = self.v[layer][last, :, :L]
            self.mask[row, :L] = self.mask[last, :L]
            self.start[row] = self.start[last]
        self.rows -= 1
        if self.rows == 0:
            self.length = 0
            if self.capacity > self.initial_len:  # let a one-off long request's memory go
                self._allocate(self.initial_len)
            else:
                self.mask.zero_()  # column 0 on is past `length` now

    def ensure_room(self, extra: int = 1) -> None:
        """Make room for `extra` more columns: compact a large dead prefix, else grow."""
        self._compact_if(lambda s: s > 0 and (self.length + extra > self.capacity or 2 * s >= self.length))
        if self.length + extra > self.capacity:
            self._reserve(self.length + extra)

    def solo(self) -> SlotKVCache:
        """With one live row: drop its dead prefix, so its tokens sit at columns 0..length-1 and the cache
        serves as a plain one-row KV cache (`length` may be set back) for speculative decoding. Call
        `settle()` after."""
        assert self.rows == 1, "solo() is for a lone row"
        self._compact_if(lambda s: s > 0)
        return self

    def settle(self) -> None:
        """After a solo row's forwards moved `length` (up, or back over rejected tokens): its mask opens
        columns 0..length-1 and every row's mask is zero from `length` on, as decode steps expect."""
        self.mask[0, : self.length] = 1
        self.mask[:, self.length :] = 0

    # --- housekeeping ---------------------------------------------------------------------------------

    def _compact_if(self, condition) -> None:
        if self.rows == 0:
            return
        s = min(self.start[: self.rows])
        if not condition(s):
            return
        n, L = self.rows, self.length
        for layer in range(self.n_layer):
            self.k[layer][:n, :, : L - s] = self.k[layer][:n, :, s:L].clone()
            self.v[layer][:n, :, : L - s] = self.v[layer][:n, :, s:L].clone()
        self.mask[:n, : L - s] = self.mask[:n, s:L].clone()
        self.mask[:, L - s : L] = 0  # past the new `length`
        for i in range(n):
            self.start[i] -= s
        self.length = L - s
        self.compactions += 1

    def _shift_right(self, d: int) -> None:
        n, L = self.rows, self.length
        if n:
            for layer in range(self.n_layer):
                self.k[layer][:n, :, d : d + L] = self.k[layer][:n, :, :L].clone()
                self.v[layer][:n, :, d : d + L] = self.v[layer][:n, :, :L].clone()
            self.mask[:n, d : d + L] = self.mask[:n, :L].clone()
            self.mask[:n, :d] = 0
            for i in range(n):
                self.start[i] += d
            self.shifts += 1
        self.length = L + d

    def _reserve(self, columns: int) -> None:
        if columns <= self.capacity:
            return
        if columns > self.max_len:
            raise RuntimeError(f"KV cache needs {columns} columns > max_len {self.max_len}")
        old_k, old_v, old_mask, n, L = self.k, self.v, self.mask, self.rows, self.length
        self._allocate(min(self.max_len, max(columns, 2 * self.capacity)))
        self.grows += 1
        for layer in range(self.n_layer):
            self.k[layer][:n, :, :L] = old_k[layer][:n, :, :L]
            self.v[layer][:n, :, :L] = old_v[layer][:n, :, :L]
        self.mask[:n, :L] = old_mask[:n, :L]

    # --- accounting -----------------------------------------------------------------------------------

    def used_tokens(self) -> int:
        """Real (unmasked) tokens held across live rows."""
        return sum(self.length - self.start[i] for i in range(self.rows))

    def capacity_tokens(self) -> int:
        """Token slots allocated: rows x columns."""
        return self.max_rows * self.capacity

    def nbytes(self) -> int:
        """Memory held by the key and value buffers."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
