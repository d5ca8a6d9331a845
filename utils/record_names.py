"""Record folders: where a record name leads, what makes a folder a record of this toolkit (its marker), and the
only way one is deleted. Nothing here deletes what it cannot prove is a record of this toolkit."""
import functools
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from utils.config import REPO
from utils.errors import UserError, os_error_message
from utils.io import read_yaml

FORMAT_VERSION = 2            # 2: the trigger's tensors in trigger.safetensors; 1: the pattern in trigger_pattern.png
READABLE_VERSIONS = (1, 2)
RECORD_ROOT = REPO / "record"
MARKER = "record.json"        # written first into every record folder: what makes a folder ours
TOOLKIT = "backdoor-toolkit"


# --- record names ----------------------------------------------------------------------------------------------

def _inside(p: Path, folder: Path) -> bool:
    return p == folder or folder in p.parents


@functools.lru_cache(maxsize=None)
def _note_outside(name: str, path: str):
    print(f"note: record {path} is outside record/" if name == path else
          f"note: record '{name}' is {path}, outside record/")


def record_path(name, root: Path = None) -> Path:
    """--save_folder_name / --result_file -> the record's folder.

    A plain name (e.g. badnet_demo, or sweep_demo/badnet_...) is a folder under record/; a leading 'record/' is
    accepted, as typed from the repository root. An absolute path, or one that starts with ./ or ../, is a path from
    the current directory, and one outside record/ is said once. Refused with one line: '', '.', '..', a name that
    climbs out of record/, record/ itself or any folder above it (the repository, /), and any other folder of the
    repository."""
    root = Path(os.path.realpath(RECORD_ROOT if root is None else root))
    s = str(name)
    if not s.strip() or s.strip() in (".", ".."):
        raise UserError(f"record name {s!r} is not allowed: give a plain name such as badnet_demo "
                        "(a folder under record/), or a path such as ./runs/badnet_demo")
    explicit = os.path.isabs(s) or s.startswith(("./", "../"))
    if explicit:
        p = Path(os.path.realpath(s))
    else:
        rel = s[len("record/"):] if s.startswith("record/") else s
        p = Path(os.path.realpath(root / rel))
        if not _inside(p, root) or p == root:
            raise UserError(f"record name {s!r} leads to {p}, outside record/; give a plain name, or write the path "
                            f"explicitly (./{s} or an absolute path) if that is where the record is")
    if _inside(root, p):
        what = "is the record folder itself" if p == root else f"holds the record folder {root}"
        raise UserError(f"record name {s!r} resolves to {p}, which {what}; a record needs a folder of its own: "
                        "give a plain name such as badnet_demo")
    repo = root.parent
    if _inside(p, repo) and not _inside(p, root):
        raise UserError(f"record name {s!r} resolves to {p}, a folder of the repository; records live under record/ "
                        "(give a plain name) or outside the repository")
    if explicit and not _inside(p, root):
        _note_outside(s, str(p))
    return p


# --- what a folder is ------------------------------------------------------------------------------------------

def is_complete(path: Path) -> bool:
    return (Path(path) / "summary.json").exists()


def is_record(path: Path) -> bool:
    """A folder this toolkit wrote: its marker file, or (records made before the marker existed) a config.yaml
    with the toolkit's own top-level keys."""
    path = Path(path)
    if (path / MARKER).is_file():
        return True
    try:
        meta = read_yaml(path / "config.yaml")
    except UserError:
        return False
    return {"method", "format_version", "versions", "config"} <= set(meta)


def defense_records(path: Path) -> list:
    d = Path(path) / "defense"
    return sorted(p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")) if d.is_dir() else []


def previous_path(path: Path) -> Path:
    """Where --overwrite keeps the old record until the new one is complete."""
    return path.parent / f".{path.name}.previous"


def remove_record(path: Path) -> bool:
    """Delete a record folder: summary.json first, so that a delete that fails half-way never leaves a folder that
    looks complete. Refuses anything that is not a record. Returns False (with a warning) if something stayed."""
    path = Path(path)
    if not is_record(path):
        raise UserError(f"{path} is not a record of this toolkit; it was not deleted")
    failed = []
    try:
        (path / "summary.json").unlink(missing_ok=True)
    except OSError as e:
        failed.append(os_error_message(e))
    shutil.rmtree(path, onerror=lambda fn, p, exc: failed.append(os_error_message(exc[1])
                                                                 if isinstance(exc[1], OSError) else str(exc[1])))
    if failed:
        print(f"warning: could not delete all of {path} ({failed[0]}); delete it by hand", file=sys.stderr)
    return not failed


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except Exception:
        return None


def versions():
    import numpy
    import torchvision
    return {"python": platform.python_version(), "torch": str(torch.__version__),
            "torchvision": str(torchvision.__version__), "numpy": str(numpy.__version__)}


def read_record_config(path: Path) -> dict:
    """config.yaml of a record: the whole mapping, checked to hold the resolved settings under 'config'."""
    meta = read_yaml(Path(path) / "config.yaml", "record file")
    if not isinstance(meta.get("config"), dict):
        raise UserError(f"record file {Path(path) / 'config.yaml'} has no 'config' mapping; the file is damaged: "
                        "make the record again")
    return meta
