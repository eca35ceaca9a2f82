"""Each cleaning rule on realistic English and Chinese text: every test fails if its rule is missing."""

from __future__ import annotations

import pytest

from lmlab.data.clean import DEFAULT_CONFIG, clean_text, load_config
from lmlab.data.pii import cn_id_valid, luhn_valid, mask_pii

EN = (
    "The committee met on Tuesday to discuss the new library budget. After a long debate, the members agreed "
    "to extend opening hours on weekends and to buy more books for the children's section."
)
ZH = "委员会周二开会讨论了新图书馆的预算。经过长时间的辩论，委员们同意延长周末的开放时间，并为儿童区购买更多图书。"


def run(text: str, **overrides):
    """clean_text with the default config (plus overrides): (text or None, {rule: reason})."""
    config = load_config(None, **overrides)
    out, events = clean_text(text, config)
    return out, {e[0]: e[3] for e in events}


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Ｔｈｅ ＣＰＵ ran at ８５ degrees during the benchmark, which is far above the rated limit.",
         "The CPU ran at 85 degrees during the benchmark, which is far above the rated limit."),
        ("测试中ＣＰＵ温度达到８５度，远高于额定上限，工程师决定更换散热器。",
         "测试中CPU温度达到85度，远高于额定上限，工程师决定更换散热器。"),
    ],
)  # fmt: skip
def test_nfkc(text, expected):
    out, events = run(text)
    assert out == expected and "nfkc" in events


@pytest.mark.parametrize("text", [EN[:60] + "\u200b\x07" + EN[60:], ZH[:20] + "\u202e\x00\ufeff" + ZH[20:]])
def test_control_chars(text):
    out, events = run(text)
    assert out in (EN, ZH) and "control_chars" in events


@pytest.mark.parametrize(
    "text, expected",
    [
        ('<div class="post"><p>Read the <b>full</b> report &amp; the appendix.</p><script>track()</script></div>',
         "Read the full report & the appendix."),
        ("<p>北京欢迎你&nbsp;！</p><!-- 广告 --><br/>奥运会即将开幕，全城都在准备。",
         "北京欢迎你 ！\n\n奥运会即将开幕，全城都在准备。"),
    ],
)  # fmt: skip
def test_html(text, expected):
    out, events = run(text)
    assert out == expected and "html" in events


def test_html_leaves_prose_comparisons_alone():
    text = "In Python, a < b and b > c are comparisons; <3 is not a tag either, and neither is 1 <2."
    assert run(text)[0] == text


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The   quick brown\t\tfox   jumps over the lazy dog.   \n\n\n\nIt was not amused.  ",
         "The quick brown fox jumps over the lazy dog.\n\nIt was not amused."),
        ("床前明月光，\u3000\u3000疑是地上霜。\n\n\n\n举头望明月，低头思故乡。",
         "床前明月光， 疑是地上霜。\n\n举头望明月，低头思故乡。"),
    ],
)  # fmt: skip
def test_whitespace(text, expected):
    out, events = run(text)
    assert out == expected and "whitespace" in events


@pytest.mark.parametrize("text", ["Click here.", "点击这里。", "短"])
def test_length_min(text):
    out, events = run(text)
    assert out is None and "length" in events


def test_length_max():
    out, events = run(EN, length={"max_chars": 100})
    assert out is None and "length" in events


def test_language_keep_list():
    russian = "Комитет собрался во вторник, чтобы обсудить новый бюджет библиотеки и часы работы."
    assert run(russian)[1].get("language") == "language ru"
    assert run(EN)[0] == EN and run(ZH)[0] is not None  # both kept by default
    assert run(ZH, language={"keep": ["en"]})[0] is None
    assert run(EN, language={"keep": ["zh"]})[0] is None


@pytest.mark.parametrize(
    "text",
    [
        "\n".join(["BUY NOW! Best prices on watches.", "Limited offer, click the link below.",
                   "BUY NOW! Best prices on watches.", "BUY NOW! Best prices on watches.", EN]),
        "\n".join(["特价促销！全场手表五折！", "点击下方链接立即购买。", "特价促销！全场手表五折！",
                   "特价促销！全场手表五折！", ZH]),
    ],
)  # fmt: skip
def test_repetition_duplicate_lines(text):
    out, events = run(text)
    assert out is None and "duplicate lines" in events["repetition"]


