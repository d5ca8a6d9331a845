"""The bad inputs and faults of the data-safety issue, each run as a user would type it, in a temporary copy of the
repository (never this one): the command, its exit code, the one line it printed, and whether the records it could
have touched are byte-identical afterwards.

    python bench/bad_inputs.py              # prints a Markdown table (about a minute on 2 cores)

The copy gets a small Fashion-MNIST (the first 600 training and 200 test images of data/fashion_mnist), a complete
BadNets record `victim` (1 epoch) with an lp defense record inside, and an interrupted run's folder.
"""
import argparse
import gzip
import hashlib
import os
import pathlib
import shutil
import struct
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]

from utils.errors import UserError, run_main

CODE = ("attack", "defense", "utils", "models", "config", "sh", "sweep", "analysis", "bench")


def digest(folder: pathlib.Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode() + p.read_bytes())
    return h.hexdigest()[:12]


def write_small_fmnist(dst: pathlib.Path):
    from utils.data import load_dataset
    d = load_dataset("fashion_mnist", REPO / "data")
    folder = dst / "fashion_mnist"
    folder.mkdir(parents=True)
    parts = {"train-images-idx3-ubyte.gz": d.x_train[:600, 0], "train-labels-idx1-ubyte.gz": d.y_train[:600],
             "t10k-images-idx3-ubyte.gz": d.x_test[:200, 0], "t10k-labels-idx1-ubyte.gz": d.y_test[:200]}
    for name, t in parts.items():
        a = t.numpy().astype("uint8")
        with gzip.open(folder / name, "wb") as f:
            f.write(bytes([0, 0, 8, a.ndim]) + b"".join(struct.pack(">I", s) for s in a.shape) + a.tobytes())


def run(repo, cmd, timeout=600):
    t0 = time.time()
    p = subprocess.run(cmd, cwd=repo, shell=True, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)})
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    return p.returncode, (lines[-1] if lines else "(nothing on stderr)"), time.time() - t0


def cases(data):
    a = f"--dataset_path {data} --epochs 1"
    lp = "--ft_mode lp --epochs 1 --split_ratio 0.1"
    return [
        ("empty name with --overwrite", f"python attack/badnet.py --save_folder_name '' --overwrite {a}"),
        ("'.' with --overwrite", f"python attack/badnet.py --save_folder_name . --overwrite {a}"),
        ("'..' with --overwrite", f"python attack/badnet.py --save_folder_name .. --overwrite {a}"),
        ("the repository's sh/ as a path", f"python attack/badnet.py --save_folder_name ./sh --overwrite {a}"),
        ("the repository root as a path", "python attack/badnet.py --save_folder_name \"$PWD\" --overwrite " + a),
        ("a name climbing out of record/", f"python attack/badnet.py --save_folder_name x/../../y --overwrite {a}"),
        ("a folder that is not a record", f"python attack/badnet.py --save_folder_name notes --overwrite {a}"),
        ("--overwrite, too many poisoned samples", f"python attack/badnet.py --save_folder_name victim --overwrite {a} "
                                                   "--p_num 70000"),
        ("--overwrite, dataset not on disk", f"python attack/badnet.py --save_folder_name victim --overwrite {a} "
                                             "--dataset cifar10"),
        ("--overwrite, batch larger than the data", f"python attack/badnet.py --save_folder_name victim --overwrite {a} "
                                                    "--batch_size 100000"),
        ("defense --overwrite, bad index file", f"python defense/ft.py --result_file victim {lp} --overwrite "
                                                "--index bad_index.txt"),
        ("defense --overwrite, record damaged: config.yaml", f"python defense/ft.py --result_file damaged_yaml {lp}"),
        ("record damaged: truncated summary.json", f"python defense/ft.py --result_file damaged_summary {lp}"),
        ("record damaged: truncated model.pt", f"python defense/ft.py --result_file damaged_model {lp}"),
        ("bench script on a damaged record", "python bench/trigger_strength.py --record damaged_yaml --models damaged_yaml"),
        ("summary written under a file", "python analysis/summarize.py record --out bad_index.txt/summary"),
        ("an interrupted run, no flag", f"python attack/badnet.py --save_folder_name interrupted {a}"),
        ("sweep with bad grid values and a typo", "python sweep/run.py bad_sweep.yaml --dry_run"),
        ("the same sweep, run", "python sweep/run.py bad_sweep.yaml"),
    ]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keep", action="store_true", help="keep the temporary copy and print its path")
    args = p.parse_args(argv)
    if not (REPO / "data" / "fashion_mnist").exists():
        raise UserError("data/fashion_mnist is missing: run `sh sh/install.sh` first")
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bad_inputs_"))
    repo = tmp / "repo"
    for d in CODE:
        shutil.copytree(REPO / d, repo / d, ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "record").mkdir()
    data = tmp / "data"
    write_small_fmnist(data)
    rec = repo / "record"
    print("making the records of the copy ...", file=sys.stderr)
    for cmd in (f"python attack/badnet.py --save_folder_name victim --dataset_path {data} --epochs 1",
                "python defense/ft.py --result_file victim --ft_mode lp --epochs 1 --split_ratio 0.1"):
        rc, line, _ = run(repo, cmd)
        if rc:
            raise UserError(f"setting up the copy failed: {cmd}: {line}")
    for name, file, content in (("damaged_yaml", "config.yaml", b"config: [oops\n"),
                                ("damaged_summary", "summary.json", b'{"test_acc": 0.9,'),
                                ("damaged_model", "model.pt", b"PK\x03\x04")):
        shutil.copytree(rec / "victim", rec / name)
        (rec / name / file).write_bytes(content)
    (rec / "notes").mkdir()
    (rec / "notes" / "thesis.txt").write_text("not a record")
    shutil.copytree(rec / "victim", rec / "interrupted")
    (rec / "interrupted" / "summary.json").unlink()
    (rec / "interrupted" / "checkpoint.pt").write_bytes(b"")
    (repo / "bad_index.txt").write_text("0\n1\nseven\n")
    (repo / "bad_sweep.yaml").write_text("name: bad\ngrid:\n  attack: [badnet]\n  pratio: [0.1, ten, 1.5]\n"
                                         "args:\n  sau: {n_round: 20}\ndefenses: [sau]\n")
    watched = ["victim", "notes", "interrupted"]
    rows = []
    for what, cmd in cases(data):
        before = {w: digest(rec / w) for w in watched}
        before_repo = digest(repo / "sh") + digest(repo / "utils")
        rc, line, seconds = run(repo, cmd)
        after = {w: digest(rec / w) if (rec / w).exists() else "missing" for w in watched}
        intact = after == before and digest(repo / "sh") + digest(repo / "utils") == before_repo
        rows.append((what, cmd.replace(str(data), "DATA"), rc, line.replace(str(tmp), "TMP"), intact, seconds))
    print("| case | command | exit | what it printed (last line of stderr) | records and repository intact |")
    print("|---|---|---|---|---|")
    for what, cmd, rc, line, intact, _ in rows:
        print(f"| {what} | `{cmd}` | {rc} | {line.replace('|', '/')} | {'yes' if intact else 'NO'} |")
    if args.keep:
        print(f"\ncopy kept at {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


if __name__ == "__main__":
    run_main(main)
