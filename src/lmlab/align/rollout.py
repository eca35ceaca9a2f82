"""Online data for PPO and GRPO: the Trainer's `get_batch(step)` samples completions with the policy itself.

Rollout i is generated at step i * U from the weights of that step (U = epochs x minibatches updates per
rollout) with a sampling seed fixed by (seed, i), so it is a function of the run, not of the wall clock.
The Trainer then takes U minibatches from it: each epoch a seeded permutation of its rows, cut into
global batches. The current rollout travels in the checkpoint's data state, so a run resumed mid-rollout
(after `kill -9`) continues on exactly the same rows.
"""

from __future__ import annotations

import numpy as np
import torch

from lmlab.align.data import PromptRecord, epoch_order, render_prompt
from lmlab.align.metrics import StepMetrics
from lmlab.errors import LmlabError
from lmlab.generate.config import GenerationConfig
from lmlab.generate.decode import generate_ids, left_pad, stop_token_ids
from lmlab.tokenizer.tokenizer import Tokenizer


class Rollouts:
    """Base of the online data objects; subclasses fill `collect(index) -> dict of (R, ...) tensors`."""

    def __init__(
        self,
        prompts: list[PromptRecord],
        tokenizer: Tokenizer,
        rows_per_step: int,
        *,
        completions_per_prompt: int = 1,
        minibatches: int = 1,
        epochs: int = 1,
        generation: GenerationConfig | None = None,
        seed: int = 0,
        metrics: StepMetrics | None = None,
    ) -> None:
        self.rows = rows_per_step * minibatches  # completions per rollout
        if self.rows % completions_per_prompt:
            raise LmlabError(f"a rollout of {self.rows} completions (rows per step x minibatches) is not a whole "
                             f"number of groups of {completions_per_prompt}", field="align.num_generations",
                             hint="make micro_batch_size x grad_accum x minibatches a multiple of it")  # fmt: skip
        self.prompts, self.tokenizer, self.rows_per_step = prompts, tokenizer, rows_per_step
        self.G, self.minibatches, self.epochs, self.seed = completions_per_prompt, minibatches, epochs, seed
        self.generation = generation or GenerationConfig(max_new_tokens=64, temperature=1.0)
        self.metrics = metrics if metrics is not None else StepMetrics()
        self.policy: torch.nn.Module | None = None  # set once the Trainer holds the model (set_policy)
        self.prompt_ids = [render_prompt(tokenizer, p.messages) for p in prompts]
        self.index: int = -1  # which rollout `buffer` holds
        self.buffer: dict[str, torch.Tensor] = {}

    @property
    def updates_per_rollout(self) -> int:
        """Optimizer steps taken on one rollout."""
        return self.epochs * self.minibatches

    def set_policy(self, model: torch.nn.Module) -> None:
        """The (unwrapped) model that generates: the Trainer's `raw` model."""
        self.policy = model

    # -- generation ---------------------------------------------------------------------------
    def prompt_indices(self, index: int) -> list[int]:
        """The prompts of rollout `index`: the epochs of a seeded shuffle, as many as the rollout's groups."""
        return epoch_order(len(self.prompts), self.rows // self.G, index, self.seed)

    @torch.no_grad()
    def sample(self, model: torch.nn.Module, index: int, prompt_idx: list[int]) -> dict[str, torch.Tensor]:
        """G sampled completions of each prompt: input_ids / attention_mask / completion_mask (R, P + C) with
        the prompts left-padded to P columns and the completions from column P on (right-padded)."""
        tok = self.tokenizer
        cfg = self.generation.replace(num_return_sequences=self.G, seed=self.seed * 1_000_003 + index)
        eos = stop_token_ids(model, tok, cfg)
        pad = tok.pad_token_id if tok.pad_token_id is not None else (eos[0] if eos else 0)
        device = next(model.parameters()).device
        ids, mask = left_pad([self.prompt_ids[i] for i in prompt_idx], pad, device)
        was = model.training
        model.eval()
        try:
            out = generate_ids(model, ids, mask, cfg, eos, pad).clone()  # (R, P + C)
        finally:
            model.train(was)
        P = ids.shape[1]
        new = out[:, P:]
        # a completion runs up to and including its first stop token
        stop = torch.isin(new, torch.tensor(eos, device=device)) if eos else torch.zeros_like(new, dtype=torch.bool)
        after = (stop.long().cumsum(1) - stop.long()) > 0  # tokens after the first stop
        comp = (~after).long()
        if new.shape[1] == 0:
            raise LmlabError("generation produced no tokens", field="align.max_new_tokens")
        return {
            "input_ids": out,
            "attention_mask": torch.cat([mask.repeat_interleave(self.G, 0), comp], 1),
            "completion_mask": torch.cat([torch.zeros_like(mask).repeat_interleave(self.G, 0), comp], 1),
            "finished": stop.any(1),
        }

    def texts(self, batch: dict[str, torch.Tensor]) -> list[str]:
        """The completions as text (special tokens dropped)."""
        ids, comp = batch["input_ids"], batch["completion_mask"].bool()
        return [self.tokenizer.decode(row[m].tolist(), skip_special_tokens=True) for row, m in zip(ids, comp)]

    def collect(self, index: int) -> dict[str, torch.Tensor]:
        """Rollout `index`: (R, ...) tensors every minibatch slices its rows from."""
        raise NotImplementedError

    # -- the Trainer's interface --------------------------------------------------------------
    def get_batch(self, step: int) -> dict[str, torch.Tensor]:
        """The minibatch of step `step` (generating its rollout first when it starts one)."""
        if self.policy is None:
            raise LmlabError("the rollout data has no policy to sample from", hint="call set_policy(trainer.raw)")
        index, k = divmod(step, self.updates_per_rollout)
        if index != self.index:
            self.buffer, self.index = self.collect(index), index
        epoch, mb = divmod(k, self.minibatches)
        order = np.random.default_rng([self.seed, index, epoch]).permutation(self.rows)
        rows = torch.from_numpy(order[mb * self.rows_per_step : (mb + 1) * self.rows_per_step])
        batch = {k: v[rows.to(v.device)] for k, v in self.buffer.items() if v.dim() > 0}
        return self.finish_batch(batch)

    def finish_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A hook to add per-minibatch values (a token normaliser)."""
        return batch

    def state_dict(self) -> dict:
        """The rollout in progress (tensors), so a resumed run continues on the same rows."""
        return {"index": self.index, "buffer": {k: v.cpu() for k, v in self.buffer.items()}, "seed": self.seed,
                "rows": self.rows}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        """Restore the rollout in progress."""
        for key in ("seed", "rows"):
            if key in state and state[key] != getattr(self, key):
                raise LmlabError(f"resume state has {key}={state[key]!r}, this run has {getattr(self, key)!r}",
                                 field=key, hint="resume with the same seed and batch sizes")  # fmt: skip
        self.index = int(state.get("index", -1))
        device = next(self.policy.parameters()).device if self.policy is not None else "cpu"
        self.buffer = {k: v.to(device) for k, v in state.get("buffer", {}).items()}
