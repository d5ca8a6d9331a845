"""Never lose a record: record names, --overwrite that moves the old record aside until the new one is complete,
damaged files and faults as one line, a training set smaller than a batch, download time-outs, sweeps checked
before they run. Nothing here touches the repository's own folders: the dangerous names run in a copy of it."""
import errno
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from attack import badnet
from tests.conftest import REPO, make_record
from defense import ft
from utils.errors import UserError, run_main
from utils.record_names import MARKER, is_record, previous_path, record_path, remove_record
from utils.run_folder import Run


def tree_digest(folder: Path) -> dict:
    """{relative path: sha256} of every file under folder: equal digests mean nothing was lost or changed."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(capsys, main, argv, code=2):
    """Run a script's main through run_main; it must exit with `code` and print exactly one line, 'error: ...'."""
    with pytest.raises(SystemExit) as e:
        run_main(main, argv)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert e.value.code == code, err
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    return err[0]


def lp(record, *extra):
    return ["--result_file", str(record), "--ft_mode", "lp", "--epochs", "1", "--split_ratio", "0.1",
            "--batch_size", "32", *extra]


@pytest.fixture(scope="module")
def defended_record(tmp_path_factory, fake_root):
    """A complete BadNets record with a complete lp defense record inside."""
    path = tmp_path_factory.mktemp("safe") / "badnet_safe"
    make_record(path, fake_root)
    ft.main(lp(path))
    return path


# --- 2. record names -----------------------------------------------------------------------------------------

@pytest.fixture
def fake_repo(tmp_path):
    root = tmp_path / "repo" / "record"
    root.mkdir(parents=True)
    (tmp_path / "repo" / "sh").mkdir()
    return root


@pytest.mark.parametrize("name", ["", " ", ".", "..", "record/", "x/../..", "a/../../b", "record/../x"])
def test_names_that_are_not_a_record_folder_are_refused(fake_repo, name):
    with pytest.raises(UserError, match="not allowed|outside record/|record folder"):
        record_path(name, fake_repo)


def test_plain_names_are_under_record_and_paths_are_paths(fake_repo, tmp_path, capsys, monkeypatch):
    root = Path(os.path.realpath(fake_repo))
    assert record_path("badnet_demo", fake_repo) == root / "badnet_demo"
    assert record_path("sh", fake_repo) == root / "sh"          # never the repository's own sh/
    assert record_path("record/badnet_demo", fake_repo) == root / "badnet_demo"
    assert record_path("sweep_demo/badnet_x", fake_repo) == root / "sweep_demo" / "badnet_x"
    for folder in (root.parent, root.parent.parent, Path("/")):   # the repository and the folders above it
        with pytest.raises(UserError, match="holds the record folder"):
            record_path(str(folder), fake_repo)
    with pytest.raises(UserError, match="is the record folder itself"):
        record_path(str(root), fake_repo)
    with pytest.raises(UserError, match="a folder of the repository"):
        record_path(str(root.parent / "sh"), fake_repo)
    monkeypatch.chdir(root.parent)
    with pytest.raises(UserError, match="a folder of the repository"):
        record_path("./sh", fake_repo)
    assert record_path("./record/x", fake_repo) == root / "x"
    out = record_path("../elsewhere", fake_repo)                  # explicit, outside record/: said once
    assert out == Path(os.path.realpath(tmp_path / "elsewhere"))
    assert f"'../elsewhere' is {out}, outside record/" in capsys.readouterr().out


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory, fake_root):
    """A copy of the repository's code (no data, no records) and a complete record inside its record/."""
    dst = tmp_path_factory.mktemp("copy") / "repo"
    for d in ("attack", "defense", "utils", "models", "config", "sh", "sweep", "analysis"):
        shutil.copytree(REPO / d, dst / d, ignore=shutil.ignore_patterns("__pycache__"))
    (dst / "record").mkdir()
    (dst / "README.md").write_text("copy")
    return dst


