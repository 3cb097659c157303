"""Fill LLaMA-Factory's identity.json placeholders: ``{{name}}`` and ``{{author}}``.

    python examples/quickstart/make_identity.py IDENTITY_JSON OUT_JSON [--name N] [--author A]

The 91 self-introduction records (English and Chinese) then teach the model who it is; the
quickstart blends them with alpaca_en_demo so that its other answers stay sensible.
"""
from __future__ import annotations

import argparse
import json
import os


def fill(records: list[dict], name: str, author: str) -> list[dict]:
    """Records with every ``{{name}}``/``{{author}}`` in their string fields replaced."""
    def sub(value):
        if isinstance(value, str):
            return value.replace("{{name}}", name).replace("{{author}}", author)
        return value
    return [{k: sub(v) for k, v in rec.items()} for rec in records]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--name", default="MindLoRA")
    p.add_argument("--author", default="the mindlora team")
    args = p.parse_args()
    with open(args.input, encoding="utf-8") as f:
        records = json.load(f)
    if not isinstance(records, list) or not records:
        raise SystemExit(f"{args.input}: expected a non-empty JSON list of records")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    tmp = args.output + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(fill(records, args.name, args.author), f, ensure_ascii=False, indent=1)
    os.replace(tmp, args.output)
    print(f"[data] {len(records)} identity records, name={args.name!r}, author={args.author!r} "
          f"-> {args.output}")


if __name__ == "__main__":
    main()
