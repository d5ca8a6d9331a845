"""Atomic file writes (temporary file in the same folder, then rename) and a log tee.

A crash or kill mid-write leaves either the old file or the new one, never half of one.
"""
import io
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import yaml


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


def atomic_torch_save(obj, path):
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def read_json(path):
    with open(path) as f:
        return json.load(f)


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
