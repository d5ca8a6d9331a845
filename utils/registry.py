"""The registry of methods. Every attack and defense declares itself once, in its own file, by decorating its
`configure` function (the function that resolves and checks its settings without writing anything):

    @register("badnet", "attack", paper="Gu et al., arXiv 1708.06733", summary="a small patch ...", options=OPTIONS)
    def configure(argv=None): ...

Sweeps, sh/demo.sh, the README's methods table (checked by a test) and `python sweep/run.py --list` read it;
nothing else holds a table of method names. The registry imports no method: discover() imports the files of
attack/ and defense/, whose decorators fill it. One script may register several entries (ft.py's tuning modes,
bypass.py's two triggers), each with the fixed arguments that select it.
"""
import importlib
import pkgutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from utils.config import REPO
from utils.errors import UserError

KINDS = ("attack", "defense")
NEEDS = ("dataset", "trained_model", "clean_subset", "poisoned_train_set", "clean_model")


@dataclass(frozen=True)
class Method:
    name: str
    kind: str
    script: str                # path from the repository root, e.g. attack/badnet.py
    paper: str
    summary: str
    options: tuple             # its Opt declarations (shared groups included)
    configure: Callable        # configure(argv) for attacks, configure(argv, dataset=None) for defenses
    needs: tuple = ()          # what it needs from the world (NEEDS)
    args: tuple = ()           # fixed arguments selecting this entry (may use {dataset})
    requires: tuple = ()       # files that must exist for a dataset (templated with {dataset})
    out: str = None            # a defense's folder under <record>/defense/ (default: the name)
    listed: bool = True        # a row in listings and the README (False: a configuration of a listed entry)

    def command(self) -> list:
        return [self.script, *self.args]


REGISTRY: dict = {}


def _script_of(fn) -> str:
    path = Path(sys.modules[fn.__module__].__file__).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def register(name, kind, paper, summary, options=(), needs=(), args=(), requires=(), out=None, listed=True):
    """Decorator of a method's configure(): adds one entry. The same script may register the same name again (a
    script run as __main__ and later imported by name); another script may not."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: one of {KINDS}")
    unknown = set(needs) - set(NEEDS)
    if unknown:
        raise ValueError(f"needs {sorted(unknown)}: allowed {NEEDS}")

    def add(configure):
        m = Method(name, kind, _script_of(configure), paper, summary, tuple(options), configure, tuple(needs),
                   tuple(args), tuple(requires), out, listed)
        old = REGISTRY.get(name)
        if old is not None and old.script != m.script:
            raise ValueError(f"method name {name!r} is registered by {old.script} and {m.script}")
        REGISTRY[name] = m
        return configure
    return add


def discover() -> dict:
    """Import every file of attack/ and defense/ so that their declarations are in REGISTRY; returns it."""
    for package in KINDS:
        for info in pkgutil.iter_modules([str(REPO / package)]):
            importlib.import_module(f"{package}.{info.name}")
    return REGISTRY


def methods(kind=None, listed_only=False) -> list:
    discover()
    return [m for m in REGISTRY.values() if (kind is None or m.kind == kind) and (m.listed or not listed_only)]


def get(name: str) -> Method:
    discover()
    if name not in REGISTRY:
        raise UserError(f"unknown method {name!r}; known: {', '.join(sorted(REGISTRY))} "
                        "(`python sweep/run.py --list` shows them)")
    return REGISTRY[name]
