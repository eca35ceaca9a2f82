"""Chat templates render as transformers renders them, inside a sandbox."""

from __future__ import annotations

import pytest
import transformers
from tokenizers import Tokenizer as Backend
from tokenizers import models

from lmlab.errors import LmlabError
from lmlab.tokenizer import Tokenizer

TEMPLATES = {
    # ChatML with a default system prompt (Qwen2-style), loop controls and the generation tag
    "chatml": (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}{% endif %}"
        "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}{% generation %}"
        "{{ message['content'] }}{% endgeneration %}{{ '<|im_end|>\\n' }}"
        "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    # LLaMA-2 style: bos/eos from the special tokens, raise_exception, whitespace control
    "llama2": (
        "{{ bos_token }}{% for message in messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] | trim + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endif %}"
        "{% endfor %}"
    ),
    # tojson must not escape HTML or non-ASCII; a multi-line template exercises trim_blocks/lstrip_blocks
    "tools": (
        "{% if tools %}\n  {{- 'Tools: ' + tools | tojson }}\n{% endif %}\n"
        "{% for m in messages %}\n    {{ m.role }}: {{ m.content }}\n{% endfor %}"
    ),
}
CHATS = [
    [{"role": "user", "content": "Hi <b>there</b>"}, {"role": "assistant", "content": "Hello! 你好"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  padded  "}],
]


def _pair(template):
    backend = Backend(models.WordLevel({"<s>": 0, "</s>": 1, "<unk>": 2}, unk_token="<unk>"))
    ours = Tokenizer(backend, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, template)
    theirs = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    theirs.chat_template = template
    return ours, theirs


@pytest.mark.parametrize("name", TEMPLATES)
@pytest.mark.parametrize("chat", range(len(CHATS)))
@pytest.mark.parametrize("gen", [False, True])
def test_renders_like_transformers(name, chat, gen):
    ours, theirs = _pair(TEMPLATES[name])
    messages = CHATS[chat]
    tools = [{"name": "search", "description": "find <things> 中文"}] if name == "tools" else None
    try:
        want = theirs.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False, tools=tools)
    except Exception as e:  # the template itself refuses (llama2 with a system role)
        with pytest.raises(LmlabError, match="alternate"):
            ours.apply_chat_template(messages, add_generation_prompt=gen, tools=tools)
        assert "alternate" in str(e)
        return
    assert ours.apply_chat_template(messages, add_generation_prompt=gen, tools=tools) == want


def test_sandbox_blocks_python_internals():
    ours, _ = _pair("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(LmlabError):
        ours.apply_chat_template([{"role": "user", "content": "x"}])


def test_template_syntax_error_is_clear():
    ours, _ = _pair("{% for m in messages %}{{ m.content }")
    with pytest.raises(LmlabError, match="chat_template"):
        ours.apply_chat_template([{"role": "user", "content": "x"}])
