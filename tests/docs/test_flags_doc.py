"""docs/flags.md is generated from the argument parsers; this fails when it is stale."""
import argparse
import os

from tools.gen_flags_doc import DOC, render, render_parser

REGENERATE = "docs/flags.md is stale: regenerate it with `python tools/gen_flags_doc.py`"


def test_flags_doc_matches_the_parsers():
    with open(DOC, encoding="utf-8") as f:
        assert f.read() == render(), REGENERATE


def test_every_visible_flag_is_documented():
    from mindlora.data.cli import build_parser as preprocess_parser
    from mindlora.generation.args import build_parser as generate_parser
    from mindlora.training.args import build_parser as train_parser
    from mindlora.checkpoint.cli import parser as convert_parser

    text = render()
    for parser in (train_parser(), preprocess_parser(), generate_parser(), convert_parser()):
        for action in parser._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help") and action.help != argparse.SUPPRESS:
                    assert f"`{flag}`" in text, flag


def test_render_shows_types_defaults_groups_and_hidden_flags():
    p = argparse.ArgumentParser(prog="x", description="Demo | tool.")
    p.add_argument("--need", required=True, help="must be given")
    p.add_argument("--n", type=int, default=3)
    p.add_argument("--mode", choices=["a", "b"], default="a")
    p.add_argument("--many", nargs="+", default=["p", "q"])
    g = p.add_argument_group("extras")
    g.add_argument("--on", action="store_true", help="a switch")
    p.add_argument("--legacy", action="store_true", help=argparse.SUPPRESS)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--file")
    src.add_argument("--stdin", action="store_true", help="read stdin")
    lines = render_parser("Demo", "python x.py", p)
    assert lines[2] == "`python x.py`: Demo \\| tool."
    assert "| `--need` | str | **required** | must be given |" in lines
    assert "| `--n` | int | 3 |  |" in lines
    assert "| `--mode` | {a, b} | a |  |" in lines
    assert "| `--many` | str ... | p q |  |" in lines
    assert lines.index("### extras") < lines.index("| `--on` | switch |  | a switch |")
    assert not any("`--legacy` |" in ln for ln in lines)
    assert "| `--file` | str |  | (exactly one of --file, --stdin) |" in lines
    assert "| `--stdin` | switch |  | (exactly one of --file, --stdin) read stdin |" in lines
    assert lines[-2].endswith("launcher compatibility): `--legacy`.")


def test_check_mode_reports_a_stale_file(tmp_path, monkeypatch, capsys):
    import tools.gen_flags_doc as gen

    stale = tmp_path / "flags.md"
    stale.write_text("old\n")
    monkeypatch.setattr(gen, "DOC", str(stale))
    assert gen.main(["--check"]) == 1
    assert "python tools/gen_flags_doc.py" in capsys.readouterr().err
    assert gen.main([]) == 0 and stale.read_text() == render()
    assert gen.main(["--check"]) == 0
    assert os.path.exists(stale)
