"""A quantized model computes what the same model with dequantized float32 weights computes (logits
to 1e-5, greedy tokens equal), saves and loads back bit-identically, and bad settings get one line."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn
from torch._dynamo.utils import counters

from lmlab.cli import main
from lmlab.compress.gptq import gptq_quantize_model
from lmlab.compress.quantize import quantize_model
from lmlab.generate import GenerationConfig
from lmlab.generate.decode import generate_ids
from lmlab.model.checkpoint import load_pretrained, save_pretrained
from lmlab.model.config import ModelConfig
from lmlab.model.quantized import QuantConfig, QuantLinear, set_module
from lmlab.model.transformer import Transformer
from lmlab.utils.device import cpu_has_vnni, cpu_policy


def _tiny(preset: str = "qwen2-tiny", seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = dataclasses.replace(ModelConfig.from_preset(preset), d_ff=192)  # widths divisible by 32
    return Transformer(cfg).eval()


def _dequantized_twin(model: Transformer) -> Transformer:
    """The same model with every QuantLinear replaced by an nn.Linear holding its float32 weights."""
    twin = _tiny(model.cfg.family + "-tiny" if model.cfg.family != "llama" else "llama-tiny")
    twin.cfg = model.cfg
    twin.load_state_dict({k: v for k, v in model.state_dict().items() if "qweight" not in k and "scales" not in k
                          and "offsets" not in k}, strict=False)  # fmt: skip
    if twin.lm_head.weight is twin.embed.weight:
        twin.lm_head.weight = nn.Parameter(twin.embed.weight.detach().clone())
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            lin.weight.data.copy_(m.weight)
            if m.bias is not None:
                lin.bias.data.copy_(m.bias)
            set_module(twin, name, lin)
    return twin.eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


CONFIGS = [
    QuantConfig(bits=8),
    QuantConfig(bits=8, group_size=32),
    QuantConfig(bits=4, group_size=32, sym=True),
    QuantConfig(bits=4, group_size=64, sym=False),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"int{c.bits}-g{c.group_size}-{'sym' if c.sym else 'asym'}")
def test_quantized_model_equals_its_dequantized_twin(cfg):
    """The default settings: per-channel int8's long prefills (over 64 rows, on a VNNI CPU) take
    int24 activations, a few times float32's rounding off the twin; the rest is weight-only."""
    model = _tiny()
    quantize_model(model, cfg)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 2 * 7 + 1  # every block linear + head
    assert model.quant_config.activations == ("int24" if cfg.bits == 8 and cfg.group_size is None else "float32")
    twin = _dequantized_twin(model)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 40))
    with torch.no_grad():
        assert _rel(model(ids), twin(ids)) <= 1e-5  # prefill: 80 rows (int24, or tiles + BLAS)
        assert _rel(model(ids[:, :12]), twin(ids[:, :12])) <= 1e-5  # 24 rows: the exact kernels
        assert _rel(model(ids[:, :1]), twin(ids[:, :1])) <= 1e-5  # decode-sized: the skinny kernels
    gen = GenerationConfig(max_new_tokens=12)  # greedy
    for prompt in (ids[:, :6], ids):
        want = generate_ids(twin, prompt, config=gen, eos=[])
        assert torch.equal(generate_ids(model, prompt, config=gen, eos=[]), want)


def test_default_activations_follow_the_weights():
    """activations unset: int24 where the weights are per-channel int8 (an integer matmul can apply
    their scales), float32 for grouped ones; written out as resolved, read back as written."""
    assert QuantConfig(bits=8).activations == "int24"
    assert QuantConfig(bits=8, group_size=32).activations == "float32"
    assert QuantConfig(bits=4, group_size=32).activations == "float32"
    assert QuantConfig.from_dict({"quant_method": "lmlab", "bits": 8}).activations == "int24"  # older files
    assert QuantConfig.from_dict(QuantConfig(bits=8, activations="float32").to_dict()).activations == "float32"
    assert QuantConfig(bits=8).to_dict()["activations"] == "int24"


