"""Greedy answers from Hugging Face transformers (+ PEFT), the reference mindlora is checked with.

Takes the same flags and files as ``python -m mindlora.generate`` for the subset the quickstart
uses, but ``--load`` is a Hugging Face model folder and ``--lora-load`` an HF PEFT adapter folder.
Prompts are rendered with mindlora's own template code (``mindlora.data.templates``, the layout
the model was trained on) and tokenised with mindlora's tokenizer loader, so both sides start
from the same prompt ids; generation stops at the template's stop words or the tokenizer's EOS.

    python examples/quickstart/hf_generate.py --load HF_DIR [--lora-load PEFT_DIR] \
        --tokenizer-name-or-path HF_DIR --prompt-type chatml --max-new-tokens 48 \
        --prompts prompts.jsonl --output answers.jsonl
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def prompt_ids(tokenizer, template, prompt: str, enable_thinking: str = "none") -> list[int]:
    """Token ids of one user turn followed by the template's generation prompt (with the empty
    thought block when ``enable_thinking`` is ``false``, as preprocessing writes it)."""
    from mindlora.data.templates import Conversation, Message

    conv = Conversation((Message("user", prompt), Message("assistant", "")))
    segments = template.render(conv, bos=tokenizer.bos_token, eos=tokenizer.eos_token,
                               enable_thinking=enable_thinking)
    text = "".join(s for s, learned in segments if not learned)
    return tokenizer.encode(text)


def stop_ids(tokenizer, template) -> set[int]:
    """Single-token stop words of the template, plus the tokenizer's EOS."""
    ids = {tokenizer.eos_id} if tokenizer.eos_id is not None else set()
    for word in template.stop_words or ():
        tid = tokenizer.token_to_id(word)
        if tid is not None:
            ids.add(tid)
    return ids


@torch.no_grad()
def greedy(model, ids: list[int], max_new_tokens: int, stops: set[int]) -> list[int]:
    """HF ``generate`` with greedy decoding; the generated ids, the stop token included."""
    mask = torch.ones(1, len(ids), dtype=torch.long)
    out = model.generate(torch.tensor([ids]), attention_mask=mask, do_sample=False,
                         max_new_tokens=max_new_tokens, eos_token_id=sorted(stops),
                         pad_token_id=sorted(stops)[0])
    return out[0, len(ids):].tolist()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True, help="Hugging Face model folder")
    p.add_argument("--lora-load", help="HF PEFT adapter folder")
    p.add_argument("--tokenizer-name-or-path", required=True)
    p.add_argument("--prompt-type", required=True)
    p.add_argument("--enable-thinking", choices=("true", "false", "none"), default="none")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--prompts", required=True, help="JSONL, one {\"prompt\": text} a line")
    p.add_argument("--output", help="JSONL answers (default stdout)")
    args = p.parse_args(argv)

    from transformers import AutoModelForCausalLM

    from mindlora.data.templates import get_template
    from mindlora.data.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer_name_or_path)
    template = get_template(args.prompt_type)
    model = AutoModelForCausalLM.from_pretrained(args.load, dtype=torch.float32).eval()
    if args.lora_load:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.lora_load).eval()
    stops = stop_ids(tok, template)
    lines = []
    with open(args.prompts, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    for rec in records:
        ids = prompt_ids(tok, template, rec["prompt"], args.enable_thinking)
        start = time.perf_counter()
        new = greedy(model, ids, args.max_new_tokens, stops)
        seconds = time.perf_counter() - start
        shown = [t for t in new if t not in stops]
        answer = tok.hf.decode(shown, skip_special_tokens=True) if hasattr(tok, "hf") \
            else tok.decode(shown)
        lines.append(json.dumps(dict(rec, answer=answer, token_ids=new,
                                     tokens_per_s=round(len(new) / max(seconds, 1e-9), 2)),
                                ensure_ascii=False))
    text = "\n".join(lines) + "\n"
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
