"""templates.json renders conversations exactly as the model's own Jinja chat template does."""
from __future__ import annotations

import json

import numpy as np
import pytest

from mindlora.data.handlers import HandlerOptions, SharegptStyleInstructionHandler
from mindlora.data.templates import Conversation, Message, get_template, load_templates
from mindlora.data.toy import CHATML_JINJA, QWEN2_JINJA, QWEN3_JINJA

SINGLE = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
WITH_THOUGHT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "<think>\nadd them\n</think>\n\nIt is 4."}]
MULTI = [
    {"role": "user", "content": "First question"},
    {"role": "assistant", "content": "<think>old thought</think>Answer one."},
    {"role": "user", "content": "Second  question \n"},
    {"role": "assistant", "content": "<think>\nnew thought\n</think>\n\nAnswer two."}]
ODD_SPACING = [  # a reply opening with newlines merges with the prompt's "\n" in BPE
    {"role": "user", "content": "Format this:  "},
    {"role": "assistant", "content": "\n\n  indented  text\n\n\n"}]


def _encode(tok, messages, template, **opts):
    handler = SharegptStyleInstructionHandler(
        tok, HandlerOptions(template=get_template(template), **opts))
    (ids, mask, labels), = handler.encode([("test:1", {"messages": messages})])
    assert (mask == 1).all()
    return ids, labels


def _jinja_ids(tok, messages, jinja):
    return list(tok.hf.apply_chat_template(messages, chat_template=jinja, tokenize=True)
                ["input_ids"])


def _learned(tok, ids, labels):
    return tok.decode(ids[labels != -100].tolist())


def _strip_thoughts(messages):
    return [{**m, "content": m["content"].split("</think>")[-1].lstrip("\n")}
            if m["role"] == "assistant" else m for m in messages]


@pytest.mark.parametrize("messages", [SINGLE, WITH_THOUGHT, MULTI, ODD_SPACING])
@pytest.mark.parametrize("mode", ["none", "true", "false"])
def test_qwen3_matches_jinja_token_for_token(hf_tok, messages, mode):
    ids, labels = _encode(hf_tok, messages, "qwen3", enable_thinking=mode)
    reference = _strip_thoughts(messages) if mode == "false" else messages
    assert ids.tolist() == _jinja_ids(hf_tok, reference, QWEN3_JINJA)
    np.testing.assert_array_equal(labels[labels != -100], ids[labels != -100])


@pytest.mark.parametrize("name,jinja", [("chatml", CHATML_JINJA), ("qwen", QWEN2_JINJA)])
@pytest.mark.parametrize("messages", [SINGLE, WITH_THOUGHT, MULTI, ODD_SPACING])
def test_chatml_and_qwen_match_jinja(hf_tok, name, jinja, messages):
    ids, labels = _encode(hf_tok, messages, name)
    assert ids.tolist() == _jinja_ids(hf_tok, messages, jinja)
    replies = "".join(m["content"] + "<|im_end|>\n" for m in messages if m["role"] == "assistant")
    if messages is ODD_SPACING:
        # "assistant\n" + "\n\n..." encodes as one "\n\n\n" token (as in the Jinja ids); a
        # token belongs to the segment of its last character, so that one is learned.
        replies = "\n" + replies
    assert _learned(hf_tok, ids, labels) == replies


def test_qwen3_thinking_modes_decide_what_is_learned(hf_tok):
    ids, labels = _encode(hf_tok, SINGLE, "qwen3", enable_thinking="none")
    assert _learned(hf_tok, ids, labels) == "Hello!<|im_end|>\n"  # added empty block: prompt
    ids, labels = _encode(hf_tok, SINGLE, "qwen3", enable_thinking="true")
    assert _learned(hf_tok, ids, labels) == "<think>\n\n</think>\n\nHello!<|im_end|>\n"
    ids, labels = _encode(hf_tok, WITH_THOUGHT, "qwen3", enable_thinking="none")
    assert _learned(hf_tok, ids, labels) == "<think>\nadd them\n</think>\n\nIt is 4.<|im_end|>\n"
    ids, labels = _encode(hf_tok, WITH_THOUGHT, "qwen3", enable_thinking="false")
    assert _learned(hf_tok, ids, labels) == "It is 4.<|im_end|>\n"
    assert "add them" not in hf_tok.decode(ids.tolist())
    assert hf_tok.decode(ids.tolist()).endswith("<think>\n\n</think>\n\nIt is 4.<|im_end|>\n")


def test_multi_turn_learns_every_reply_unless_masked(hf_tok):
    ids, labels = _encode(hf_tok, MULTI, "qwen3")
    last = "<think>\nnew thought\n</think>\n\nAnswer two.<|im_end|>\n"
    assert _learned(hf_tok, ids, labels) == "Answer one.<|im_end|>\n" + last
    assert "old thought" not in hf_tok.decode(ids.tolist())  # history thoughts dropped, as Jinja
    ids, labels = _encode(hf_tok, MULTI, "qwen3", mask_history=True)
    assert _learned(hf_tok, ids, labels) == last
    ids, labels = _encode(hf_tok, MULTI, "qwen3", train_on_inputs=True)
    assert (labels == ids).all()


def _conv(*turns, system=None):
    roles = ["user", "assistant"] * len(turns)
    return Conversation(tuple(Message(r, c) for r, c in zip(roles, turns)), system)


def test_other_templates_render_their_official_strings():
    t = load_templates()
    conv = _conv("q1", "a1", "q2", "a2", system="S")
    text = lambda name: "".join(s for s, _ in t[name].render(conv, bos="<s>", eos="</s>"))
    assert text("llama2") == ("<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nq1 [/INST] a1 </s>"
                              "<s>[INST] q2 [/INST] a2 </s>")
    assert text("mistral") == "<s>[INST] S\n\nq1 [/INST] a1</s>[INST] q2 [/INST] a2</s>"
    hdr = "<|start_header_id|>{}<|end_header_id|>\n\n"
    assert "".join(s for s, _ in t["llama3"].render(conv, bos="<|begin_of_text|>", eos="x")) == (
        "<|begin_of_text|>" + hdr.format("system") + "S<|eot_id|>" + hdr.format("user")
        + "q1<|eot_id|>" + hdr.format("assistant") + "a1<|eot_id|>" + hdr.format("user")
        + "q2<|eot_id|>" + hdr.format("assistant") + "a2<|eot_id|>")
    segs = t["empty"].render(_conv("q", "a"), bos=None, eos=None)
    assert segs == [("q", False), ("a", True)]
    assert {"qwen3", "qwen", "chatml", "llama3", "llama2", "mistral", "empty"} <= set(t)


def test_template_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown template 'qwen9'.*qwen3"):
        get_template("qwen9")
    bad = tmp_path / "t.json"
    bad.write_text(json.dumps([{"name": "x", "format_user": ["{{content}}"], "colour": 1}]))
    with pytest.raises(ValueError, match=r"template 'x': unknown keys \['colour'\]"):
        get_template("x", bad)
    bad.write_text(json.dumps([{"name": "y", "format_user": [{"nonsense": 1}]}]))
    with pytest.raises(ValueError, match="unsupported slot"):
        get_template("y", bad).render(_conv("q", "a"), bos=None, eos="e")
    bad.write_text("[{oops")
    with pytest.raises(ValueError, match=r"t\.json:1: invalid JSON"):
        get_template("y", bad)