def copy_env(repo):
    """The copy's own packages first (an editable install of this checkout would otherwise be imported)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}


def run_script(repo, *args, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=repo, capture_output=True, text=True, timeout=timeout,
                          env=copy_env(repo))


@pytest.mark.parametrize("name", ["", ".", "..", "./sh", "./utils"])
def test_dangerous_names_with_overwrite_delete_nothing(repo_copy, fake_root, name):
    before = tree_digest(repo_copy)
    p = run_script(repo_copy, "attack/badnet.py", "--save_folder_name", name, "--overwrite",
                   "--dataset_path", str(fake_root), "--epochs", "1")
    err = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(err) == 1 and err[0].startswith("error: record name"), p.stderr
    assert tree_digest(repo_copy) == before


# --- 1. --overwrite moves the old record aside until the new one is complete --------------------------------

def test_overwrite_that_fails_validation_keeps_the_old_record(defended_record, fake_root, capsys, tmp_path):
    before = tree_digest(defended_record)
    base = ["--dataset_path", str(fake_root), "--save_folder_name", str(defended_record), "--epochs", "1", "--overwrite"]
    msg = one_error_line(capsys, badnet.main, base + ["--p_num", "100000"])
    assert "p_num 100000 exceeds" in msg
    msg = one_error_line(capsys, badnet.main, base + ["--batch_size", "100000"])
    assert "fewer than batch_size 100000" in msg and "600 samples" in msg
    empty = tmp_path / "nodata"
    empty.mkdir()
    msg = one_error_line(capsys, badnet.main, [*base, "--dataset", "cifar10", "--dataset_path", str(empty)])
    assert "dataset cifar10 not found" in msg
    bad_index = tmp_path / "bad.txt"
    bad_index.write_text("0\n1\nnot-an-index\n")
    msg = one_error_line(capsys, ft.main, lp(defended_record, "--overwrite", "--index", str(bad_index)))
    assert "index file" in msg and "bad.txt" in msg
    assert tree_digest(defended_record) == before
    assert not previous_path(defended_record).exists()


def test_overwrite_that_fails_while_training_puts_the_old_record_back(defended_record, fake_root, capsys, monkeypatch):
    before = tree_digest(defended_record)

    def no_space(self, payload, name="model.pt"):
        assert previous_path(self.path).exists() and not (self.path / "defense").exists()
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path / name))
    monkeypatch.setattr(Run, "save_model", no_space)
    argv = ["--dataset_path", str(fake_root), "--save_folder_name", str(defended_record), "--epochs", "1", "--overwrite"]
    msg = one_error_line(capsys, badnet.main, argv, code=1)
    assert msg.startswith(f"error: {defended_record / 'model.pt'}: no space left on the device")
    assert tree_digest(defended_record) == before
    assert not previous_path(defended_record).exists()
    assert not list(defended_record.parent.glob(".*")), "nothing half-written or set aside is left"


def test_successful_overwrite_names_what_goes_and_deletes_it_after(defended_record, fake_root, capsys, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(defended_record, copy)
    make_record(copy, fake_root, extra=["--overwrite"])
    out = capsys.readouterr().out
    assert f"the previous record at {copy} with its defense records (lp) is moved to {previous_path(copy)}" in out
    assert "deleting the replaced record and its defense records (lp)" in out
    assert not previous_path(copy).exists() and not (copy / "defense").exists()
    assert (copy / "summary.json").exists() and (copy / MARKER).exists()


def test_sigterm_during_an_overwrite_puts_the_old_record_back(repo_copy, fake_root):
    rec = repo_copy / "record" / "victim"
    base = ["attack/badnet.py", "--save_folder_name", "victim", "--dataset_path", str(fake_root), "--batch_size", "32"]
    assert run_script(repo_copy, *base, "--epochs", "1").returncode == 0
    before = tree_digest(rec)
    p = subprocess.Popen([sys.executable, *base, "--epochs", "300", "--overwrite"], cwd=repo_copy,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=copy_env(repo_copy))
    deadline = time.time() + 120
    while not (rec / "checkpoint.pt").exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.1)
    assert (rec / "checkpoint.pt").exists(), "the new run never reached its first checkpoint"
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 143, err
    assert "the previous record is back" in out and "Traceback" not in err
    assert tree_digest(rec) == before and not previous_path(rec).exists()


def test_a_killed_overwrite_is_recognised_on_the_next_command(defended_record, fake_root, tmp_path, capsys):
    path = tmp_path / "killed"
    shutil.copytree(defended_record, path)
    before = tree_digest(path)
    # the state SIGKILL leaves: the old record aside, an incomplete new one at the name
    os.rename(path, previous_path(path))
    path.mkdir()
    (path / MARKER).write_text("{}")
    (path / "config.yaml").write_text("method: badnet\n")
    with pytest.raises(UserError, match="earlier --overwrite .* was interrupted.*--resume.*--overwrite.*mv"):
        Run(path, "badnet", {}, overwrite=False, resume=False)
    # --overwrite discards the incomplete replacement; the old record waits aside, and comes back on failure
    run = Run(path, "badnet", {}, overwrite=True)
    assert previous_path(path).exists() and "discarded the incomplete replacement" in capsys.readouterr().out
    run.close()
    assert tree_digest(path) == before and not previous_path(path).exists()
    # killed before anything new was written: the old record is simply put back
    os.rename(path, previous_path(path))
    with pytest.raises(UserError, match="already exists"):
        Run(path, "badnet", {})
    assert tree_digest(path) == before and not previous_path(path).exists()
    # killed after the new record was complete: the old one goes
    shutil.copytree(path, previous_path(path))
    with pytest.raises(UserError, match="already exists"):
        Run(path, "badnet", {})
    assert not previous_path(path).exists() and tree_digest(path) == before


def test_only_records_of_this_toolkit_are_ever_deleted(tmp_path, capsys, monkeypatch):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "summary.json").write_text("{}")
    (mine / "notes.txt").write_text("keep")
    assert not is_record(mine)
    with pytest.raises(UserError, match="not a record of this toolkit"):
        remove_record(mine)
    with pytest.raises(UserError, match="not a record of this toolkit.*nothing was changed"):
        Run(mine, "badnet", {}, overwrite=True)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt", "summary.json"]
    # a delete that fails half-way (a file that cannot be removed) never leaves a folder that looks complete
    rec = tmp_path / "rec"
    rec.mkdir()
    for name in (MARKER, "summary.json", "model.pt", "config.yaml"):
        (rec / name).write_text("x")
    real_unlink = os.unlink

    def refuse_model(path, *a, **k):
        if str(path).endswith("model.pt"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_unlink(path, *a, **k)
    monkeypatch.setattr(os, "unlink", refuse_model)
    assert remove_record(rec) is False
    assert "could not delete all of" in capsys.readouterr().err
    assert not (rec / "summary.json").exists() and (rec / "model.pt").exists()


# --- 3. damaged files and faults: one line naming the file ------------------------------------------------------

@pytest.mark.parametrize("name,content,expected", [
    ("config.yaml", b"config: [unclosed\n", "config.yaml is not valid YAML"),
    ("config.yaml", b"- a list\n", "config.yaml must hold a mapping"),
    ("summary.json", b'{"test_acc": 0.9, ', "summary.json is not valid JSON"),
    ("poison.json", b'{"attack": "badnet"', "poison.json is not valid JSON"),
    ("poison.json", b'{"format_version": 2}', "lacks attack"),
    ("model.pt", b"PK\x03\x04 truncated", "model.pt is not a weights-only"),
    ("trigger.safetensors", b"\x00" * 16, "trigger.safetensors does not match the digest"),
    ("summary.json", b"\xff\xfe\x00", "summary.json is not text"),
])
def test_damaged_record_files_are_one_line_in_every_reader(defended_record, tmp_path, capsys, name, content, expected):
    from bench import trigger_strength
    rec = tmp_path / "damaged"
    shutil.copytree(defended_record, rec)
    (rec / name).write_bytes(content)
    msg = one_error_line(capsys, ft.main, lp(rec, "--overwrite"))
    assert expected in msg and str(rec / name) in msg
    msg = one_error_line(capsys, trigger_strength.main, ["--record", str(rec), "--models", str(rec)])
    assert expected in msg


def test_damaged_index_file_and_summaries(defended_record, tmp_path, capsys):
    from analysis.summarize import collect
    index = tmp_path / "index.txt"
    index.write_bytes(b"\x00\xff\xfe")
    msg = one_error_line(capsys, ft.main, lp(defended_record, "--index", str(index), "--out_name", "x"))
    assert "index file" in msg and "is not text" in msg
    rec = tmp_path / "records" / "r"
    shutil.copytree(defended_record, rec)
    (rec / "defense" / "lp" / "summary.json").write_text("{")
    shutil.copytree(rec, previous_path(rec))   # a record kept aside by a running --overwrite: not a row
    df = collect(tmp_path / "records")
    assert len(df) == 1 and df["defense"].tolist() == ["none"]
    assert "skipping" in capsys.readouterr().err


def test_os_errors_are_one_line_naming_the_path(tmp_path, fake_root, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    argv = ["--dataset_path", str(fake_root), "--epochs", "1"]
    msg = one_error_line(capsys, badnet.main, argv + ["--save_folder_name", str(blocker / "rec")], code=1)
    assert str(blocker) in msg and "is a file, not a folder" in msg
    msg = one_error_line(capsys, badnet.main, argv + ["--save_folder_name", str(blocker)])
    assert "is a file, not a record folder" in msg


def test_a_training_set_smaller_than_a_batch_is_refused_up_front(tmp_path, fake_root, capsys):
    argv = ["--dataset_path", str(fake_root), "--save_folder_name", str(tmp_path / "r"), "--epochs", "1"]
    msg = one_error_line(capsys, badnet.main, argv + ["--reserve_ratio", "0.9", "--batch_size", "128"])
    assert "holds 60 samples, fewer than batch_size 128" in msg and "--reserve_ratio" in msg
    assert not (tmp_path / "r").exists()
    s = badnet.main(argv + ["--reserve_ratio", "0.9", "--batch_size", "50"])   # one batch is enough
    assert 0 <= s["test_acc"] <= 1


# --- 5. downloads time out --------------------------------------------------------------------------------------

def test_a_download_that_never_answers_times_out_with_a_way_out(tmp_path, monkeypatch):
    from utils import data, dataset_files, download
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)            # accepts connections, never answers
    held = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                pass
    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        url = f"http://127.0.0.1:{server.getsockname()[1]}/cifar-10-python.tar.gz"
        monkeypatch.setattr(download, "DOWNLOAD_TIMEOUT", 1.0)
        monkeypatch.setitem(dataset_files.CIFAR, "cifar10", dataset_files.CIFAR["cifar10"][:4] + (url, None))
        t0 = time.time()
        with pytest.raises(UserError) as e:
            data.load_dataset("cifar10", tmp_path)
        assert time.time() - t0 < 10
        msg = str(e.value)
        assert "timed out: no data for 1 s" in msg and "extract it into" in msg and "by hand" in msg
        assert not list((tmp_path / "cifar10").glob("*.part")) and not list((tmp_path / "cifar10").glob(".*"))
    finally:
        stop.set()
        t.join()
        for c in held:
            c.close()
        server.close()


# --- 6. sweeps are checked before anything runs -----------------------------------------------------------------

def test_sweep_reports_every_bad_job_and_runs_nothing(tmp_path, capsys, monkeypatch):
    from sweep import run as sweep
    y = tmp_path / "bad.yaml"
    y.write_text(f"name: bad\nroot: {tmp_path / 'rec'}\ngrid:\n  attack: [badnet]\n  pratio: [0.1, ten, 1.5]\n"
                 "args:\n  sau: {n_round: 20}\ndefenses: [sau, fst]\n")
    assert sweep.main([str(y), "--dry_run"]) == 2
    out = capsys.readouterr()
    assert "pratio = 'ten' (command line): expected a number" in out.out
    assert "pratio = 1.5 (command line) is out of range" in out.out
    assert out.out.count("unknown option --n_round (did you mean --n_rounds?)") == 3
    assert "badnet_pten, whose record it needs, is invalid" in out.out and "[to run  ] badnet_p0.1__fst" in out.out
    monkeypatch.setattr(sweep, "start_ray", lambda *a: pytest.fail("Ray must not start while a job is invalid"))
    assert sweep.main([str(y)]) == 2
    err = capsys.readouterr().err
    assert "7 job(s) have settings their script refuses" in err and "nothing was run" in err
    assert not (tmp_path / "rec").exists()
    # --skip_invalid keeps exactly the valid jobs
    from sweep.checks import check_jobs, drop_invalid
    from sweep.jobs import expand, load_sweep
    jobs = expand(load_sweep(y), tmp_path / "rec")
    every = [j for a in jobs for j in [a, *a.children]]
    kept = drop_invalid(jobs, check_jobs(every))
    assert [(a.name, [d.name for d in a.children]) for a in kept] == [("badnet_p0.1", ["badnet_p0.1__fst"])]


def test_sweep_checks_a_defense_against_its_attacks_dataset(tmp_path):
    from sweep.checks import check_jobs
    from sweep.jobs import expand
    cfg = {"name": "x", "grid": {"attack": ["badnet"], "dataset": ["fashion_mnist"]}, "defenses": ["pdb"],
           "args": {"pdb": {"square_size": 40}}}
    jobs = expand(cfg, tmp_path)
    bad = check_jobs([j for a in jobs for j in [a, *a.children]])
    assert list(bad) == ["badnet_fashion_mnist__pdb"] and "does not fit 28x28" in bad["badnet_fashion_mnist__pdb"]
