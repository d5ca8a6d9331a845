"""Atomic file writes (temporary file in the same folder, then rename), readers that turn an unreadable or damaged
file into one line naming it, and a log tee.

A crash or kill mid-write leaves either the old file or the new one, never half of one.
"""
import csv
import io
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import yaml

from utils.errors import UserError


def atomic_write_bytes(path, data: bytes):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; records are meant to be shared
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path, text: str):
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_write_yaml(path, obj):
    atomic_write_text(path, yaml.safe_dump(obj, sort_keys=False, allow_unicode=True))


def on_cpu(obj):
    """obj with every tensor in it copied to the CPU (dicts, lists, tuples walked): a file written on a GPU then
    loads with torch.load(path, weights_only=True) on a machine without one."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        out = type(obj)((k, on_cpu(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):   # a state_dict's module versions
            out._metadata = obj._metadata
        return out
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(on_cpu(v) for v in obj)
    return obj


def atomic_torch_save(obj, path):
    """torch.save of obj's CPU copy, written atomically."""
    buf = io.BytesIO()
    torch.save(on_cpu(obj), buf)
    atomic_write_bytes(path, buf.getvalue())


# --- readers: a damaged or unreadable file is one line naming it, never a traceback -------------------------------

DAMAGED = "the file is damaged: make it again (or restore it from a copy)"


def read_bytes(path, what="file") -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise UserError(f"{what} {path} not found") from None
    except IsADirectoryError:
        raise UserError(f"{what} {path} is a folder, not a file") from None
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {e.strerror or e}") from None


def read_text(path, what="file") -> str:
    try:
        return read_bytes(path, what).decode()
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not text (UTF-8); {DAMAGED}") from None


def read_json(path, what="file"):
    """A JSON file holding a mapping."""
    try:
        data = json.loads(read_text(path, what))
    except json.JSONDecodeError as e:
        raise UserError(f"{what} {path} is not valid JSON ({e.msg}, line {e.lineno}); {DAMAGED}") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} {path} holds a {type(data).__name__}, not a mapping; {DAMAGED}")
    return data


def read_yaml(path, what="file") -> dict:
    """A YAML file holding a mapping (an empty file is an empty mapping)."""
    try:
        data = yaml.safe_load(read_text(path, what))
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{what} {path} is not valid YAML ({first}); {DAMAGED}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{what} {path} must hold a mapping of key: value, not a {type(data).__name__}")
    return data


def read_csv_rows(path, what="file") -> list:
    try:
        return list(csv.DictReader(io.StringIO(read_text(path, what))))
    except csv.Error as e:
        raise UserError(f"{what} {path} is not valid CSV ({e}); {DAMAGED}") from None


def load_weights(path, what="file", device="cpu"):
    """torch.load with weights_only=True: tensors and plain containers only, never code."""
    raw = read_bytes(path, what)
    try:
        return torch.load(io.BytesIO(raw), weights_only=True, map_location=device)
    except Exception as e:  # truncated zip, a pickle of objects, another format
        first = (str(e).splitlines() or [""])[0].split(". ")[0][:120]
        raise UserError(f"{what} {path} is not a weights-only tensor file this toolkit can read "
                        f"({type(e).__name__}: {first}); {DAMAGED}") from None


class Tee:
    """Copy everything printed to stdout into log.txt as well (appending, so a resumed run keeps its past)."""

    def __init__(self, path):
        self.file = open(path, "a", buffering=1)
        self.stdout = sys.stdout
        sys.stdout = self

    def write(self, s):
        self.stdout.write(s)
        self.file.write(s)

    def flush(self):
        self.stdout.flush()
        self.file.flush()

    def isatty(self):
        return self.stdout.isatty()

    def close(self):
        if sys.stdout is self:
            sys.stdout = self.stdout
        self.file.close()
