"""Resources: what an attack makes before it poisons (a clean model, a searched pattern, an optimised trigger, a
perturbed image set, an encoder), each a record of its own kind under record/resources/<name>/, found and reused when
it exists, built when it does not, refused when it is incomplete or was made for something else.

- The name is `<kind>_<dataset>_<model>_s<seed>` (the caller may add a part, LF its target); what the resource was
  made from and with (the dataset's digests, every parameter, the resources it was built from) is its identity,
  kept in resource.json beside the digest of every file it holds.
- resource.json is written last: a folder without it is incomplete. A build happens in a hidden sibling folder
  (`.<name>.partial`) that becomes the resource by one rename, so the resource's own folder only ever holds a
  complete resource; an interrupted build leaves the partial folder, which `--resume` continues (model training
  resumes from its checkpoint) and nothing else touches.
- Two processes asking for the same resource (two sweep jobs): the second waits on a lock file until the first has
  built it, then reuses it. The lock is an flock: it goes with the process that held it.
- `--resource_rebuild` moves the existing folder aside as `<name>.old-<UTC time>` and builds anew: nothing is ever
  deleted or overwritten silently.

Nothing in a resource is executed when it is read: tensors come from safetensors files, models from weights-only
loads (utils/model_file.py).
"""
import fcntl
import hashlib
import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


from utils.config import REPO, Opt
from utils.errors import UserError, os_error_message
from utils.io import atomic_write_bytes, atomic_write_json
from utils.poison import tensor_sha256

RESOURCE_VERSION = 1
RESOURCE_FILE = "resource.json"
TENSORS = "tensors.safetensors"


def resource_options():
    return [
        Opt("resource_seed", int, None, "seed of the resources the attack builds (clean model, pattern, ...; default: "
            "random_seed)"),
        Opt("resource_rebuild", rebuild_choice, False, "build resources anew, the existing folders moved aside as "
            "<name>.old-<UTC time>: true (every resource of the run) or kinds, e.g. lc_pgd or lf,clean_model"),
        Opt("resource_root", str, "record/resources", "folder of the resources (relative: to the repository)"),
    ]


def rebuild_choice(v):
    """true / false, or the kinds to rebuild (a YAML list, or 'lc_pgd,clean_model' on the command line)."""
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("true", "false", "1", "0", "yes", "no"):
        return v.lower() in ("true", "1", "yes")
    kinds = v.replace(",", " ").split() if isinstance(v, str) else list(v)
    if not kinds or not all(isinstance(k, str) and k.replace("_", "").isalnum() for k in kinds):
        raise ValueError("expected true, false or resource kinds, e.g. lc_pgd or lf,clean_model")
    return sorted(kinds)


def resource_seed(cfg) -> int:
    return cfg["random_seed"] if cfg.get("resource_seed") is None else cfg["resource_seed"]


def resource_root(cfg) -> Path:
    p = Path(cfg.get("resource_root") or "record/resources")
    return p if p.is_absolute() else REPO / p


def data_identity(dataset) -> dict:
    """What a resource trained or searched on the training split depends on: the split's images and labels."""
    return {"dataset": dataset.info.name, "n_train": len(dataset.y_train), "shape": list(dataset.info.shape),
            "train_labels_sha256": tensor_sha256(dataset.y_train), "train_images_sha256": tensor_sha256(dataset.x_train)}


def file_digest(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def canonical(obj):
    """JSON's view of obj (tuples as lists, keys as strings), so a fresh identity compares equal to a stored one."""
    return json.loads(json.dumps(obj, sort_keys=True))


def flat(d: dict, prefix="") -> dict:
    """Nested identity entries as dotted keys (params.eps), so a refusal names the one setting that differs."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@dataclass
class Resource:
    path: Path
    meta: dict        # resource.json
    built: bool       # built by this call (else reused)

    @property
    def name(self):
        return self.path.name

    def tensors(self) -> dict:
        from safetensors.torch import load_file
        return load_file(str(self.path / TENSORS))

    def digest(self) -> str:
        """The digest of resource.json: what a resource built from this one records as its upstream."""
        return file_digest(self.path / RESOURCE_FILE)

    def describe(self) -> dict:
        """The entry an attack's config.yaml keeps for each resource it used."""
        return {"name": self.name, "path": str(self.path), "built": self.built,
                "build_seconds": self.meta.get("build_seconds"), "resource_sha256": self.digest()}


def save_tensors(folder: Path, tensors: dict):
    from safetensors.torch import save
    atomic_write_bytes(folder / TENSORS, save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}))


