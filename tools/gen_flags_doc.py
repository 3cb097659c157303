"""Write docs/flags.md from the command-line parsers themselves, so the reference cannot drift.

    python tools/gen_flags_doc.py            # rewrite docs/flags.md
    python tools/gen_flags_doc.py --check    # exit 1 if docs/flags.md differs from the parsers

Each tool's ``argparse`` parser is built (nothing is run) and every flag is listed with its
type, default, choices and help, grouped as the parser groups them. Flags hidden from ``--help``
(accepted only so that MindSpeed-LLM / Megatron launchers run unchanged) are listed separately.
tests/docs/test_flags_doc.py fails when the file is stale.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "flags.md")


def _module_parser(module: str, func: str):
    return lambda: getattr(importlib.import_module(module), func)()


# (section title, how it is run, parser factory): one entry per command-line tool.
SOURCES = [
    ("Checkpoint conversion", "mindlora-convert (or python tools/convert_ckpt.py)",
     _module_parser("mindlora.checkpoint.cli", "parser")),
    ("Data preprocessing", "mindlora-preprocess (or python tools/preprocess_data.py)",
     _module_parser("mindlora.data.cli", "build_parser")),
    ("Training", "torchrun ... -m mindlora.train (or mindlora-train)",
     _module_parser("mindlora.training.args", "build_parser")),
    ("Generation", "torchrun ... -m mindlora.generate (or mindlora-generate)",
     _module_parser("mindlora.generation.args", "build_parser")),
]


def _cell(text: str) -> str:
    # argparse help escapes % as %%
    return " ".join(str(text).split()).replace("%%", "%").replace("|", "\\|")


def _value(action: argparse.Action) -> str:
    """What the flag takes: nothing (a switch), a choice, or a typed value."""
    if action.nargs == 0:
        return "switch"
    if action.choices is not None:
        kind = "{" + ", ".join(str(c) for c in action.choices) + "}"
    else:
        typ = action.type
        # a parsing function (not a type such as int) reads the flag's text
        kind = typ.__name__ if isinstance(typ, type) else "str"
    if action.nargs in ("+", "*"):
        kind += " ..." if action.nargs == "+" else " [...]"
    return kind


def _default(action: argparse.Action) -> str:
    if action.required:
        return "**required**"
    if action.nargs == 0 or action.default in (None, argparse.SUPPRESS):
        return ""
    if isinstance(action.default, (list, tuple)):
        return " ".join(str(v) for v in action.default)
    return str(action.default)


def _rows(actions: list[argparse.Action], notes: dict[int, str]) -> list[str]:
    rows = ["| flag | value | default | description |", "|---|---|---|---|"]
    for a in actions:
        flags = ", ".join(f"`{s}`" for s in a.option_strings)
        text = " ".join(t for t in (notes.get(id(a), ""), a.help or "") if t)
        rows.append(f"| {flags} | {_cell(_value(a))} | {_cell(_default(a))} | {_cell(text)} |")
    return rows


def _exclusive_notes(parser: argparse.ArgumentParser) -> dict[int, str]:
    """A note per flag of a mutually exclusive group, e.g. 'exactly one of --a, --b'."""
    notes = {}
    for group in parser._mutually_exclusive_groups:
        names = ", ".join(a.option_strings[0] for a in group._group_actions)
        note = f"(exactly one of {names})" if group.required else f"(at most one of {names})"
        for a in group._group_actions:
            notes[id(a)] = note
    return notes


def render_parser(title: str, command: str, parser: argparse.ArgumentParser) -> list[str]:
    """The markdown section of one parser."""
    out = [f"## {title}", "", f"`{command}`" + (f": {_cell(parser.description)}"
                                               if parser.description else ""), ""]
    hidden, notes = [], _exclusive_notes(parser)
    for group in parser._action_groups:  # argparse keeps groups only here
        shown = []
        for a in group._group_actions:
            if not a.option_strings or isinstance(a, argparse._HelpAction):
                continue
            (hidden if a.help == argparse.SUPPRESS else shown).append(a)
        if not shown:
            continue
        if group.title not in ("options", "optional arguments"):
            out += [f"### {group.title}", ""]
        out += _rows(shown, notes) + [""]
    if hidden:
        names = ", ".join(f"`{s}`" for a in hidden for s in a.option_strings)
        out += [f"Also accepted, hidden from `--help` (MindSpeed-LLM launcher compatibility): "
                f"{names}.", ""]
    return out


def render() -> str:
    """The whole of docs/flags.md."""
    import warnings

    warnings.filterwarnings("ignore")  # megatron-core's import-time notices about optional kernels
    lines = ["# Command-line flags", "",
             "Generated from the argument parsers by `python tools/gen_flags_doc.py`; do not edit "
             "by hand (tests/docs/test_flags_doc.py fails when this file is stale). Flag names "
             "follow MindSpeed-LLM / Megatron-LM; see [checkpoint.md](checkpoint.md), "
             "[data.md](data.md), [training.md](training.md) and the README for what they do "
             "together.",
             ""]
    for title, command, factory in SOURCES:
        lines += render_parser(title, command, factory())
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true",
                   help="do not write; exit 1 if docs/flags.md is stale")
    args = p.parse_args(argv)
    text = render()
    if args.check:
        current = open(DOC, encoding="utf-8").read() if os.path.exists(DOC) else ""
        if current != text:
            print("docs/flags.md is stale: run `python tools/gen_flags_doc.py`", file=sys.stderr)
            return 1
        print("docs/flags.md is up to date")
        return 0
    tmp = DOC + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, DOC)
    print(f"wrote {os.path.relpath(DOC, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
