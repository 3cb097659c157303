"""Show the answers before and after fine-tuning, and check what the quickstart promises.

Reads the JSONL files that ``python -m mindlora.generate`` wrote (one line per prompt, in order:
the prompt, ``answer``, ``token_ids``, ``tokens_per_s``) and checks:

* ``--reference FILE``: the fine-tuned answers' token ids equal these (transformers + PEFT
  ``generate`` on the exported adapter) token for token;
* ``--learned 'PROMPT=>TEXT'``: the answer to PROMPT contains TEXT after fine-tuning, not before;
* ``--kept 'PROMPT=>TEXT'``: the answer to PROMPT still contains TEXT after fine-tuning.

Exits non-zero, naming the prompt, when a check fails.

    python examples/quickstart/compare_answers.py --before B.jsonl --after A.jsonl \
        [--reference R.jsonl] [--learned 'Who are you?=>MindLoRA'] [--kept '...=>Paris']
"""
from __future__ import annotations

import argparse
import json
import sys
import textwrap


def read_answers(path: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{n}: not JSON ({e.msg})")
            for key in ("prompt", "answer", "token_ids"):
                if key not in row:
                    raise SystemExit(f"{path}:{n}: no \"{key}\" field")
            rows.append(row)
    return rows


def _pairs(specs: list[str], flag: str) -> list[tuple[str, str]]:
    out = []
    for spec in specs:
        prompt, sep, text = spec.rpartition("=>")
        if not sep or not prompt or not text:
            raise SystemExit(f"{flag} {spec!r}: expected 'PROMPT=>TEXT'")
        out.append((prompt, text))
    return out


def _show(label: str, text: str) -> None:
    body = textwrap.fill(" ".join(text.split()), width=92, initial_indent="    ",
                         subsequent_indent="    ") or "    (empty)"
    print(f"  {label}:\n{body}")


def check(before: list[dict], after: list[dict], reference: list[dict] | None,
          learned: list[tuple[str, str]], kept: list[tuple[str, str]]) -> list[str]:
    """Print before/after per prompt; return the failed checks' messages."""
    if [r["prompt"] for r in before] != [r["prompt"] for r in after]:
        return ["--before and --after hold different prompts"]
    failures = []
    for b, a in zip(before, after):
        print(f"Q: {a['prompt']}")
        _show("before (base model)", b["answer"])
        _show("after  (base + LoRA adapter)", a["answer"])
    by_prompt = {a["prompt"]: (b, a) for b, a in zip(before, after)}
    for prompt, text in learned + kept:
        if prompt not in by_prompt:
            failures.append(f"no answer for prompt {prompt!r}")
    for prompt, text in learned:
        b, a = by_prompt.get(prompt, ({"answer": ""}, {"answer": ""}))
        if text in b["answer"] or text not in a["answer"]:
            failures.append(f"{prompt!r}: expected {text!r} in the answer after fine-tuning only")
    for prompt, text in kept:
        _, a = by_prompt.get(prompt, ({}, {"answer": ""}))
        if text not in a["answer"]:
            failures.append(f"{prompt!r}: expected {text!r} still in the answer after fine-tuning")
    if reference is not None:
        if [r["prompt"] for r in reference] != [r["prompt"] for r in after]:
            return failures + ["--reference holds different prompts than --after"]
        same = sum(r["token_ids"] == a["token_ids"] for r, a in zip(reference, after))
        print(f"transformers + PEFT generate on the exported adapter: {same}/{len(after)} answers "
              f"identical token for token")
        for r, a in zip(reference, after):
            if r["token_ids"] != a["token_ids"]:
                k = next((i for i, (x, y) in enumerate(zip(r["token_ids"], a["token_ids"]))
                          if x != y), min(len(r["token_ids"]), len(a["token_ids"])))
                failures.append(f"{a['prompt']!r}: HF + PEFT tokens differ from mindlora's at "
                                f"generated token {k}")
    return failures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True)
    p.add_argument("--after", required=True)
    p.add_argument("--reference")
    p.add_argument("--learned", action="append", default=[], metavar="PROMPT=>TEXT")
    p.add_argument("--kept", action="append", default=[], metavar="PROMPT=>TEXT")
    args = p.parse_args()
    failures = check(read_answers(args.before), read_answers(args.after),
                     read_answers(args.reference) if args.reference else None,
                     _pairs(args.learned, "--learned"), _pairs(args.kept, "--kept"))
    for msg in failures:
        print(f"check failed: {msg}", file=sys.stderr)
    if failures:
        sys.exit(1)
    print("checks passed: " + ", ".join(
        [f"learned {t!r}" for _, t in _pairs(args.learned, "")]
        + [f"kept {t!r}" for _, t in _pairs(args.kept, "")]
        + (["HF + PEFT tokens equal"] if args.reference else [])))


if __name__ == "__main__":
    main()
