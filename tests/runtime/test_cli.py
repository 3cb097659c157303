"""One CLI style: parsers built from dataclasses, YAML through the same parser, one error.

The four commands (train, generate, convert, preprocess) are checked through their own parse
functions; the console scripts declared in setup.py are imported and run with ``--help``.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional

import pytest

from mindlora.runtime.cli import Parser, comma_ints, field_docs, json_object, option
from mindlora.runtime.entry import run_main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class Demo:
    """A config whose fields are flags."""

    name: str
    """Required: no default."""
    steps: int = 3
    """How many steps."""
    rate: Optional[float] = None
    mode: str = option("fast", choices=("fast", "slow"))
    """Speed: fast or slow (100% honest)."""
    verbose: bool = False
    color: bool = option(True, flag="--no-color", help="plain output")
    layers: Optional[list[int]] = option(None, type=comma_ints)
    keys: tuple[str, ...] = ("text",)
    mapping: dict = option(default_factory=dict, type=json_object)
    legacy: bool = option(False, hidden=True)
    internal: int = option(0, cli=False)


def _demo_parser() -> Parser:
    p = Parser("demo", "A demo command.")
    p.add_fields(Demo)
    return p


def test_parser_is_built_from_the_dataclass():
    p = _demo_parser()
    by_flag = {s: a for a in p._actions for s in a.option_strings}
    assert by_flag["--name"].required and by_flag["--name"].help == "Required: no default."
    assert by_flag["--steps"].type is int and by_flag["--steps"].default == 3
    assert by_flag["--steps"].help == "How many steps."
    assert by_flag["--rate"].type is float and by_flag["--rate"].default is None
    assert by_flag["--mode"].choices == ["fast", "slow"] and by_flag["--mode"].default == "fast"
    assert by_flag["--mode"].help == "Speed: fast or slow (100%% honest)."  # argparse's % escape
    assert isinstance(by_flag["--verbose"], argparse._StoreTrueAction)
    assert isinstance(by_flag["--no-color"], argparse._StoreFalseAction)
    assert by_flag["--no-color"].dest == "color" and by_flag["--no-color"].help == "plain output"
    assert by_flag["--keys"].nargs == "+" and by_flag["--keys"].default == ["text"]
    assert by_flag["--legacy"].help == argparse.SUPPRESS
    assert "--internal" not in by_flag and "--config" in by_flag
    assert field_docs(Demo)["steps"] == "How many steps." and "rate" not in field_docs(Demo)
    assert "How many steps." in p.format_help()


def test_parsed_values_are_typed_and_build_the_dataclass():
    p = _demo_parser()
    ns = p.parse(["--name", "x", "--steps", "7", "--rate", "1e-3", "--mode", "slow", "--verbose",
                  "--no-color", "--layers", "1,2,3", "--keys", "a", "b",
                  "--mapping", '{"prompt": "q"}'])
    demo = p.build(Demo, ns)
    assert demo == Demo(name="x", steps=7, rate=1e-3, mode="slow", verbose=True, color=False,
                        layers=[1, 2, 3], keys=("a", "b"), mapping={"prompt": "q"})
    assert p.build(Demo, p.parse(["--name", "y"])) == Demo(name="y")


def test_every_bad_flag_is_reported_in_one_error():
    with pytest.raises(ValueError) as info:
        _demo_parser().parse(["--steps", "many", "--mode", "medium", "--layers", "1,x",
                              "--mapping", "{bad", "--bogus", "1"])
    text = str(info.value)
    assert text.startswith("invalid flags:")
    for piece in ("argument --steps: invalid int value: 'many'",
                  "argument --mode: invalid choice: 'medium'",
                  "argument --layers: '1,x': expected integers such as 10,12,8",
                  "argument --mapping: not valid JSON",
                  "unknown flag(s): --bogus 1 (see demo --help)",
                  "the following arguments are required: --name"):
        assert piece in text, (piece, text)


def test_yaml_goes_through_the_same_parser(tmp_path):
    cfg = tmp_path / "demo.yaml"
    cfg.write_text("name: from-yaml\nsteps: '5'\nrate: 1e-4\nno_color: true\nlayers: 2,2\n"
                   "keys: [a, b]\nmapping: {prompt: q}\n")
    demo = _demo_parser().build(Demo, _demo_parser().parse(["--config", str(cfg), "--steps", "9"]))
    assert demo.steps == 9  # the command line wins
    assert demo.name == "from-yaml" and demo.rate == 1e-4 and isinstance(demo.rate, float)
    assert not demo.color and demo.layers == [2, 2] and demo.keys == ("a", "b")
    assert demo.mapping == {"prompt": "q"}
    cfg.write_text("steps: lots\nmode: medium\nverbose: 1\ncolour: true\n")
    with pytest.raises(ValueError) as info:
        _demo_parser().parse(["--config", str(cfg), "--name", "x"])
    text = str(info.value)
    for piece in (f"{cfg}: unknown key(s) ['colour']", f"{cfg}: verbose: expected true or false",
                  f"{cfg}: argument --steps: invalid int value: 'lots'",
                  f"{cfg}: argument --mode: invalid choice: 'medium'"):
        assert piece in text, (piece, text)
    with pytest.raises(ValueError, match="--config .*missing.yaml: No such file"):
        _demo_parser().parse(["--config", str(tmp_path / "missing.yaml"), "--name", "x"])


def test_a_field_without_a_command_line_form_is_a_programming_error():
    @dataclass
    class NoForm:
        table: dict = None

    @dataclass
    class WrongSwitch:
        color: bool = True

    with pytest.raises(TypeError, match="table: no command-line form"):
        Parser("x", "").add_fields(NoForm)
    with pytest.raises(TypeError, match="WrongSwitch.color defaults to True: its flag must be "
                                        "--no-..."):
        Parser("x", "").add_fields(WrongSwitch)


# -- the four commands ------------------------------------------------------------------------
def _train(path, extra):
    from mindlora.training.args import parse_args

    run = parse_args(["--config", path, *extra])
    return run.train.micro_batch_size, run.train.lr, run.lora.target_modules


def _generate(path, extra):
    from mindlora.generation.args import parse_args

    cfg = parse_args(["--config", path, *extra])
    return cfg.micro_batch_size, cfg.sampling.temperature, cfg.parallel.num_layer_list


def _convert(path, extra):
    from mindlora.checkpoint.cli import parse_options

    opts = parse_options(["--config", path, *extra])
    return opts.target_tensor_parallel_size, opts.lora_alpha, opts.progress


def _preprocess(path, extra):
    from mindlora.data.cli import config_from_args

    cfg = config_from_args(["--config", path, *extra])
    return cfg.workers, cfg.map_keys, cfg.json_keys


# (parse, YAML text, the flag that overrides it on the command line, expected values)
COMMANDS = {
    "train": (_train, "load: base\ndata-path: d\nmicro_batch_size: 2\nlr: 3e-4\n"
                      "lora-target-modules: linear_qkv linear_fc2\n",
              ["--micro-batch-size", "4"], (4, 3e-4, ("linear_qkv", "linear_fc2"))),
    "generate": (_generate, "load: base\ntokenizer-name-or-path: tok\nprompt-type: qwen\n"
                            "prompts: p.jsonl\nmicro-batch-size: 2\ntemperature: 5e-1\n"
                            "pipeline-model-parallel-size: 2\nnum-layer-list: 3,1\n",
                 ["--micro-batch-size", "4"], (4, 0.5, [3, 1])),
    "convert": (_convert, "load-model-type: hf\nsave-model-type: mg\nsave-dir: out\n"
                          "target-tensor-parallel-size: 2\nlora-alpha: 16\nno-progress: true\n",
                ["--target-tensor-parallel-size", "4"], (4, 16.0, False)),
    "preprocess": (_preprocess, "input: x.jsonl\ntokenizer-name-or-path: tok\noutput-prefix: o\n"
                                "prompt-type: qwen3\nworkers: 2\nmap-keys: {prompt: question}\n"
                                "json-keys: [body]\n",
                   ["--workers", "3"], (3, {"prompt": "question"}, ("body",))),
}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_yaml_for_each_command(tmp_path, name):
    parse, text, override, expected = COMMANDS[name]
    cfg = tmp_path / "run.yaml"
    cfg.write_text(text)
    got = parse(str(cfg), override)
    assert got == expected and type(got[1]) is type(expected[1])  # typed, CLI wins
    cfg.write_text(text + "bogus-key: 1\n")
    with pytest.raises(ValueError, match=r"run\.yaml: unknown key\(s\) \['bogus-key'\]"):
        parse(str(cfg), [])


def _console_scripts() -> dict[str, str]:
    """name -> "module:function" from setup.py's entry_points (read with ast, not installed)."""
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "entry_points":
            scripts = ast.literal_eval(node.value)["console_scripts"]
            return dict(tuple(part.strip() for part in s.split("=")) for s in scripts)
    return {}


