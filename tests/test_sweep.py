"""sweep/run.py and analysis/summarize.py: the grid's expansion, a real sweep of tiny jobs on a local Ray instance
(run, rerun = skip, a failing job reported while the others finish), and the summary's numbers against the
records' summary.json files.

The defense jobs of the Ray tests use a stand-in script (no torch import, well under a second) so that the
tests check the sweep's plumbing quickly; the real defenses are exercised by their own tests."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from analysis.summarize import collect, mean_std, summarize
from sweep.jobs import expand, load_sweep, walk
from utils.errors import UserError

REPO = Path(__file__).resolve().parents[1]

STUB = '''
"""Stand-in defense: copies the attack's ACC halved into <record>/defense/<out>/summary.json, or fails."""
import argparse, json, pathlib, sys
p = argparse.ArgumentParser()
for a in ("--result_file", "--dataset_path", "--random_seed", "--out"):
    p.add_argument(a)
p.add_argument("--fail", default="false")
p.add_argument("--resume", action="store_true")
a = p.parse_args()
if a.fail == "true":
    print("error: this defense was made to fail", file=sys.stderr)
    sys.exit(2)
rec = pathlib.Path(a.result_file)
s = json.loads((rec / "summary.json").read_text())
out = rec / "defense" / a.out
out.mkdir(parents=True, exist_ok=True)
(out / "config.yaml").write_text(f"config:\\n  random_seed: {a.random_seed}\\n")
(out / "summary.json").write_text(json.dumps({"defense": a.out, "attack": s["attack"], "test_acc": s["test_acc"] / 2,
    "test_asr": 0.125, "test_ra": 0.5, "der": 0.6875, "rir": 0.5, "seconds": 0.5}))