def check(path: Path, identity: dict) -> dict:
    """resource.json of a complete resource whose identity is `identity` and whose files match their digests; else
    one UserError saying what is wrong and the ways out."""
    ways = (f"pass another --resource_seed, or --resource_rebuild {identity.get('kind')} to build it anew (the folder "
            "is moved aside), or --resource_root for another folder of resources")
    meta_file = path / RESOURCE_FILE
    if not meta_file.exists():
        raise UserError(f"the resource {path} is incomplete (no {RESOURCE_FILE}: a build that did not finish, or a "
                        f"copy that was cut short); {ways}")
    try:
        meta = json.loads(meta_file.read_text())
        found = meta["identity"]
        files = meta["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{meta_file} is damaged ({type(e).__name__}); {ways}") from None
    if meta.get("complete") is not True:
        raise UserError(f"the resource {path} is incomplete ({RESOURCE_FILE} does not say complete); {ways}")
    wanted, found = flat(canonical(identity)), flat(found)
    differ = sorted(k for k in set(wanted) | set(found) if wanted.get(k) != found.get(k))
    if differ:
        what = "; ".join(f"{k}: wanted {json.dumps(wanted.get(k))}, found {json.dumps(found.get(k))}" for k in differ[:6])
        what += f"; and {len(differ) - 6} more" if len(differ) > 6 else ""
        kind = ("made for another dataset or other training data" if any(k.startswith(("dataset", "train_", "test_",
                "n_train", "shape")) for k in differ) else "stale: a resource it was built from changed" if
                any(k.startswith("upstream") for k in differ) else "made with other settings")
        raise UserError(f"the resource {path} was {kind} ({what}); {ways}")
    for name, digest in files.items():
        f = path / name
        if not f.exists() or file_digest(f) != digest:
            raise UserError(f"the resource {path} is damaged: {name} "
                            f"{'is missing' if not f.exists() else 'does not match its digest'}; pass "
                            "--resource_rebuild to build it anew (the folder is moved aside)")
    return meta


@contextmanager
def build_lock(root: Path, name: str):
    """Exclusive while held; waits (and says so) while another process holds it."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"resource {name}: another process is building it; waiting")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def obtain(root: Path, name: str, identity: dict, build: Callable[[Path, bool], dict], rebuild=False,
           resume=False, resumable=False) -> Resource:
    """The resource `name` under root with this identity: reused when it is there and complete, built by
    build(folder, resume) -> extra entries of resource.json (figures such as a clean model's accuracy) when it is
    not; refused (UserError) when it is there but incomplete, damaged or made for something else (rebuild: true, or
    a list of kinds holding this one: moved aside and built anew). build writes its
    files into `folder`; every file it leaves there is listed with its digest. resumable: build continues an
    interrupted build in `folder` when resume is true (it makes the folder itself); otherwise an interrupted build is
    started again in a fresh folder."""
    path = root / name
    partial = root / f".{name}.partial"
    rebuild = rebuild is True or (not isinstance(rebuild, bool) and identity.get("kind") in rebuild)
    try:
        with build_lock(root, name):
            if path.exists() and rebuild:
                aside = root / f"{name}.old-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
                os.rename(path, aside)
                print(f"--resource_rebuild: the resource {path} is moved to {aside}")
            elif path.exists():
                meta = check(path, identity)
                print(f"resource {name}: reused (built {meta.get('end_time', '?')} in {meta.get('build_seconds', '?')} s"
                      f" on {meta.get('device', '?')})")
                return Resource(path, meta, built=False)
            if partial.exists() and not (resume or rebuild):
                raise UserError(f"an earlier build of the resource {name} was interrupted; its work is kept at "
                                f"{partial}: pass --resume to continue it, or --resource_rebuild to start it again")
            if partial.exists() and (rebuild or not resumable):
                shutil.rmtree(partial)
            resumed = partial.exists()
            if not resumable:
                partial.mkdir(parents=True)
            print(f"resource {name}: {'continuing the interrupted build' if resumed else 'building'} in {partial}")
            t0 = time.time()
            extra = build(partial, resumed)
            seconds = round(time.time() - t0, 2)
            files = {f.name: file_digest(f) for f in sorted(partial.iterdir())
                     if f.is_file() and not f.name.startswith(".") and f.name != RESOURCE_FILE}
            meta = {"kind": identity.get("kind"), "format_version": RESOURCE_VERSION, "identity": canonical(identity),
                    **extra, "files": files, "end_time": time.strftime("%Y-%m-%d %H:%M:%S"), "build_seconds": seconds,
                    **({"resumed": True} if resumed else {}), "complete": True}
            atomic_write_json(partial / RESOURCE_FILE, meta)
            os.rename(partial, path)
            print(f"resource {name}: built in {seconds:.1f} s -> {path}")
            return Resource(path, meta, built=True)
    except OSError as e:
        raise UserError(f"the resource {path} could not be read or written ({os_error_message(e)}); free space or fix "
                        "the permissions of the resource folder (or pass --resource_root), then run the command "
                        "again") from None