def test_quantization_error_is_small_and_int8_beats_int4():
    model = _tiny("llama-tiny")
    ids = torch.randint(0, model.cfg.vocab_size, (2, 32))
    with torch.no_grad():
        ref = model(ids)
        errs = {}
        for cfg in (QuantConfig(bits=8), QuantConfig(bits=4, group_size=32)):
            m = _tiny("llama-tiny")
            quantize_model(m, cfg)
            errs[cfg.bits] = _rel(m(ids), ref)
    assert errs[8] < 0.02 and errs[8] < errs[4] < 0.3


@pytest.mark.parametrize("cfg", [QuantConfig(bits=8), QuantConfig(bits=4, group_size=32, sym=False)])
def test_save_and_load_round_trip(tmp_path, cfg):
    model = _tiny()
    quantize_model(model, cfg)
    save_pretrained(model, None, tmp_path / "q")
    loaded, _ = load_pretrained(tmp_path / "q")
    ids = torch.randint(0, model.cfg.vocab_size, (1, 16))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    on_disk = (tmp_path / "q" / "model.safetensors").stat().st_size
    fp32 = sum(p.numel() * 4 for p in _tiny().parameters())
    assert on_disk < fp32 * (0.6 if cfg.bits == 8 else 0.45)  # the float32 embedding stays


