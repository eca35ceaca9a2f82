"""The seed's remedies each change training the way they claim: FGM/PGD, class weights, label smoothing, freezing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import log_loss

from lmlab.errors import LmlabError
from lmlab.finetune.adversarial import adversarial_loss
from lmlab.finetune.freeze import freeze
from lmlab.finetune.objectives import classification_loss
from lmlab.model import ModelConfig, Transformer
from lmlab.train.config import TrainConfig
from lmlab.train.trainer import Trainer


def _classifier(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig.from_preset("llama-tiny", head="seq_cls", num_labels=3, pad_token_id=0)).eval()


def _batch(seed: int = 1, rows: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 512, (rows, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask,
            "labels": torch.randint(0, 3, (rows,), generator=g)}  # fmt: skip


def _manual_perturbed_loss(model, batch, delta):
    handle = model.embed.register_forward_hook(lambda m, i, out: out + delta)
    try:
        return classification_loss(model, batch)
    finally:
        handle.remove()


def _embedding_grad(model, batch):
    seen = {}

    def keep(m, i, out):
        seen["e"] = out
        return out

    handle = model.embed.register_forward_hook(keep)
    loss = classification_loss(model, batch)
    handle.remove()
    return torch.autograd.grad(loss, seen["e"])[0]


def _unit(g):
    return g / g.flatten(1).norm(dim=1).view(-1, 1, 1)


def test_fgm_adds_the_loss_at_the_worst_case_perturbation():
    model, batch = _classifier(), _batch()
    clean = classification_loss(model, batch)
    g = _embedding_grad(model, batch)
    want_adv = _manual_perturbed_loss(model, batch, 0.5 * _unit(g))
    got = adversarial_loss(classification_loss, "fgm", epsilon=0.5)(model, batch)
    torch.testing.assert_close(got, clean + want_adv, atol=1e-6, rtol=1e-6)
    assert want_adv > clean  # the gradient direction really raises the loss
    # the parameter gradient is the sum of both gradients, not the clean one alone
    model.zero_grad()
    got.backward()
    fgm_grad = model.classifier.weight.grad.clone()
    model.zero_grad()
    clean_only = classification_loss(model, batch)
    clean_only.backward()
    assert (fgm_grad - model.classifier.weight.grad).abs().max() > 1e-6


def test_pgd_stays_in_the_ball_and_one_step_equals_fgm():
    model, batch = _classifier(), _batch()
    one_step = adversarial_loss(classification_loss, "pgd", epsilon=1.0, alpha=0.3, steps=1)(model, batch)
    fgm = adversarial_loss(classification_loss, "fgm", epsilon=0.3)(model, batch)
    torch.testing.assert_close(one_step, fgm, atol=1e-6, rtol=1e-6)
    clean = classification_loss(model, batch)
    pgd = adversarial_loss(classification_loss, "pgd", epsilon=0.5, alpha=0.3, steps=3)(model, batch)
    assert pgd - clean > fgm - clean - 1e-3 or pgd > 2 * clean  # several ascent steps do at least about as well
    with pytest.raises(LmlabError, match="fgm or pgd"):
        adversarial_loss(classification_loss, "nope")


def test_class_weights_match_scikit_learn_weighted_log_loss():
    model, batch = _classifier(), _batch(rows=8)
    weights = torch.tensor([0.5, 1.0, 3.0])
    with torch.no_grad():
        probs = F.softmax(model(batch["input_ids"], attention_mask=batch["attention_mask"]).double(), -1).numpy()
        got = classification_loss(model, batch, class_weights=weights).item()
        plain = classification_loss(model, batch).item()
    y = batch["labels"].numpy()
    want = log_loss(y, probs, sample_weight=weights.numpy()[y], labels=[0, 1, 2])
    assert abs(got - want) <= 1e-5
    assert abs(got - plain) > 1e-4  # weights really change the loss


def test_label_smoothing_is_the_mix_of_cross_entropy_and_uniform():
    model, batch = _classifier(), _batch()
    with torch.no_grad():
        logp = F.log_softmax(model(batch["input_ids"], attention_mask=batch["attention_mask"]), -1)
        got = classification_loss(model, batch, label_smoothing=0.2).item()
    nll = -logp.gather(1, batch["labels"][:, None]).mean().item()
    uniform = -logp.mean(-1).mean().item()
    assert abs(got - (0.8 * nll + 0.2 * uniform)) <= 1e-5
    assert abs(got - nll) > 1e-4


class _Data:
    def __init__(self, batch):
        self.batch = batch

    def get_batch(self, step):
        return self.batch


def test_frozen_parameters_are_bit_identical_after_training(tmp_path):
    model = _classifier()
    frozen = freeze(model, ["embeddings", "layers.0"])
    assert "embed.weight" in frozen and all(n.startswith(("embed.", "layers.0.")) for n in frozen)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = TrainConfig(out_dir=str(tmp_path), max_steps=3, micro_batch_size=6, warmup_steps=0, lr=1e-2,
                      eval_every=100, log_every=1, weight_decay=0.1)  # fmt: skip
    trainer = Trainer(model, _Data(_batch()), cfg, loss_fn=classification_loss, progress=False)
    trainer.fit()
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, before[name]), name
        else:
            assert not torch.equal(p, before[name]), f"{name} did not train"
    in_opt = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert all(id(p) not in in_opt for n, p in model.named_parameters() if n in frozen)
    with pytest.raises(LmlabError, match="layers 0-1"):
        freeze(_classifier(), ["layers.0-5"])
    np.testing.assert_equal(len(frozen) > 0, True)
