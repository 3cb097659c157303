"""One way to build a command line: typed dataclasses are the source of the flags.

A field becomes a flag (``micro_batch_size`` -> ``--micro-batch-size``) whose type, default and
help come from the field itself: the annotation (``int``, ``float``, ``str``, ``Optional[...]``,
``bool`` as a switch, ``list``/``tuple`` as ``nargs="+"``), the default (none: the flag is
required) and the attribute docstring under the field (read with ``ast``). What a type cannot say
goes into :func:`option` metadata (or per-CLI ``overrides``): a MindSpeed flag name, choices, a
parsing function, a ``--no-...`` switch for a field that defaults to True, a hidden flag.

:class:`Parser` reads ``--config FILE.yaml`` through the same parser: each key (a flag name,
dashes or underscores) becomes ``--key=value``, so it gets the flag's type and choices, and the
command line, parsed after it, wins. Every problem (a bad value, an unknown flag or key, a missing
required flag) is collected and raised once through :func:`mindlora.config.fail_if`, so a user
fixes a launcher in one edit. Used by train, generate, convert and preprocess alike.

It imports only mindlora.config, the standard library and yaml, so that every package may build
its command line from it (the start-up shared by train and generate is in runtime/entry.py).
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import inspect
import json
import sys
import textwrap
import types
import typing
from typing import Any, Iterable, Iterator, Optional, Sequence

import yaml

from mindlora.config import fail_if

_MISSING = dataclasses.MISSING


def option(default: Any = _MISSING, *, default_factory: Any = _MISSING, **cli: Any) -> Any:
    """A dataclass field with command-line metadata.

    Args:
        default, default_factory: as for ``dataclasses.field``.
        **cli: ``flag`` (name when it is not ``--<field-name>``), ``aliases`` (more names),
            ``dest`` (the namespace name; default: the field's), ``choices`` (or a callable
            returning them), ``type`` (a parsing function; the flag then takes one token),
            ``nargs`` (for a list field, e.g. ``"*"``), ``metavar``, ``help`` (instead of the
            docstring), ``hidden`` (accepted, not in ``--help``), ``cli=False`` (not a flag).
            A bool field defaulting to True needs a ``flag`` of the form ``--no-...`` (the
            switch turns it off).
    """
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={"cli": cli})


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the attribute docstring written under it, for ``cls`` and its bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):  # no source (frozen app): flags without help, still typed
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def comma_ints(text: str) -> list[int]:
    """``"10,12,8"`` -> ``[10, 12, 8]`` (``--num-layer-list``)."""
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers such as 10,12,8") from None


PARALLEL_OPTIONS: dict[str, dict[str, Any]] = {
    "num_layer_list": {"type": comma_ints, "help": "e.g. 10,12,8"},
    "expert_model_parallel_size": {
        "help": "mixture-of-experts models: split the routed experts over this many ranks"},
}
"""Command-line form of the ParallelConfig fields that train and generate share (an
``overrides`` entry of :meth:`Parser.add_fields`)."""


def json_object(text: str) -> dict:
    """A JSON object given on the command line (``--map-keys '{"prompt": "question"}'``)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg}): {text}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, not {text}")
    return value


