"""Bad checkpoints get one clear message naming the file, tensor or field; pickles are refused."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import lmlab
from lmlab.errors import LmlabError
from tests.conftest import hf_tiny


@pytest.fixture
def tiny_dir(tmp_path):
    hf_tiny("llama").save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def test_unsupported_model_type_lists_supported(tiny_dir):
    cfg = json.loads((tiny_dir / "config.json").read_text())
    cfg["model_type"] = "falcon"
    (tiny_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LmlabError) as e:
        lmlab.load_pretrained(tiny_dir)
    msg = str(e.value)
    assert "config.json" in msg and "model_type" in msg and "'falcon'" in msg
    for supported in ("llama", "mistral", "qwen2", "gpt2", "bert"):
        assert supported in msg


def test_missing_tensor_is_named(tiny_dir):
    tensors = load_file(tiny_dir / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, tiny_dir / "model.safetensors")
    with pytest.raises(LmlabError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*missing.*\(96, 64\)"):
        lmlab.load_pretrained(tiny_dir)


def test_misshaped_tensor_names_both_shapes(tiny_dir):
    tensors = load_file(tiny_dir / "model.safetensors")
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    save_file(tensors, tiny_dir / "model.safetensors")
    with pytest.raises(LmlabError, match=r"k_proj\.weight.*\(16, 64\).*\(32, 64\)"):
        lmlab.load_pretrained(tiny_dir)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt"])
def test_pickled_checkpoint_is_refused_with_a_way_out(tiny_dir, name):
    (tiny_dir / "model.safetensors").unlink()
    (tiny_dir / name).write_bytes(b"\x80\x04 not really a pickle, and never unpickled")
    for target in (tiny_dir, tiny_dir / name):
        with pytest.raises(LmlabError) as e:
            lmlab.load_pretrained(target)
        assert "pickle" in str(e.value) and "safetensors" in str(e.value) and name in str(e.value)


def test_invalid_config_json_names_line(tiny_dir):
    (tiny_dir / "config.json").write_text('{\n  "model_type": "llama",\n  oops\n}')
    with pytest.raises(LmlabError, match=r"config\.json:3: invalid JSON"):
        lmlab.load_pretrained(tiny_dir)


def test_unsupported_gguf_architecture_lists_supported(tmp_path):
    import gguf

    path = tmp_path / "falcon.gguf"
    w = gguf.GGUFWriter(str(path), "falcon")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(LmlabError) as e:
        lmlab.load_pretrained(path)
    assert "'falcon'" in str(e.value) and "llama" in str(e.value) and "falcon.gguf" in str(e.value)


def test_cli_prints_one_line_and_exits_1(tiny_dir):
    (tiny_dir / "config.json").write_text('{"model_type": "t5"}')
    r = subprocess.run(
        [sys.executable, "-m", "lmlab.cli", "model", "info", str(tiny_dir)], capture_output=True, text=True
    )
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "model_type" in r.stderr and "t5" in r.stderr
