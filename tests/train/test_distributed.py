"""DDP (and FSDP2) under torchrun with gloo on CPU follow the single-process loss trajectory."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import json, pathlib, sys
    sys.path.insert(0, {root!r})
    import torch
    from lmlab.train import Trainer
    from tests.train.helpers import RandomTokens, config, tiny_model

    torch.set_num_threads(1)
    world = {world}
    cfg = config(pathlib.Path({out!r}), max_steps={steps}, micro_batch_size=8 // world, eval_every=1000,
                 strategy={strategy!r}, checkpoint_every=5)
    trainer = Trainer(tiny_model(), RandomTokens(8), cfg, progress=False, device="cpu")
    trainer.fit(resume={resume})
    if trainer.dist.main:
        losses = [r["loss"] for r in trainer.records() if "loss" in r]
        pathlib.Path({out!r}, "losses.json").write_text(json.dumps(losses))
    from lmlab.train.distributed import teardown
    teardown()  # what every lmlab command does at its end
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(
    tmp_path, root, world: int, strategy: str, steps: int = 5, resume: bool = False, name: str = ""
) -> list[float]:
    out = tmp_path / (name or f"{strategy}-{world}")
    script = tmp_path / f"run_{name or strategy}_{world}.py"
    script.write_text(
        SCRIPT.format(root=str(root), out=str(out), world=world, strategy=strategy, steps=steps, resume=repr(resume))
    )
    if world == 1:
        cmd = [sys.executable, str(script)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(script)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "destroy_process_group" not in r.stderr  # torch warns when a process group is left open
    return json.loads((out / "losses.json").read_text())


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_follow_one(tmp_path, request, strategy):
    root = request.config.rootpath
    one = _run(tmp_path, root, 1, "ddp")
    two = _run(tmp_path, root, 2, strategy)
    assert len(one) == len(two) == 5
    assert max(abs(a - b) for a, b in zip(one, two)) <= 1e-4, (one, two)
    assert one[-1] < one[0]  # and it learns


def test_checkpoint_from_two_processes_resumes_on_one(tmp_path, request):
    root = request.config.rootpath
    straight = _run(tmp_path, root, 1, "ddp", steps=8, name="straight")
    _run(tmp_path, root, 2, "ddp", steps=8, name="two")  # writes checkpoints at steps 5 and 8
    step5 = str(tmp_path / "two" / "run" / "checkpoints" / "step-000005")
    resumed = _run(tmp_path, root, 1, "ddp", steps=8, resume=step5, name="two")  # steps 6-8 on one process
    assert len(resumed) == 11  # the log: 8 steps from two processes, then 6-8 again from one
    assert max(abs(a - b) for a, b in zip(straight[5:], resumed[8:])) <= 1e-4, (straight, resumed)