'''


def sweep_yaml(tmp, root, data_root, stub, attacks=("badnet",), defenses=None, method_args=None):
    defenses = defenses if defenses is not None else [{"stub": {"script": str(stub), "args": ["--out", "stub"]}}]
    text = yaml.safe_dump({"name": "t", "root": str(root), "dataset_path": str(data_root),
                           "grid": {"attack": list(attacks), "dataset": "fashion_mnist", "seed": 0},
                           "defenses": defenses,
                           "args": {"attack": {"epochs": 1, "batch_size": 64, "eval_batch_size": 256},
                                    **(method_args or {})},
                           "resources": {"attack": {"num_cpus": 1}, "defense": {"num_cpus": 1}}})
    path = tmp / f"sweep_{len(list(tmp.glob('sweep_*.yaml')))}.yaml"
    path.write_text(text)
    return path


def run_sweep(path, *extra):
    # the timeout guards against a hung Ray, it is not a speed check: on a loaded 2-core machine the first
    # sweep (Ray's start plus two tiny jobs) took over 300 s
    p = subprocess.run([sys.executable, "sweep/run.py", str(path), "--num_cpus", "2", *extra], cwd=REPO,
                       capture_output=True, text=True, timeout=900)
    return p.returncode, p.stdout + p.stderr


@pytest.fixture(scope="module")
def stub(tmp_path_factory):
    path = tmp_path_factory.mktemp("stub") / "stub_defense.py"
    path.write_text(STUB)
    return path


@pytest.fixture(scope="module")
def first_sweep(tmp_path_factory, fake_root, stub):
    """A tiny attack and a defense on its record, on a local Ray instance."""
    tmp = tmp_path_factory.mktemp("sweep")
    root = tmp / "rec"
    path = sweep_yaml(tmp, root, fake_root, stub)
    rc, out = run_sweep(path)
    return tmp, root, path, rc, out


# --- expansion (no Ray) ----------------------------------------------------------------------------------------

def test_grid_expands_to_named_jobs_with_their_arguments_and_resources(tmp_path):
    cfg = {"name": "x", "grid": {"attack": ["badnet", "blend"], "dataset": "fashion_mnist", "pratio": [0.05, 0.1],
                                 "seed": [0, 1]},
           "defenses": ["fst", "pdb", "ft-bb"], "args": {"attack": {"epochs": 2}, "pdb": {"epochs": 1}},
           "resources": {"attack": {"num_cpus": 2}, "defense": {"num_gpus": 0.25}, "pdb": {"num_gpus": 0.5}}}
    jobs = expand(cfg, tmp_path)
    assert len(jobs) == 2 * 2 * 2
    assert [j.name for j in jobs[:4]] == ["badnet_fashion_mnist_p0.05_s0", "badnet_fashion_mnist_p0.05_s1",
                                          "badnet_fashion_mnist_p0.1_s0", "badnet_fashion_mnist_p0.1_s1"]
    a = jobs[3]
    assert a.script == "attack/badnet.py" and a.out == tmp_path / a.name
    cmd = " ".join(a.args)
    assert f"--save_folder_name {tmp_path / a.name}" in cmd and "--pratio 0.1" in cmd and "--random_seed 1" in cmd
    assert "--epochs 2" in cmd and a.command()[-1] == "--resume"
    assert a.resources == {"num_cpus": 2, "num_gpus": 0}
    ds = {d.method: d for d in a.children}
    assert list(ds) == ["fst", "pdb", "ft-bb"]
    assert ds["fst"].out == a.out / "defense" / "fst" and ds["fst"].resources == {"num_cpus": 1, "num_gpus": 0.25}
    assert ds["pdb"].resources["num_gpus"] == 0.5 and "--epochs 1" in " ".join(ds["pdb"].args)
    assert "--random_seed 1" in " ".join(ds["fst"].args) and f"--result_file {a.out}" in " ".join(ds["fst"].args)
    # ft-bb: mode ft with BackdoorBench's YAML for the dataset, written to defense/ft-bb/
    assert ds["ft-bb"].script == "defense/ft.py" and ds["ft-bb"].out == a.out / "defense" / "ft-bb"
    assert "config/defense/ft/backdoorbench_fashion_mnist.yaml" in ds["ft-bb"].args


def test_a_job_granted_a_gpu_runs_on_it_and_shared_cards_must_fit_its_jobs(tmp_path):
    from sweep.ray_tasks import check_gpu_memory
    cfg = {"grid": {"attack": "badnet"}, "defenses": ["fst", "pdb"], "args": {"pdb": {"device": "auto"}},
           "resources": {"attack": {"num_gpus": 0.125, "gpu_memory": 2}, "defense": {"num_gpus": 0}}}
    a = expand(cfg, tmp_path)[0]
    fst, pdb = a.children
    cmd = a.command()
    assert cmd[cmd.index("--device") + 1] == "cuda"   # never a silent fall-back to the CPU
    assert "--device" not in fst.command() and a.ray_resources() == {"num_cpus": 1, "num_gpus": 0.125}
    pdb.resources["num_gpus"] = 0.5
    pc = pdb.command()
    assert pc.count("--device") == 1 and pc[pc.index("--device") + 1] == "cuda"
    check_gpu_memory([a], card_gib=16)     # 8 jobs x 2 GiB on a 16 GiB card
    with pytest.raises(UserError, match="8 such jobs share a card.*16.0 GiB together.*has 12.0 GiB"):
        check_gpu_memory([a], card_gib=12)
    check_gpu_memory([a], card_gib=None)   # no GPU on the driver: nothing to check against


def test_jobs_resume_and_a_complete_record_is_not_run_again(tmp_path):
    from sweep.ray_tasks import run_job
    job = expand({"grid": {"attack": "badnet"}, "defenses": "none"}, tmp_path)[0]
    assert job.command()[-1] == "--resume"    # new, interrupted or never checkpointed: the scripts know (test_records)
    job.out.mkdir()
    (job.out / "summary.json").write_text("{}")
    r = run_job(["false"], str(REPO), str(tmp_path / "log.txt"), 1, str(job.out))   # a retry after it finished
    assert r["rc"] == 0 and r.get("already_complete") and not (tmp_path / "log.txt").exists()


def test_every_shipped_job_parses_with_its_scripts_own_options(tmp_path):
    """The sweep's command lines against the real scripts' option lists (a renamed option fails here)."""
    import importlib

    from utils.attack import ATTACK_OPTIONS
    from utils.config import build_parser
    from utils.defense import DEFENSE_OPTIONS
    counts = {}
    for f in sorted((REPO / "config" / "sweep").glob("*.yaml")):
        name = f.stem
        jobs = expand(load_sweep(f), tmp_path, warn=lambda m: None)
        every = list(walk(jobs))
        n_retune = sum(j.kind == "retune" for j in every)
        counts[name] = (len(jobs), len(every) - len(jobs) - n_retune) + ((n_retune,) if n_retune else ())
        for j in every:
            mod = importlib.import_module(j.script[:-3].replace("/", "."))
            base = {"attack": ATTACK_OPTIONS, "defense": DEFENSE_OPTIONS, "retune": []}[j.kind]
            opts = base + getattr(mod, "OPTIONS", [])
            if j.script == "defense/fst.py":
                opts = DEFENSE_OPTIONS + mod.ft.OPTIONS
            build_parser(j.script, opts).parse_args(j.command()[2:])   # SystemExit on an unknown option
    assert counts["demo"] == (2, 2 * 9)          # badnet, blend x (ft, lp, fe-tuning, ft-init, fst, pdb, sau, fmp, fp)
    assert counts["sig"] == (1, 9)
    from utils.registry import methods
    assert counts["paper_cifar10"][1] == len(methods("defense")) * counts["paper_cifar10"][0]   # defenses: all
    assert counts["ft_family"] == (4, 4 * 5) and counts["bypass"] == (2, 2 * 8)
    assert counts["demo_seeds"] == (6, 6 * 9, 6 * 9)   # and the re-tuning attack after every defense


def test_retune_adds_a_job_after_every_defense_at_the_defense_seed(tmp_path):
    cfg = {"grid": {"attack": "badnet", "seed": 3}, "defenses": ["fst", "sau"], "defense_seed": [0, 1],
           "retune": {"epochs": 2}, "resources": {"retune": {"num_cpus": 2}}}
    a = expand(cfg, tmp_path)[0]
    assert [d.name for d in a.children] == [f"{a.name}__{d}_ds{s}" for d in ("fst", "sau") for s in (0, 1)]
    for d in a.children:
        r, = d.children
        seed = d.args[d.args.index("--random_seed") + 1]
        assert r.kind == "retune" and r.parent is d and r.script == "analysis/retune.py" and r.out == d.out / "retune"
        assert r.args[:4] == ["--result_file", str(d.out), "--random_seed", seed] and "--epochs" in r.args
        assert r.resources == {"num_cpus": 2, "num_gpus": 0} and r.command()[-1] == "--resume"
    assert [j.kind for j in walk([a])][:3] == ["attack", "defense", "retune"]   # parents first
    assert all(not d.children for d in expand({**cfg, "retune": False}, tmp_path)[0].children)
    with pytest.raises(UserError, match="retune: unknown option.*'epoch'"):
        expand({**cfg, "retune": {"epoch": 2}}, tmp_path)
    with pytest.raises(UserError, match="retune = 'yes'"):
        expand({**cfg, "retune": "yes"}, tmp_path)


class FakeRay:
    """Ray's calls that run_sweep makes, in-process: a task 'runs' when ray.wait returns it, writing its record's
    summary.json unless its record is in `fail`."""

    def __init__(self, fail=()):
        self.fail, self.order, self.refs = set(fail), [], {}

    def remote(self, fn):
        fake = self

        class Task:
            def options(self, **kw):
                return self

            def remote(self, command, repo, log, threads, out):
                ref = object()
                fake.refs[ref] = Path(out)
                return ref
        return Task()

    def wait(self, refs, num_returns=1, timeout=None):
        return refs[:1], refs[1:]

    def get(self, ref):
        out = self.refs.pop(ref)
        self.order.append(out)
        if out in self.fail:
            return {"rc": 1, "seconds": 0.1}
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text("{}")
        return {"rc": 0, "seconds": 0.1}


def test_a_three_level_sweep_runs_each_job_after_its_parent_and_blocks_below_a_failure(tmp_path):
    from sweep import run as sweep_run
    cfg = {"grid": {"attack": ["badnet", "blend"]}, "defenses": ["fst", "sau"], "retune": True}
    jobs = expand(cfg, tmp_path)
    badnet, blend = jobs
    fst = badnet.children[0]
    (fst.out).mkdir(parents=True)                       # badnet's record and its fst record are complete already:
    (fst.out / "summary.json").write_text("{}")        # fst's re-tuning still runs
    (badnet.out / "summary.json").write_text("{}")
    sau = blend.children[1]
    fake = FakeRay(fail={sau.out})
    every = sweep_run.run_sweep(jobs, fake, progress_every=1e9)
    status = {j.name: j.status for j in every}
    assert status[badnet.name] == status[fst.name] == "skipped"
    assert status[fst.children[0].name] == "done" and status[badnet.children[1].children[0].name] == "done"
    assert status[sau.name] == "failed" and status[sau.children[0].name] == "blocked"
    assert "needs, failed" in sau.children[0].message
    for j in every:   # a child ran only after its parent's record was complete
        if j.out in fake.order and j.parent is not None and j.parent.out in fake.order:
            assert fake.order.index(j.parent.out) < fake.order.index(j.out)
    ran = {j.out for j in every if j.status in ("done", "failed")}
    assert len(fake.order) == len(ran) == 7   # badnet: sau, 2 retunes; blend, its 2 defenses, fst's retune


def test_a_defense_script_that_does_not_exist_is_an_error(tmp_path):
    cfg = {"grid": {"attack": "badnet"},
           "defenses": ["pdb", {"later": {"script": "defense/not_written_yet.py"}}]}
    with pytest.raises(UserError, match="not found: defense/not_written_yet.py"):
        expand(cfg, tmp_path)


def test_bad_sweep_files_are_refused_with_the_key(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("grid: {attack: [badnet]}\nresource: {}\n")
    with pytest.raises(UserError, match="resource"):
        load_sweep(f)
    with pytest.raises(UserError, match="unknown attack"):
        expand({"grid": {"attack": ["nope"]}}, tmp_path)
    with pytest.raises(UserError, match="unknown defense"):
        expand({"grid": {"attack": ["badnet"]}, "defenses": ["nope"]}, tmp_path)
    with pytest.raises(UserError, match="num_gpu"):
        expand({"grid": {"attack": ["badnet"]}, "resources": {"attack": {"num_gpu": 1}}}, tmp_path)
    for name in ("demo", "paper_cifar10"):  # the shipped sweeps expand
        cfg = load_sweep(REPO / "config" / "sweep" / f"{name}.yaml")
        assert expand(cfg, tmp_path, warn=lambda m: None)


# --- a real sweep on a local Ray instance ----------------------------------------------------------------------

def test_sweep_runs_the_grid_and_summarises(first_sweep):
    tmp, root, path, rc, out = first_sweep
    assert rc == 0, out
    rec = root / "badnet_fashion_mnist_s0"
    assert (rec / "summary.json").exists() and (rec / "defense" / "stub" / "summary.json").exists()
    assert (root / "sweep_logs" / "badnet_fashion_mnist_s0.log").exists()
    report = json.loads((root / "sweep_report.json").read_text())
    assert [j["status"] for j in report["jobs"]] == ["done", "done"]
    assert "done 2 | running 0 | failed 0 | left 0" in out
    for f in ("summary.csv", "summary.md", "summary_mean_std.csv", "summary_mean_std.md", "acc_asr_bars.png",
              "acc_vs_asr.png"):
        assert (root / "summary" / f).stat().st_size > 0, f


def test_summary_numbers_equal_the_records(first_sweep):
    tmp, root, path, rc, out = first_sweep
    df = pd.read_csv(root / "summary" / "summary.csv")
    assert len(df) == 2
    for r in df.itertuples():
        s = json.loads((root / r.record / "summary.json").read_text())
        for k in ("test_acc", "test_asr", "test_ra", "seconds"):
            assert getattr(r, k) == s[k], (r.record, k)
        assert (r.dataset, r.model, r.pratio, r.target, r.seed) == ("fashion_mnist", "cnn", 0.1, 0, 0)
        if r.defense == "none":
            assert r.attack == s["attack"] == "badnet" and math.isnan(r.der)
        else:
            assert r.defense == "stub" and r.der == s["der"] == 0.6875


def test_rerun_skips_complete_jobs_without_starting_ray(first_sweep):
    tmp, root, path, rc, out = first_sweep
    log = root / "sweep_logs" / "badnet_fashion_mnist_s0.log"
    before = log.stat().st_mtime_ns
    rc, out = run_sweep(path)
    assert rc == 0, out
    assert "2 already complete" in out and "nothing to run" in out and "Ray started" not in out
    assert log.stat().st_mtime_ns == before
    assert [j["status"] for j in json.loads((root / "sweep_report.json").read_text())["jobs"]] == ["skipped"] * 2


def test_a_failing_job_is_reported_and_the_rest_completes(first_sweep, fake_root, stub):
    """On the same root: the badnet record and its stub defense are complete (skipped); a second stub defense
    runs, a third is made to fail, and a blend attack fails when it runs (more poisoned samples than the data has),
    which blocks its defenses. A Bypass attack with a setting its script refuses is left out by --skip_invalid."""
    tmp, root, _, _, _ = first_sweep
    defenses = [{"stub": {"script": str(stub), "args": ["--out", "stub"]}},
                {"stub2": {"script": str(stub), "args": ["--out", "stub2"]}},
                {"broken": {"script": str(stub), "args": ["--out", "broken", "--fail", "true"]}}]
    path = sweep_yaml(tmp, root, fake_root, stub, attacks=("badnet", "blend", "bypass_badnet"), defenses=defenses,
                      method_args={"blend": {"p_num": 100000}, "bypass_badnet": {"regularization_ratio": -1}})
    rc, out = run_sweep(path, "--skip_invalid")
    assert rc == 1, out
    assert "bypass_badnet_fashion_mnist_s0: regularization_ratio = -1.0 (command line) is out of range" in out
    assert "--skip_invalid: running the other" in out
    jobs = {j["name"]: j for j in json.loads((root / "sweep_report.json").read_text())["jobs"]}
    status = {n: j["status"] for n, j in jobs.items()}
    assert status == {"badnet_fashion_mnist_s0": "skipped", "badnet_fashion_mnist_s0__stub": "skipped",
                      "badnet_fashion_mnist_s0__stub2": "done", "badnet_fashion_mnist_s0__broken": "failed",
                      "blend_fashion_mnist_s0": "failed", "blend_fashion_mnist_s0__stub": "blocked",
                      "blend_fashion_mnist_s0__stub2": "blocked", "blend_fashion_mnist_s0__broken": "blocked"}
    failures = out[out.index("failures:"):]
    for name in ("badnet_fashion_mnist_s0__broken", "blend_fashion_mnist_s0"):
        assert name in failures and jobs[name]["log"] in failures
    assert "made to fail" in jobs["badnet_fashion_mnist_s0__broken"]["message"]
    assert "p_num 100000 exceeds" in jobs["blend_fashion_mnist_s0"]["message"]
    assert (root / "badnet_fashion_mnist_s0" / "defense" / "stub2" / "summary.json").exists()
    assert set(pd.read_csv(root / "summary" / "summary.csv")["defense"]) == {"none", "stub", "stub2"}


# --- the summary on hand-made records --------------------------------------------------------------------------

def fake_record(folder, summary, config):
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "config.yaml").write_text(yaml.safe_dump({"config": config}))


def test_mean_and_std_over_seeds_and_the_plots(tmp_path):
    accs, asrs = [0.9, 0.8], [1.0, 0.5]
    for seed, (acc, asr) in enumerate(zip(accs, asrs)):
        a = tmp_path / f"blend_s{seed}"
        fake_record(a, {"attack": "blend", "dataset": "mnist", "model": "cnn", "pratio": 0.05, "test_acc": acc,
                        "test_asr": asr, "test_ra": 0.0, "seconds": 10.0 + seed},
                    {"attack_target": 3, "random_seed": seed})
        fake_record(a / "defense" / "ft-init", {"defense": "ft", "attack": "blend", "test_acc": acc - 0.1,
                                                "test_asr": 0.1, "test_ra": 0.7, "der": 0.4 + seed / 10,
                                                "seconds": 2.0}, {"random_seed": seed})
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "summary.json").write_text("{}")   # not a record: ignored
    df = collect(tmp_path)
    assert list(df["defense"]) == ["none", "ft-init", "none", "ft-init"]   # folder name, undefended first
    assert set(df["target"]) == {3} and list(df["seed"]) == [0, 0, 1, 1]
    ms = mean_std(df).set_index("defense")
    assert ms.loc["none", "n_seeds"] == 2
    assert ms.loc["none", "test_acc_mean"] == pytest.approx(0.85)
    assert ms.loc["none", "test_asr_std"] == pytest.approx(math.sqrt(0.125))   # sample std of 1.0 and 0.5
    assert ms.loc["ft-init", "der_mean"] == pytest.approx(0.45)
    assert ms.loc["ft-init", "test_asr_std"] == 0
    out = tmp_path / "out"
    summarize(tmp_path, out)
    md = (out / "summary_mean_std.md").read_text()
    assert "| blend | none | mnist | cnn | 0.05 | 3 | 2 | 85.00 ± 7.07 [21.47, 148.53] | 75.00 ± 35.36 [-242.66, 392.66] |" in md
    assert (out / "acc_asr_bars.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "acc_vs_asr.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(UserError, match="no complete record"):
        summarize(tmp_path / "junk")


def test_records_that_differ_in_other_settings_are_not_averaged_as_seeds(tmp_path):
    for name, epochs, acc in (("a", 8, 0.9), ("b", 20, 0.7)):
        fake_record(tmp_path / name, {"attack": "badnet", "dataset": "fashion_mnist", "model": "cnn", "pratio": 0.1,
                                      "test_acc": acc, "test_asr": 1.0, "test_ra": 0.0, "seconds": 1.0},
                    {"random_seed": 0, "epochs": epochs, "save_folder_name": name})
    df = collect(tmp_path)
    assert sorted(df["variant"]) == ["epochs=20", "epochs=8"]
    fake_record(tmp_path / "c", {"attack": "blend", "dataset": "fashion_mnist", "model": "cnn", "pratio": 0.1,
                                 "test_acc": 0.8, "test_asr": 1.0, "test_ra": 0.0, "seconds": 1.0},
                {"random_seed": 0, "p_num": 1, "save_folder_name": "c"})
    fake_record(tmp_path / "d", {"attack": "blend", "dataset": "fashion_mnist", "model": "cnn", "pratio": 0.1,
                                 "test_acc": 0.8, "test_asr": 1.0, "test_ra": 0.0, "seconds": 1.0},
                {"random_seed": 0, "p_num": None, "save_folder_name": "d"})
    df = collect(tmp_path)
    assert sorted(df["variant"]) == ["epochs=20", "epochs=8", "p_num default", "p_num=1"]   # an unset option by name
    df = df[df["attack"] == "badnet"]
    ms = mean_std(df)
    assert len(ms) == 2 and sorted(ms["test_acc_mean"]) == pytest.approx([0.7, 0.9]) and set(ms["n_runs"]) == {1}
    summarize(tmp_path, tmp_path / "out", plots=False)
    assert "| variant |" in (tmp_path / "out" / "summary_mean_std.md").read_text()


def test_summarize_command_line(tmp_path):
    fake_record(tmp_path / "r" / "a", {"attack": "badnet", "dataset": "fashion_mnist", "model": "cnn", "pratio": 0.1,
                                       "test_acc": 0.5, "test_asr": 0.9, "test_ra": 0.1, "seconds": 1.0},
                {"attack_target": 0, "random_seed": 0})
    p = subprocess.run([sys.executable, "analysis/summarize.py", str(tmp_path / "r"), "--no_plots"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "| badnet | none | fashion_mnist | cnn | 0.1 | 0 | 0 |  | 50.00 | 90.00 | 10.00 |  |  |  | 1.0 |" in p.stdout
    assert (tmp_path / "r" / "summary" / "summary.csv").exists()
    p = subprocess.run([sys.executable, "analysis/summarize.py", str(tmp_path / "nothing")], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.startswith("error:")
