"""Typed, layered configuration (conventions §5).

Attacks: command line > --yaml_path > config/attack/<attack>/<dataset>.yaml > config/attack/<attack>/default.yaml >
config/attack/prototype/<dataset>.yaml. Defenses: command line > --yaml_path > config/defense/<defense>/<dataset>.yaml >
config/defense/<defense>/default.yaml (each file optional) > the options' spec values.
Every key is declared once as an Opt with a type, a default and a range check; unknown keys, wrong types and
out-of-range values are errors that name the key and what is allowed.
"""
import argparse
import difflib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from utils.errors import UserError
from utils.io import read_yaml as read_yaml_file

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "config"


@dataclass
class Opt:
    name: str
    type: Any                 # int, float, bool, str, or a callable parsing the value (raises ValueError)
    default: Any = None
    help: str = ""
    choices: Optional[tuple] = None
    check: Optional[Callable[[Any], Optional[str]]] = None  # returns a message saying what is allowed, or None
    cli: bool = True


def in_range(lo=None, hi=None, lo_open=False, hi_open=False):
    def check(v):
        if v is None:
            return None
        bad = (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and (v >= hi if hi_open else v > hi))
        if bad:
            left = "(" if lo_open else "["
            right = ")" if hi_open else "]"
            return f"allowed: {left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
        return None
    return check


NONE_WORDS = ("none", "null")


def _coerce(opt: Opt, value, where: str):
    # an option whose default is None ("not set") takes none / null from the command line as well as from YAML
    if value is None or (opt.default is None and isinstance(value, str) and value.lower() in NONE_WORDS):
        return None
    t = opt.type
    try:
        if t is bool:
            if isinstance(value, bool):
                out = value
            elif isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                out = value.lower() in ("true", "1", "yes")
            else:
                raise ValueError("expected true or false")
        elif t is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError("expected an integer")
            try:
                out = int(value)
            except ValueError:
                raise ValueError("expected an integer") from None
        elif t is float:
            if isinstance(value, bool):
                raise ValueError("expected a number")
            try:
                out = float(value)
            except ValueError:
                raise ValueError("expected a number") from None
        elif t is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError("expected a string")
            out = str(value)
        else:
            out = t(value)
    except (ValueError, TypeError) as e:
        raise UserError(f"{opt.name} = {value!r} ({where}): {e}") from None
    if opt.choices is not None and out not in opt.choices:
        raise UserError(f"{opt.name} = {out!r} ({where}) is not allowed; choose one of: {', '.join(map(str, opt.choices))}")
    if opt.check is not None:
        msg = opt.check(out)
        if msg:
            raise UserError(f"{opt.name} = {out!r} ({where}) is out of range; {msg}")
    return out


def read_yaml(path) -> dict:
    return read_yaml_file(path, "config file")


RUN_FLAGS = ("yaml_path", "overwrite", "resume")


class Parser(argparse.ArgumentParser):
    """argparse whose mistakes are UserErrors (one line, and catchable by the sweep's checks), and whose unknown
    options name the closest known ones."""

    def error(self, message):
        raise UserError(f"{message}; see `python {self.prog} --help`")

    def parse_args(self, args=None, namespace=None):
        ns, extra = self.parse_known_args(args, namespace)
        if extra:
            known = [s for a in self._actions for s in a.option_strings]
            flags = [a.split("=", 1)[0] for a in extra if a.startswith("-")] or extra[:1]
            close = difflib.get_close_matches(flags[0], known, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            self.error(f"unknown option {' '.join(flags)}{hint}" if flags[0].startswith("-") else
                       f"unexpected argument {flags[0]!r}")
        return ns


def build_parser(prog: str, opts: list, description: str = "", shown=None, add_help=True) -> argparse.ArgumentParser:
    """shown: {option: the value this command will use}, printed by --help beside the spec's value."""
    # allow_abbrev off: `--trig blend` must not silently mean --trigger
    p = Parser(prog=prog, description=description, allow_abbrev=False, add_help=add_help,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--yaml_path", default=None, help="a YAML file of settings, above the defaults, below the command line")
    p.add_argument("--overwrite", action="store_true", help="replace an existing record of the same name")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    for o in opts:
        if not o.cli:
            continue
        used = (shown or {}).get(o.name, o.default)
        note = f"default: {used}" + (f"; spec: {o.default}" if used != o.default else "")
        kw = dict(default=None, help=f"{o.help} ({note})".strip())
        if o.type is bool:
            kw["metavar"] = "{true,false}"
        elif o.choices:
            kw["metavar"] = "{" + ",".join(map(str, o.choices)) + "}"
        p.add_argument(f"--{o.name}", **kw)
    return p


def layered_config(prog: str, opts: list, description: str, argv, layers_for, fixed=None):
    """Parse argv and resolve the settings: option defaults < layers_for(cli, user_yaml) (files, lowest first) <
    --yaml_path < command line. --help shows the value each option will take for this command (its dataset's files
    resolved) beside the spec's value. fixed: {option: value} an entry point pins (a different value is an error).
    Returns (cfg, args)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre, _ = build_parser(prog, opts, add_help=False).parse_known_args(argv)
    if any(a in ("-h", "--help") for a in argv):
        try:
            shown = resolve(opts, _file_layers(layers_for, cli_values(pre), pre.yaml_path))
        except UserError:
            shown = None
        build_parser(prog, opts, description, shown).parse_args(argv)   # prints the help and exits
    args = build_parser(prog, opts, description).parse_args(argv)
    cli = cli_values(args)
    for k, v in (fixed or {}).items():
        if k in cli and cli[k] != str(v):
            raise UserError(f"{prog} runs {k} {v} only (got {cli[k]})")
        cli[k] = v
    layers = _file_layers(layers_for, cli, args.yaml_path)
    return resolve(opts, layers + [("command line", cli)]), args


def _file_layers(layers_for, cli, yaml_path) -> list:
    user = read_yaml(yaml_path) if yaml_path else {}
    return layers_for(cli, user) + ([(yaml_path, user)] if yaml_path else [])


def resolve(opts: list, layers: list) -> dict:
    """layers: [(where, dict)] from lowest to highest precedence. Returns every key, typed and checked."""
    by_name = {o.name: o for o in opts}
    cfg = {o.name: o.default for o in opts}
    where_from = {o.name: "default" for o in opts}
    for where, values in layers:
        for k, v in values.items():
            if k not in by_name:
                close = [n for n in by_name if n.startswith(k[:4])][:5]
                raise UserError(f"unknown key '{k}' in {where}" + (f"; did you mean: {', '.join(close)}?" if close else
                                                                  "; see --help for the accepted keys"))
            cfg[k] = v
            where_from[k] = where
    return {k: _coerce(by_name[k], v, where_from[k]) for k, v in cfg.items()}


def cli_values(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if v is not None and k not in RUN_FLAGS}


def format_config(cfg: dict) -> str:
    width = max(map(len, cfg)) if cfg else 0
    return "\n".join(f"  {k:<{width}} : {v}" for k, v in cfg.items())


def spec_deviations(method_opts: list, cfg: dict, spec: dict = None, skip=()) -> list:
    """The method's settings that differ from its specification: the options' defaults (the spec's), updated by
    `spec` (per-dataset values of the spec), except the names in `skip`. Listed under 'deviations' in config.yaml."""
    ref = {o.name: o.default for o in method_opts if o.name not in skip}
    ref.update(spec or {})
    return [f"{k} = {cfg[k]!r} (spec: {v!r})" for k, v in ref.items() if k in cfg and cfg[k] != v]