def test_gptq_model_beats_round_to_nearest_on_its_calibration_data():
    torch.manual_seed(0)
    calib = [torch.randint(0, 512, (4, 64)) for _ in range(4)]
    cfg = QuantConfig(bits=4, group_size=32, method="gptq")
    model = _tiny("llama-tiny")
    ratios = gptq_quantize_model(model, calib, cfg)
    assert len(ratios) == 2 * 7 + 1
    assert sorted(ratios.values())[len(ratios) // 2] < 1.0  # median layer: lower output error than RTN
    twin = _dequantized_twin(model)
    with torch.no_grad():
        assert _rel(model(calib[0]), twin(calib[0])) <= 1e-5


def _saved_tiny(tmp_path) -> str:
    model = _tiny("llama-tiny")
    save_pretrained(model, None, tmp_path / "fp32")
    return str(tmp_path / "fp32")


def test_cli_writes_a_loadable_checkpoint(tmp_path, capsys):
    src = _saved_tiny(tmp_path)
    assert main(["quantize", src, str(tmp_path / "int4"), "--bits", "4", "--group", "32"]) == 0
    assert "MB ->" in capsys.readouterr().out
    model, _ = load_pretrained(tmp_path / "int4")
    assert model.quant_config.bits == 4 and model.quant_config.group_size == 32
    assert model.quant_config.activations == "float32"
    for flags, activations in ((["--activations", "int16"], "int16"), ([], "int24")):
        assert main(["quantize", src, str(tmp_path / activations), "--bits", "8", *flags]) == 0
        model, _ = load_pretrained(tmp_path / activations)
        assert model.quant_config.activations == activations
        assert {m.activations for m in model.modules() if isinstance(m, QuantLinear)} == {activations}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bits", "3"], "bits must be 8 or 4"),
        (["--bits", "4", "--group", "48"], "multiple of 32"),
        (["--bits", "4", "--group", "128"], "group size 128 does not divide the width 64"),
        (["--bits", "4", "--activations", "int8"], "int8 activations need per-channel int8 weights"),
        (["--bits", "8", "--group", "32", "--activations", "int16"], "int16 activations need per-channel int8"),
        (["--bits", "4", "--activations", "int24"], "int24 activations need per-channel int8 weights"),
    ],
)
def test_cli_bad_settings_are_one_line(tmp_path, capsys, args, message):
    src = _saved_tiny(tmp_path)
    assert main(["quantize", src, str(tmp_path / "out"), *args]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_compiled_decode_of_a_quantized_model_equals_eager():
    # the quantized operators are traced into the compiled decode graph (their fake shapes), not
    # broken out of it; greedy tokens equal the eager loop's
    model = _tiny()
    quantize_model(model, QuantConfig(bits=4, group_size=32))
    prompt = torch.randint(0, model.cfg.vocab_size, (2, 5))
    eager = generate_ids(model, prompt, config=GenerationConfig(max_new_tokens=8), eos=[])
    counters.clear()
    compiled = generate_ids(model, prompt, config=GenerationConfig(max_new_tokens=8, compile=True), eos=[])
    assert torch.equal(eager, compiled)
    assert not counters["graph_break"]


# oneDNN's int8 matmul may saturate without VNNI, where the device policy keeps integer activations off
needs_vnni = pytest.mark.skipif(not cpu_has_vnni(), reason="no VNNI: integer activations are off on this CPU")


@needs_vnni
@pytest.mark.parametrize(
    ("activations", "low", "high"), [("int8", 1e-4, 2e-2), ("int16", 1e-7, 1e-4), ("int24", 1e-9, 1e-6)]
)
def test_dynamic_linear_is_the_integer_product_of_rounded_activations(activations, low, high):
    """W8A8 / int16 / int24 activations: x rounded per row (max |x| -> top), then exact integer sums,
    each scaled once; each limb more makes the error ~256x smaller, and int24's on these rows (no
    outliers: max / rms ~ 3) is no more than float32's own rounding error x 2."""
    from lmlab.kernels import quant

    torch.manual_seed(0)
    top = quant.LIMB_TOP[{"int8": 1, "int16": 2, "int24": 3}[activations]]
    q = torch.randint(-127, 128, (48, 96), dtype=torch.int8)
    scale, bias = torch.rand(48, 1) / 50, torch.randn(48)
    x = torch.randn(2, 70, 96)
    rows = x.reshape(-1, 96)
    sx = rows.abs().amax(-1, keepdim=True) / top
    xq = torch.round(rows / sx).clamp(-top, top).long()
    want = (xq @ q.long().t()).double() * sx.double() * scale.view(1, -1).double() + bias.double()
    got = getattr(quant, f"{activations}_dynamic_linear")(x, q, scale, bias)
    torch.testing.assert_close(got.reshape(-1, 48).double(), want, rtol=1e-6, atol=1e-6)
    exact = x @ (q.float() * scale).t() + bias  # the rounding of x: near the exact product, not equal
    err = float((got - exact).norm() / exact.norm())
    assert low < err < high
    if activations == "int24":  # against float64, no further from the true product than float32 is
        true = x.double() @ (q.double() * scale.double()).t() + bias.double()
        assert float((got - true).norm() / true.norm()) <= 2 * float((exact - true).norm() / true.norm())


@needs_vnni
@pytest.mark.parametrize(("activations", "high"), [("int8", 5e-2), ("int16", 1e-4), ("int24", 1e-5)])
def test_integer_activations_run_only_a_prefill_and_survive_save_and_load(tmp_path, activations, high):
    model = _tiny("llama-tiny")
    quantize_model(model, QuantConfig(bits=8, activations=activations))
    twin = _dequantized_twin(model)
    short, long = torch.randint(0, 512, (1, 16)), torch.randint(0, 512, (1, 80))
    with torch.no_grad():
        # a decode step or a short prompt (<= 64 rows): the exact kernels
        assert _rel(model(short), twin(short)) < 1e-5
        # a long prefill: integer activations, close to the exact result but not equal
        err = _rel(model(long), twin(long))
        assert 1e-7 < err < high
    # float64 activations ask for more precision than any integer scheme keeps: the float path
    layer = next(m for m in model.modules() if isinstance(m, QuantLinear))
    x64 = torch.randn(80, layer.in_features, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(layer(x64), x64 @ layer.weight.double().t())
    save_pretrained(model, None, tmp_path / "w8a8")
    back, _ = load_pretrained(tmp_path / "w8a8")
    assert back.quant_config.activations == activations
    with torch.no_grad():
        torch.testing.assert_close(back(long), model(long), rtol=0, atol=0)
    weights_only = _tiny("llama-tiny")
    quantize_model(weights_only, QuantConfig(bits=8, activations="float32"))
    with torch.no_grad():
        assert _rel(weights_only(long), _dequantized_twin(weights_only)(long)) < 1e-5
    # the device policy decides: under a GPU's policy (no W8A8) the same layers take the exact path
    from lmlab.utils.device import forced_policy, policy

    with forced_policy(policy("cuda")), torch.no_grad():
        assert _rel(model(long), twin(long)) < 1e-5
    # and a CPU without VNNI (where oneDNN's int8 matmul may saturate) keeps the exact path too
    with forced_policy(cpu_policy(vnni=False)), torch.no_grad():
        assert _rel(model(long), twin(long)) < 1e-5
    assert policy("cpu") == cpu_policy(vnni=True)  # this machine (the skip above says so)


def test_the_int24_default_checks_itself_and_gives_way_to_float32(tmp_path, capsys, monkeypatch):
    """`lmlab quantize` measures how far int24 moves a probe's logits; past INT24_TOLERANCE a default
    checkpoint keeps float32 activations (asked for by name, int24 stays), and says so in one line."""
    import lmlab.compress.quantize as cq

    model = _tiny("llama-tiny")
    quantize_model(model, QuantConfig(bits=8))
    err = cq.int24_error(model)
    if cpu_has_vnni():
        assert 1e-9 < err < 1e-5  # the integer path ran: near float32's, not equal
    else:
        assert err is None
    assert {m.activations for m in model.modules() if isinstance(m, QuantLinear)} == {"int24"}  # restored
    if cpu_has_vnni():  # restored when the int24 pass fails midway too, and the train/eval mode with them
        from lmlab.kernels import quant

        def broken(*a):
            raise RuntimeError("int24 pass")

        monkeypatch.setitem(quant.DYNAMIC_LINEARS, "int24", broken)
        model.train()
        with pytest.raises(RuntimeError, match="int24 pass"):
            cq.int24_error(model)
        assert model.training
        assert {m.activations for m in model.modules() if isinstance(m, QuantLinear)} == {"int24"}
        monkeypatch.undo()
        model.eval()
    from lmlab.utils.device import forced_policy, policy

    with forced_policy(policy("cuda")):
        assert cq.int24_error(model) is None  # the path would not run: nothing to measure
    # a reduced head (logits -inf off its tokens, in both paths) measures its finite logits; a context
    # shorter than the probe measures what fits, and nothing where that is no long prefill
    reduced = dataclasses.replace(ModelConfig.from_preset("llama-tiny"), d_ff=192, head_tokens=list(range(100)))
    short = dataclasses.replace(ModelConfig.from_preset("gpt2-tiny"), d_ff=192, max_seq_len=128)
    tiny_context = dataclasses.replace(short, max_seq_len=64)
    for cfg in (reduced, short, tiny_context):
        torch.manual_seed(0)
        m = Transformer(cfg).eval()
        quantize_model(m, QuantConfig(bits=8))
        got = cq.int24_error(m)
        if cpu_has_vnni() and cfg is not tiny_context:
            assert 1e-9 < got < 1e-5, cfg.family
        else:
            assert got is None
    src = _saved_tiny(tmp_path)
    cases = (
        ([], 1e-6, "int24", "within 1.0e-06"),
        ([], 1e-3, "float32", "keeps float32 activations"),
        ([], float("nan"), "float32", "keeps float32 activations"),  # a logit finite in one path only
        (["--activations", "int24"], 1e-3, "int24", "kept as asked"),
        ([], None, "int24", "not checked"),  # the integer path does not run on this machine
    )
    for i, (flags, measured, want, says) in enumerate(cases):
        monkeypatch.setattr(cq, "int24_error", lambda model, e=measured: e)
        out = tmp_path / f"case{i}"
        assert main(["quantize", src, str(out), "--bits", "8", *flags]) == 0
        printed = capsys.readouterr().out
        assert load_pretrained(out)[0].quant_config.activations == want
        assert says in printed, printed