def test_console_scripts_import_and_answer_help(capsys):
    scripts = _console_scripts()
    assert set(scripts) == {"mindlora-train", "mindlora-generate", "mindlora-convert",
                            "mindlora-preprocess"}
    for name, target in scripts.items():
        module, func = target.split(":")
        main = getattr(importlib.import_module(module), func)
        assert callable(main), target
        with pytest.raises(SystemExit) as info:
            main(["--help"])
        assert info.value.code == 0, name
        out = capsys.readouterr().out
        assert out.startswith("usage: ") and "--config FILE.yaml" in out, name


def test_entry_points_report_bad_flags_on_one_line(capsys):
    from mindlora.checkpoint.cli import main as convert_main
    from mindlora.generate import main as generate_main

    assert generate_main(["--load", "x", "--top-k", "many"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mindlora.generate: error: invalid flags:")
    assert "argument --top-k: invalid int value: 'many'" in err
    assert "the following arguments are required: --tokenizer-name-or-path" in err
    assert convert_main(["--load-model-type", "xx"]) == 2
    assert "argument --load-model-type: invalid choice: 'xx'" in capsys.readouterr().err


def test_run_main_tears_down_and_maps_errors(capsys):
    ran = []

    def fail(cfg):
        ran.append(cfg)
        raise OSError("disk full")

    assert run_main("tool", lambda argv: argv, ran.append, ["a"]) == 0 and ran == [["a"]]
    assert run_main("tool", lambda argv: argv, fail, ["b"]) == 2
    assert capsys.readouterr().err == "tool: error: disk full\n"

    def bad(argv):
        raise ValueError("invalid flags: x")

    assert run_main("tool", bad, fail, []) == 2 and len(ran) == 2  # never ran
    assert capsys.readouterr().err == "tool: error: invalid flags: x\n"


def test_tools_are_thin_and_run_from_a_checkout():
    for tool in ("convert_ckpt.py", "preprocess_data.py"):
        text = open(os.path.join(ROOT, "tools", tool)).read()
        assert "sys.path" not in text and "argparse" not in text, tool
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONWARNINGS="ignore")
    for tool in ("convert_ckpt.py", "preprocess_data.py"):
        done = subprocess.run([sys.executable, os.path.join(ROOT, "tools", tool), "--help"],
                              capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0 and "--config FILE.yaml" in done.stdout, done.stderr


def test_the_cli_module_stays_at_the_bottom():
    """Every package builds its command line with runtime/cli.py, so it imports nothing of
    mindlora but config (and no torch): only the standard library, yaml and mindlora.config."""
    path = os.path.join(ROOT, "mindlora", "runtime", "cli.py")
    tree = ast.parse(open(path).read())
    names = {alias.name for n in ast.walk(tree) if isinstance(n, ast.Import) for alias in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    outside = {n for n in names if n.split(".")[0] not in sys.stdlib_module_names}
    assert outside == {"yaml", "mindlora.config"}, outside