@pytest.mark.parametrize(
    "text",
    [
        "We sell cheap shoes and cheap shoes are what we sell, cheap shoes for everyone: cheap shoes, cheap shoes, "
        "cheap shoes at the lowest prices in town, so come and buy cheap shoes today.",
        "本店出售便宜鞋子，便宜鞋子，便宜鞋子，全城最低价的便宜鞋子，快来购买便宜鞋子，便宜鞋子天天有。",
    ],
)
def test_repetition_top_ngram(text):
    out, events = run(text)
    assert out is None and "gram" in events["repetition"]


@pytest.mark.parametrize(
    "text",
    [
        "#travel #sun #beach #summer #love #photo #instagood loving this view... so good... #happy",
        "今天的风景……真美……太美了……#旅行 #夏天 #海边 #阳光",
    ],
)
def test_symbols(text):
    out, events = run(text)
    assert out is None and "symbols" in events


@pytest.mark.parametrize(
    "text",
    [
        "Win big at our online casino tonight! The best casino bonuses, free spins and more. " + EN,
        "澳门博彩在线赌博，注册即送彩金，日赚千元不是梦。" + ZH,
    ],
)
def test_bad_words(text):
    out, events = run(text)
    assert out is None and "bad_words" in events
    assert run(text, bad_words=False)[0] is not None


@pytest.mark.parametrize(
    "text, expected, kind",
    [
        ("Contact John at john.smith@example.com for details.", "Contact John at <EMAIL> for details.", "email"),
        ("如有疑问请发邮件至 zhang.wei@163.com 联系我们。", "如有疑问请发邮件至 <EMAIL> 联系我们。", "email"),
        ("Call us at (415) 555-0123 or +1 415 555 0199 today.", "Call us at <PHONE> or <PHONE> today.", "phone"),
        ("请拨打13812345678或+86 139-1234-5678咨询。", "请拨打<PHONE>或<PHONE>咨询。", "phone"),
        ("身份证号11010519491231002X已登记。", "身份证号<ID>已登记。", "cn_id"),
        ("The server at 192.168.10.254 went down.", "The server at <IP> went down.", "ipv4"),
        ("服务器地址为10.0.0.1，请勿外传。", "服务器地址为<IP>，请勿外传。", "ipv4"),
        ("Card 4111 1111 1111 1111 was charged.", "Card <CARD> was charged.", "card"),
        ("信用卡号5500-0000-0000-0004已冻结。", "信用卡号<CARD>已冻结。", "card"),
    ],
)
def test_pii_masks(text, expected, kind):
    out, counts = mask_pii(text)
    assert out == expected and counts[kind] >= 1


@pytest.mark.parametrize(
    "text",
    [
        "Genesis 3:16 was written in 1611, and the year 2024 had 366 days.",
        "身份证号110105194912310021格式正确但校验位错误。",  # bad check digit: not an ID
        "Order 4111 1111 1111 1112 is not a valid card number.",  # fails Luhn
        "版本号2.10.3和编号123456都不是隐私。",
    ],
)
def test_pii_leaves_non_pii_alone(text):
    assert mask_pii(text) == (text, {})


def test_pii_in_pipeline():
    out, events = run(EN + " Write to me at alice@example.org.")
    assert out.endswith("<EMAIL>.") and "pii" in events


def test_checksums():
    assert cn_id_valid("11010519491231002X") and not cn_id_valid("110105194912310021")
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")


def test_default_recipe_matches_code_defaults():
    from pathlib import Path

    recipe = Path(__file__).parents[2] / "recipes" / "data" / "default.yaml"
    assert load_config(recipe) == load_config(None) == DEFAULT_CONFIG


def test_unknown_setting_is_an_error():
    from lmlab.errors import LmlabError

    with pytest.raises(LmlabError, match="near_dedupe"):
        load_config(None, near_dedupe={"threshold": 0.5})


def test_package_names_are_the_functions_and_no_torch():
    """`from lmlab.data import clean, fetch` gives the functions even after their same-named submodules were
    imported, and importing lmlab.data (what every cleaning worker does) does not import torch."""
    import subprocess
    import sys

    import lmlab.data.clean
    import lmlab.data.fetch  # noqa: F401
    from lmlab.data import TokenDataset, clean, fetch

    assert callable(clean) and callable(fetch) and isinstance(TokenDataset, type)
    code = "import sys, lmlab.data.ray_clean, lmlab.data.shards; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_output_record_keeps_the_cleaned_text_and_the_records_own_id():
    from lmlab.data.clean import output_record

    rec = output_record("clean", "f.jsonl:3", {"text": "raw other field", "id": "doc-7", "lang": "en"})
    assert rec == {"text": "clean", "id": "doc-7", "lang": "en"}
    assert output_record("clean", "f.jsonl:3", {}) == {"text": "clean", "id": "f.jsonl:3"}