def _unwrap(tp: Any) -> Any:
    """``Optional[X]`` -> ``X``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _kwargs(f: dataclasses.Field, tp: Any, meta: dict[str, Any], doc: Optional[str]
            ) -> dict[str, Any]:
    """``add_argument`` keyword arguments for one field."""
    kw: dict[str, Any] = {}
    help_ = meta.get("help", doc)
    if meta.get("hidden"):
        kw["help"] = argparse.SUPPRESS
    elif help_:
        kw["help"] = help_.replace("%", "%%")  # argparse formats help with %
    if f.default is not _MISSING:
        default = f.default
    elif f.default_factory is not _MISSING:
        default = f.default_factory()
    else:
        default, kw["required"] = None, True
    tp = _unwrap(tp)
    if tp is bool and "type" not in meta:
        kw["action"] = "store_false" if default else "store_true"
        return kw
    kw["default"] = list(default) if isinstance(default, tuple) else default
    if "type" in meta:
        kw["type"] = meta["type"]
    elif typing.get_origin(tp) in (list, tuple):
        item = typing.get_args(tp)[0]
        kw["nargs"] = "+"
        if item in (int, float):
            kw["type"] = item
    elif tp in (int, float):
        kw["type"] = tp
    elif tp is not str:
        raise TypeError(f"{f.name}: no command-line form for {tp}; give option(type=...)")
    if "nargs" in meta:
        kw["nargs"] = meta["nargs"]
    if "choices" in meta:
        choices = meta["choices"]
        kw["choices"] = list(choices() if callable(choices) else choices)
    if "metavar" in meta:
        kw["metavar"] = meta["metavar"]
    return kw


class Parser(argparse.ArgumentParser):
    """argparse built from dataclasses; :meth:`parse` collects every problem and raises one
    ValueError (never ``sys.exit``, except for ``--help``)."""

    def __init__(self, prog: str, description: str, config: bool = True, **kw: Any) -> None:
        super().__init__(prog=prog, description=description, allow_abbrev=False,
                         exit_on_error=False, **kw)
        self._sources: dict[type, dict[str, str]] = {}
        if config:
            self.add_argument("--config", metavar="FILE.yaml",
                              help="YAML file whose keys are flag names; the command line wins")

    def error(self, message: str):
        raise ValueError(message)

    def add_fields(self, cls: type, names: Optional[Iterable[str]] = None, *,
                   group: Any = None, prefix: str = "",
                   overrides: Optional[dict[str, dict[str, Any]]] = None) -> None:
        """Add a flag for each field of ``cls`` (``names``, in that order; default: all).

        Args:
            group: an argument group (or mutually exclusive group) to add them to.
            prefix: put before a field's name in its flag (``lora_`` makes ``r`` ``--lora-r``).
            overrides: field name -> :func:`option` metadata that this CLI adds or replaces.
        """
        hints = typing.get_type_hints(cls)
        docs = field_docs(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        target = group if group is not None else self
        dests = self._sources.setdefault(cls, {})
        for name in (list(names) if names is not None else list(fields)):
            f = fields[name]
            meta = {**f.metadata.get("cli", {}), **(overrides or {}).get(name, {})}
            if not meta.get("cli", True):
                continue
            flag = meta.get("flag") or "--" + (prefix + name).replace("_", "-")
            doc = docs.get(name, "").replace(f" (``{flag}``)", "")  # the flag naming itself
            kw = _kwargs(f, hints[name], meta, doc)
            if kw.get("action") == "store_false" and not flag.startswith("--no-"):
                raise TypeError(f"{cls.__name__}.{name} defaults to True: its flag must be "
                                f"--no-..., not {flag}")
            dest = meta.get("dest") or (prefix + name)
            target.add_argument(flag, *meta.get("aliases", ()), dest=dest, **kw)
            dests[name] = dest

    def build(self, cls: type, ns: argparse.Namespace, **extra: Any) -> Any:
        """``cls`` from the parsed values of its flags (tuple fields get tuples) plus ``extra``.

        The dataclass's own ``__post_init__`` validates (and raises naming the flags)."""
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for name, dest in self._sources[cls].items():
            value = getattr(ns, dest)
            if isinstance(value, list) and typing.get_origin(_unwrap(hints[name])) is tuple:
                value = tuple(value)
            kwargs[name] = value
        return cls(**{**kwargs, **extra})

    # -- parsing ------------------------------------------------------------------------------
    def parse(self, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
        """Parse ``argv`` (and ``--config FILE.yaml``); one ValueError names every problem."""
        argv = list(sys.argv[1:] if argv is None else argv)
        errors: list[str] = []
        tokens: list[str] = []
        path = self._config_path(argv)
        if path is not None:
            tokens = self._yaml_tokens(path, errors)
            with self._nothing_required():
                tokens, problems = self._collect(tokens)[1:]
            errors += [f"{path}: {p}" for p in problems]
        ns, _, problems = self._collect(tokens + argv)
        fail_if(errors + problems, "flags")
        return ns

    def _config_path(self, argv: list[str]) -> Optional[str]:
        if "--config" not in self._option_string_actions:
            return None
        pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
        pre.add_argument("--config")
        return pre.parse_known_args(argv)[0].config

    def _collect(self, tokens: list[str]) -> tuple[Optional[argparse.Namespace], list[str],
                                                   list[str]]:
        """Parse, dropping each flag argparse rejects and going on, so that every bad flag is
        reported at once; returns the namespace, the tokens that parsed, and the problems."""
        problems: list[str] = []
        for _ in range(len(tokens) + 1):
            try:
                ns, unknown = self.parse_known_args(tokens)
            except argparse.ArgumentError as e:
                problems.append(str(e))
                shorter = self._without(tokens, e.argument_name)
                if shorter == tokens:
                    return None, tokens, problems
                tokens = shorter
                continue
            except ValueError as e:  # self.error: a required flag missing
                with self._nothing_required():
                    unknown = self.parse_known_args(tokens)[1]
                return None, tokens, problems + self._unknown(unknown) + [str(e)]
            if unknown:
                problems += self._unknown(unknown)
                tokens = [t for t in tokens if t not in unknown]
            return ns, tokens, problems
        return None, tokens, problems

    def _unknown(self, tokens: list[str]) -> list[str]:
        return [f"unknown flag(s): {' '.join(tokens)} (see {self.prog} --help)"] if tokens else []

    def _without(self, tokens: list[str], name: Optional[str]) -> list[str]:
        """``tokens`` less the flag ``name`` (``--a/--b`` for aliases) and the values it took."""
        names = set((name or "").split("/"))
        action = next((self._option_string_actions[n] for n in names
                       if n in self._option_string_actions), None)
        out, i = [], 0
        while i < len(tokens):
            token = tokens[i]
            i += 1
            if token.split("=", 1)[0] not in names:
                out.append(token)
                continue
            if "=" in token or action is None or action.nargs == 0:
                continue
            while i < len(tokens) and not tokens[i].startswith("--"):
                i += 1
                if action.nargs not in ("+", "*"):
                    break
        return out

    @contextlib.contextmanager
    def _nothing_required(self) -> Iterator[None]:
        """Required flags may come from the command line: a YAML file alone is checked
        without them."""
        items = [a for a in self._actions if a.required] + [
            g for g in self._mutually_exclusive_groups if g.required]
        for item in items:
            item.required = False
        try:
            yield
        finally:
            for item in items:
                item.required = True

    def _yaml_tokens(self, path: str, errors: list[str]) -> list[str]:
        """The YAML file as command-line tokens (``--flag=value``); problems go to ``errors``."""
        try:
            with open(path) as f:
                loaded = yaml.safe_load(f) or {}
        except OSError as e:
            errors.append(f"--config {path}: {e.strerror}")
            return []
        except yaml.YAMLError as e:
            errors.append(f"{path}: not valid YAML: {str(e).splitlines()[0]}")
            return []
        if not isinstance(loaded, dict):
            errors.append(f"{path}: expected a mapping of flag names to values")
            return []
        by_key = {s[2:].replace("-", "_"): a for a in self._actions for s in a.option_strings
                  if s.startswith("--") and s not in ("--config", "--help")}
        unknown = [k for k in loaded if str(k).replace("-", "_") not in by_key]
        if unknown:
            example = next(iter(by_key)).replace("_", "-")
            errors.append(f"{path}: unknown key(s) {unknown}; keys are flag names such as "
                          f"{example}")
        tokens: list[str] = []
        for key, value in loaded.items():
            action = by_key.get(str(key).replace("-", "_"))
            if action is None or value is None:
                continue
            flag = action.option_strings[0]
            if action.nargs == 0:
                if not isinstance(value, bool):
                    errors.append(f"{path}: {key}: expected true or false, not {value!r}")
                elif value:
                    tokens.append(flag)
            elif action.nargs in ("+", "*"):
                items = value.split() if isinstance(value, str) else value
                if not isinstance(items, list) or not items:
                    errors.append(f"{path}: {key}: expected a list or a space-separated string")
                else:
                    tokens += [flag, *map(str, items)]
            elif isinstance(value, (list, dict, bool)) and action.type is not json_object:
                errors.append(f"{path}: {key}: expected one value, not {value!r}")
            else:
                text = json.dumps(value) if isinstance(value, dict) else str(value)
                tokens.append(f"{flag}={text}")
        return tokens
