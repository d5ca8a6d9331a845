"""Run a grid of experiments on Ray: every attack of the grid (attacks x datasets x models x pratios x seeds ...),
then every defense on each finished attack record, each job a Ray task that runs the ordinary command
(`python attack/<a>.py ...`, `python defense/<d>.py --result_file ...`) in a subprocess with its own log.

    python sweep/run.py config/sweep/demo.yaml                         # a local Ray instance on this machine
    python sweep/run.py config/sweep/paper_cifar10.yaml --address auto # join a running Ray cluster

Ray does the scheduling: each task asks for the CPUs and (fractional) GPUs the YAML gives, so several small runs
share one card. A job whose record is complete (summary.json written) is skipped, so running the same command
again after a crash or Ctrl-C resumes the grid (interrupted records continue from their checkpoint through
--resume). A failed job is reported with its log and the rest goes on; the exit status is 0 only when every job
has a complete record. At the end analysis/summarize.py writes the tables and plots into <root>/summary/.

On a cluster, every node needs the repository at the same path and the record root on a shared filesystem.
See config/sweep/demo.yaml for the YAML keys.
"""
import argparse
import contextlib
import importlib
import io
import json
import math
import os
import pathlib
import sys
import time
from dataclasses import dataclass, field

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

import yaml  # noqa: E402

from utils.errors import UserError, run_main  # noqa: E402

# --- what can be run: name -> script, fixed arguments, output folder -------------------------------------------
# Arguments may use {dataset}, {model}, {seed} (templated per job); `requires` lists files that must exist
# (templated too), otherwise the job is skipped with a warning. A sweep YAML may add entries of the same shape.

ATTACKS = {
    "badnet": {"script": "attack/badnet.py"},
    "blend": {"script": "attack/blend.py"},
    "bypass_badnet": {"script": "attack/bypass.py", "args": ["--trigger", "badnet"]},
    "bypass_blend": {"script": "attack/bypass.py", "args": ["--trigger", "blend"]},
}

DEFENSES = {  # output folder: <attack record>/defense/<out>/ (out defaults to the name)
    "ft": {"script": "defense/ft.py", "args": ["--ft_mode", "ft"]},
    "lp": {"script": "defense/ft.py", "args": ["--ft_mode", "lp"]},
    "fe-tuning": {"script": "defense/ft.py", "args": ["--ft_mode", "fe-tuning"]},
    "ft-init": {"script": "defense/ft.py", "args": ["--ft_mode", "ft-init"]},
    "fst": {"script": "defense/fst.py"},
    # BackdoorBench's FT baseline: a configuration of ft_mode ft (its YAML sets out_name ft-bb)
    "ft-bb": {"script": "defense/ft.py", "args": ["--yaml_path", "config/defense/ft/backdoorbench_{dataset}.yaml"],
              "requires": ["config/defense/ft/backdoorbench_{dataset}.yaml"]},
    "pdb": {"script": "defense/pdb.py"},
    "sau": {"script": "defense/sau.py"},
    "fmp": {"script": "defense/fmp.py"},
}

GRID_ALIASES = {"seed": "random_seed", "target": "attack_target"}   # grid key -> attack option
NAME_ORDER = ("dataset", "model", "pratio", "target", "seed")        # parts of a record's name, in this order
NAME_PREFIX = {"dataset": "", "model": "", "pratio": "p", "target": "t", "seed": "s"}
RESOURCE_KEYS = ("num_cpus", "num_gpus", "memory")
TOP_KEYS = ("name", "root", "dataset_path", "grid", "attacks", "defenses", "args", "resources", "defense_seed")


@dataclass
class Job:
    name: str                  # unique, also the log's name
    kind: str                  # "attack" or "defense"
    method: str                # attack or defense name
    script: str
    args: list
    out: pathlib.Path          # the record folder this job completes
    resources: dict
    log: pathlib.Path
    dataset: str = "fashion_mnist"   # the attack's dataset (a defense job is checked against it)
    parent: "Job" = None       # the attack a defense job needs
    children: list = field(default_factory=list)
    status: str = "todo"       # todo, skipped, running, done, failed, blocked
    seconds: float = None
    message: str = ""

    def command(self, python="python"):
        # --resume continues an interrupted record from its checkpoint, starts a missing one, and starts again one
        # that died before its first checkpoint; run_job skips a record that is already complete
        return [python, self.script, *self.args, "--resume"]


def is_complete(path) -> bool:
    return (pathlib.Path(path) / "summary.json").exists()


# --- the YAML -> a list of jobs ---------------------------------------------------------------------------------

def _as_list(v):
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _fmt(v):
    return ("true" if v else "false") if isinstance(v, bool) else str(v)


def _option_args(options: dict, where: str) -> list:
    if not isinstance(options, dict):
        raise UserError(f"{where} must be a mapping of option: value, got {options!r}")
    out = []
    for k, v in options.items():
        if isinstance(v, (dict, list)):
            raise UserError(f"{where}.{k}: a single value is expected, got {v!r}")
        if v is not None:
            out += [f"--{k}", _fmt(v)]
    return out


def _template(items, values):
    try:
        return [str(a).format(**values) for a in items]
    except KeyError as e:
        raise UserError(f"unknown placeholder {e} in {items}; allowed: {', '.join(sorted(values))}") from None


def _registry(builtin: dict, extra, kind: str) -> dict:
    """The built-in table plus the YAML's own entries ({name: {script, args, out, requires}})."""
    reg = {k: dict(v) for k, v in builtin.items()}
    for name, spec in (extra or {}).items():
        if not isinstance(spec, dict) or "script" not in spec:
            raise UserError(f"{kind}s.{name} must be a mapping with at least 'script' (and optionally args, out, requires)")
        bad = set(spec) - {"script", "args", "out", "requires"}
        if bad:
            raise UserError(f"{kind}s.{name}: unknown keys {sorted(bad)}; allowed: script, args, out, requires")
        reg[name] = dict(spec)
    return reg


def _script_path(script) -> pathlib.Path:
    p = pathlib.Path(script)
    return p if p.is_absolute() else REPO / p


def _resources(cfg: dict, kind: str, method: str, override: dict) -> dict:
    res = {"num_cpus": 1, "num_gpus": 0}
    table = cfg.get("resources") or {}
    for key in (kind, method):
        part = table.get(key) or {}
        bad = set(part) - set(RESOURCE_KEYS)
        if bad:
            raise UserError(f"resources.{key}: unknown keys {sorted(bad)}; allowed: {', '.join(RESOURCE_KEYS)}")
        res.update(part)
    res.update({k: v for k, v in override.items() if v is not None})
    for k, v in res.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
            raise UserError(f"resources of {method}: {k} = {v!r}; a number >= 0 is expected")
    if res["num_gpus"] > 1 and res["num_gpus"] != int(res["num_gpus"]):
        raise UserError(f"resources of {method}: num_gpus = {res['num_gpus']}; Ray allows fractions only below 1")
    return res


def load_sweep(path) -> dict:
    path = pathlib.Path(path)
    if not path.is_file():
        raise UserError(f"sweep file {path} not found; see config/sweep/ for examples")
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path} must hold a mapping")
    bad = set(cfg) - set(TOP_KEYS)
    if bad:
        raise UserError(f"unknown keys {sorted(bad)} in {path}; allowed: {', '.join(TOP_KEYS)}")
    grid = cfg.get("grid")
    if not isinstance(grid, dict) or not grid.get("attack"):
        raise UserError(f"{path} needs a 'grid' mapping with at least 'attack: [...]'")
    cfg.setdefault("name", path.stem)
    return cfg


def expand(cfg: dict, root: pathlib.Path, override_res=None, warn=print) -> list:
    """Every attack job of the grid, each with its defense jobs as children. Nothing runs here."""
    override_res = override_res or {}
    attacks = _registry(ATTACKS, cfg.get("attacks"), "attack")
    defenses = _registry(DEFENSES, None, "defense")
    grid = dict(cfg["grid"])
    attack_names = [str(a) for a in _as_list(grid.pop("attack"))]
    unknown = [a for a in attack_names if a not in attacks]
    if unknown:
        raise UserError(f"unknown attack(s) {unknown} in grid.attack; known: {', '.join(attacks)} "
                        "(add others under 'attacks:' with their script)")

    # defenses: "all" (every registered one whose script exists), a list of names, or {name: {script,...}} entries
    dsel = cfg.get("defenses", "all")
    if dsel in (None, "none", []):
        dnames = []
    elif dsel == "all":
        dnames = list(defenses)
    else:
        dnames = []
        for d in _as_list(dsel):
            if isinstance(d, dict):
                defenses.update(_registry({}, d, "defense"))
                dnames += list(d)
            else:
                dnames.append(str(d))
    unknown = [d for d in dnames if d not in defenses]
    if unknown:
        raise UserError(f"unknown defense(s) {unknown}; known: {', '.join(defenses)} (or give a mapping with its script)")
    missing = sorted({d for d in dnames if not _script_path(defenses[d]["script"]).exists()})
    if missing:
        warn(f"warning: skipping defense(s) {', '.join(missing)}: their script is not there yet "
             f"({', '.join(sorted({defenses[d]['script'] for d in missing}))})")
    dnames = [d for d in dnames if d not in missing]

    args = cfg.get("args") or {}
    if not isinstance(args, dict):
        raise UserError("'args' must be a mapping: {attack: {...}, defense: {...}, <method>: {...}}")
    defense_seed = cfg.get("defense_seed", "grid")
    if defense_seed != "grid" and (not isinstance(defense_seed, int) or isinstance(defense_seed, bool) or defense_seed < 0):
        raise UserError(f"defense_seed = {defense_seed!r}; allowed: 'grid' (the attack's seed) or an integer >= 0")
    dataset_path = cfg.get("dataset_path")
    if dataset_path is not None:
        dataset_path = str(_script_path(dataset_path))

    keys = list(grid)
    for k in keys:
        grid[k] = _as_list(grid[k])
        if not grid[k]:
            raise UserError(f"grid.{k} is empty")
    named = [k for k in NAME_ORDER if k in grid] + sorted(k for k in keys if k not in NAME_ORDER)
    logs = root / "sweep_logs"
    jobs, seen = [], set()

    def combos(i=0, acc=()):
        if i == len(named):
            yield dict(acc)
            return
        for v in grid[named[i]]:
            yield from combos(i + 1, acc + ((named[i], v),))

    for a in attack_names:
        spec = attacks[a]
        for point in combos():
            name = "_".join([a] + [f"{NAME_PREFIX.get(k, k)}{_fmt(v)}".replace("/", "-") for k, v in point.items()])
            if name in seen:
                raise UserError(f"two grid points give the record name {name}; make the grid values distinct")
            seen.add(name)
            given = {**(args.get("attack") or {}), **(args.get(a) or {}), **point}
            values = {"dataset": given.get("dataset", "fashion_mnist"), "model": given.get("model", ""),
                      "seed": given.get("seed", given.get("random_seed", 0))}
            out = root / name
            a_args = _template(spec.get("args", []), values) + ["--save_folder_name", str(out)]
            if dataset_path:
                a_args += ["--dataset_path", dataset_path]
            a_args += _option_args({GRID_ALIASES.get(k, k): v for k, v in point.items()}, "grid")
            a_args += _option_args(args.get("attack") or {}, "args.attack") + _option_args(args.get(a) or {}, f"args.{a}")
            job = Job(name, "attack", a, spec["script"], a_args, out,
                      _resources(cfg, "attack", a, override_res), logs / f"{name}.log", str(values["dataset"]))
            jobs.append(job)
            for d in dnames:
                dspec = defenses[d]
                req = [_script_path(r) for r in _template(dspec.get("requires", []), values)]
                lacking = [str(r.relative_to(REPO) if r.is_relative_to(REPO) else r) for r in req if not r.exists()]
                if lacking:
                    warn(f"warning: skipping {d} on {name}: {', '.join(lacking)} missing")
                    continue
                d_out = out / "defense" / str(dspec.get("out", d))
                d_args = _template(dspec.get("args", []), values) + ["--result_file", str(out)]
                if dataset_path:
                    d_args += ["--dataset_path", dataset_path]
                seed = values["seed"] if defense_seed == "grid" else defense_seed
                d_args += ["--random_seed", str(seed)]
                d_args += _option_args(args.get("defense") or {}, "args.defense") + _option_args(args.get(d) or {}, f"args.{d}")
                job.children.append(Job(f"{name}__{d}", "defense", d, dspec["script"], d_args, d_out,
                                        _resources(cfg, "defense", d, override_res), logs / f"{name}__{d}.log",
                                        str(values["dataset"]), job))
    return jobs


# --- checking every job's command line before anything runs -------------------------------------------------------

def method_module(script):
    """The module of one of the repository's method scripts (attack/badnet.py -> attack.badnet), imported without
    running its main; None for a script of the YAML's own (importing it could run it)."""
    path = _script_path(script).resolve()
    if not (path.is_relative_to(REPO) and path.suffix == ".py" and path.exists()):
        return None
    return importlib.import_module(".".join(path.relative_to(REPO).with_suffix("").parts))


def check_job(job: Job):
    """None if the job's command passes the script's own option checks (its configure()), else the one-line error.
    A defense whose attack record does not exist yet is checked against the attack's dataset."""
    try:
        configure = getattr(method_module(job.script), "configure", None)
    except Exception as e:   # a script that does not import
        return f"{job.script} cannot be imported ({type(e).__name__}: {e})"
    if configure is None:
        return None   # a script of the YAML's own: it is checked when it runs
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            configure(job.args) if job.kind == "attack" else configure(job.args, dataset=job.dataset)
    except UserError as e:
        return str(e)
    return None


def check_jobs(jobs: list) -> dict:
    """{job name: error} for every job whose command line is refused, and every defense of a refused attack."""
    invalid = {}
    for j in jobs:
        msg = check_job(j)
        if msg is None and j.parent is not None and j.parent.name in invalid:
            msg = f"its attack {j.parent.name} is invalid"
        if msg is not None:
            invalid[j.name] = msg
    return invalid


def drop_invalid(jobs: list, invalid: dict) -> list:
    """The attack jobs that are valid, each without its invalid defense jobs (--skip_invalid)."""
    kept = [a for a in jobs if a.name not in invalid]
    for a in kept:
        a.children = [d for d in a.children if d.name not in invalid]
    return kept


def report_invalid(every: list, invalid: dict):
    print(f"{len(invalid)} job(s) have settings their script refuses:", file=sys.stderr)
    for j in every:
        if j.name in invalid:
            print(f"  {j.name}: {invalid[j.name]}\n      {' '.join(j.command())}", file=sys.stderr)


# --- one job, inside a Ray task ---------------------------------------------------------------------------------

def _die_with_parent():
    """Linux: the job's process gets SIGTERM when its Ray worker dies (Ctrl-C, ray.cancel), so nothing is orphaned."""
    try:
        import ctypes
        import signal
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def run_job(command: list, cwd: str, log: str, threads: int, out: str = None) -> dict:
    """Run one attack or defense command with stdout+stderr into its log; the exit code says how it went.
    A record already complete when the task starts (a retry after the first attempt finished) is not run again."""
    import socket
    import subprocess
    t0 = time.time()
    if out and is_complete(out):
        return {"rc": 0, "seconds": 0.0, "host": socket.gethostname(), "already_complete": True}
    os.makedirs(os.path.dirname(log), exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # as many compute threads as CPUs requested, so that jobs sharing a machine do not oversubscribe its cores
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    try:  # a task granted no GPU must not use one behind Ray's back (Ray sets CUDA_VISIBLE_DEVICES only when it grants)
        import ray
        if ray.is_initialized() and not ray.get_gpu_ids():
            env["CUDA_VISIBLE_DEVICES"] = ""
    except Exception:
        pass
    command = [sys.executable if c == "python" else c for c in command]
    with open(log, "w", buffering=1) as f:
        f.write(f"# {' '.join(command)}\n# host {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}, "
                f"CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', '')}, OMP_NUM_THREADS={env['OMP_NUM_THREADS']}\n")
        p = subprocess.run(command, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL,
                           preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        f.write(f"\n# exit code {p.returncode} after {time.time() - t0:.1f}s\n")
    return {"rc": p.returncode, "seconds": time.time() - t0, "host": socket.gethostname()}


def last_line(log: pathlib.Path) -> str:
    """The message a failed run left (scripts end bad input with one 'error: ...' line)."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines()
                 if ln.strip() and not ln.startswith("# exit code")]
    except OSError:
        return "no log"
    errors = [ln for ln in lines if ln.startswith("error:") or "Error" in ln.split(":")[0]]
    return (errors or lines or ["(empty log)"])[-1][:300]


# --- the driver -------------------------------------------------------------------------------------------------

def start_ray(address, num_cpus, num_gpus):
    import logging

    import ray
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    kw = dict(log_to_driver=False, logging_level=logging.WARNING, configure_logging=True)
    if address:
        ray.init(address=address, **kw)
    else:
        ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
                 object_store_memory=100 * 1024 ** 2, **kw)
    return ray


def check_feasible(ray, jobs, joining):
    total = ray.cluster_resources()
    have = {"num_cpus": total.get("CPU", 0), "num_gpus": total.get("GPU", 0)}
    for j in jobs:
        for k in ("num_cpus", "num_gpus"):
            if j.resources.get(k, 0) > have[k]:
                msg = (f"{j.name} asks for {k} = {j.resources[k]} but the Ray cluster has {have[k]:g}; "
                       f"lower resources in the sweep YAML or pass --{k}_per_job")
                if not joining:
                    raise UserError(msg)
                print(f"warning: {msg} (waiting in case the cluster grows)")
                return


class Progress:
    def __init__(self, total, skipped):
        self.total, self.skipped, self.t0, self.last = total, skipped, time.time(), 0.0

    def line(self, jobs, note=""):
        n = lambda *s: sum(j.status in s for j in jobs)
        el = time.time() - self.t0
        self.last = time.time()
        print(f"[{int(el // 3600):02d}:{int(el % 3600 // 60):02d}:{int(el % 60):02d}] done {n('done')}"
              f" | running {n('running')} | failed {n('failed', 'blocked')} | left {n('todo', 'queued')}"
              f" (skipped {self.skipped} complete)" + (f"  {note}" if note else ""), flush=True)


def run_sweep(jobs: list, ray, progress_every=60.0):
    """Submit attacks, then each attack's defenses as soon as its record is complete; return when all are settled."""
    task = ray.remote(run_job)
    pending = {}

    def submit(job):
        try:
            job.log.unlink()  # a stale log from an earlier sweep would look like a running job
        except FileNotFoundError:
            pass
        threads = max(1, math.ceil(job.resources.get("num_cpus", 1) or 1))
        ref = task.options(**job.resources, max_retries=1, name=job.name).remote(job.command(), str(REPO),
                                                                                 str(job.log), threads, str(job.out))
        job.status = "queued"
        pending[ref] = job

    every = [j for a in jobs for j in [a, *a.children]]
    skipped = 0
    for a in jobs:
        if is_complete(a.out):
            a.status = "skipped"
            skipped += 1
        else:
            submit(a)
        if a.status == "skipped":
            for d in a.children:
                if is_complete(d.out):
                    d.status = "skipped"
                    skipped += 1
                else:
                    submit(d)
    prog = Progress(len(every), skipped)
    prog.line(every)
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=5.0)
            started = [j for j in pending.values() if j.status == "queued" and j.log.exists()]
            for j in started:  # a job counts as running once its task has opened its log
                j.status = "running"
            if started and not done:
                prog.line(every, "started " + ", ".join(j.name for j in started))
            for ref in done:
                job = pending.pop(ref)
                try:
                    r = ray.get(ref)
                    job.seconds = r["seconds"]
                    ok = r["rc"] == 0 and is_complete(job.out)
                    job.message = "" if ok else (f"exit code {r['rc']}: {last_line(job.log)}" if r["rc"] != 0 else
                                                 "ended without writing summary.json")
                except Exception as e:  # the worker died (killed, out of memory, node lost)
                    ok, job.message = False, f"Ray task failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
                job.status = "done" if ok else "failed"
                note = f"{'finished' if ok else 'FAILED'} {job.name}" + (f" ({job.seconds:.0f}s)" if job.seconds else "")
                if not ok:
                    note += f": {job.message}; log {job.log}"
                if job.kind == "attack":
                    for d in job.children:
                        if not ok:
                            d.status, d.message = "blocked", f"not run: its attack {job.name} failed"
                        elif is_complete(d.out):
                            d.status = "skipped"
                            prog.skipped += 1
                        else:
                            submit(d)
                prog.line(every, note)
            if not done and time.time() - prog.last >= progress_every:
                prog.line(every)
    except KeyboardInterrupt:
        for ref in pending:
            try:
                ray.cancel(ref, force=True)
            except Exception:
                pass
        raise
    return every


def report(every, root: pathlib.Path, wall: float, sweep_file):
    ran = [j for j in every if j.status in ("done", "failed") and j.seconds]
    bad = [j for j in every if j.status in ("failed", "blocked")]
    serial = sum(j.seconds for j in ran)
    lines = [f"\nsweep {sweep_file}: {len(every)} jobs, {sum(j.status == 'done' for j in every)} run, "
             f"{sum(j.status == 'skipped' for j in every)} skipped (complete), {len(bad)} failed or blocked",
             f"wall time {wall:.1f}s (Ray start included); the jobs run here took {serial:.1f}s in all"
             + (f", {serial / wall:.2f} at a time on average" if wall > 0 and serial else "")]
    if bad:
        lines.append("failures:")
        for j in bad:
            lines.append(f"  {j.name}: {j.message}" + (f"\n      log: {j.log}" if j.status == "failed" else ""))
        lines.append("fix the cause and run the same command again: complete records are skipped")
    print("\n".join(lines))
    state = {"sweep": str(sweep_file), "wall_seconds": round(wall, 2), "job_seconds_sum": round(serial, 2),
             "jobs": [{"name": j.name, "kind": j.kind, "method": j.method, "status": j.status,
                       "seconds": None if j.seconds is None else round(j.seconds, 2), "record": str(j.out),
                       "log": str(j.log), "resources": j.resources, "message": j.message,
                       "command": " ".join(j.command())} for j in every]}
    root.mkdir(parents=True, exist_ok=True)
    (root / "sweep_report.json").write_text(json.dumps(state, indent=2) + "\n")
    return not bad


def parse_args(argv):
    p = argparse.ArgumentParser(prog="sweep/run.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", help="the sweep YAML, e.g. config/sweep/demo.yaml")
    p.add_argument("--address", default=None, help="join this Ray cluster (e.g. 'auto' or 'ray://head:10001'); "
                   "default: start a local Ray instance")
    p.add_argument("--num_cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    p.add_argument("--num_gpus", type=int, default=None, help="GPUs of the local Ray instance (default: all visible)")
    p.add_argument("--num_cpus_per_job", type=float, default=None, help="override the YAML's per-job CPU request")
    p.add_argument("--num_gpus_per_job", type=float, default=None, help="override the YAML's per-job GPU request")
    p.add_argument("--root", default=None, help="record folder of this sweep (default: the YAML's root, "
                   "else record/sweep_<name>)")
    p.add_argument("--dry_run", action="store_true", help="check every job's settings, list the jobs and their state; "
                   "run nothing")
    p.add_argument("--skip_invalid", action="store_true", help="run the valid jobs even if some are refused by their "
                   "script's option checks (default: nothing runs while any job is invalid)")
    p.add_argument("--no_summary", action="store_true", help="do not run analysis/summarize.py at the end")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = load_sweep(args.sweep)
    root = pathlib.Path(args.root or cfg.get("root") or f"record/sweep_{cfg['name']}")
    root = (root if root.is_absolute() else REPO / root).resolve()
    jobs = expand(cfg, root, {"num_cpus": args.num_cpus_per_job, "num_gpus": args.num_gpus_per_job})
    every = [j for a in jobs for j in [a, *a.children]]
    todo = [j for j in every if not is_complete(j.out)]
    print(f"sweep {cfg['name']}: {len(jobs)} attack and {len(every) - len(jobs)} defense jobs, {len(every) - len(todo)} "
          f"already complete; records under {root}")
    invalid = check_jobs(todo)
    if args.dry_run:
        for j in every:
            state = "complete" if is_complete(j.out) else "invalid" if j.name in invalid else "to run"
            print(f"  [{state:8}] {j.name}  {j.resources}\n             {' '.join(j.command())}"
                  + (f"\n             error: {invalid[j.name]}" if j.name in invalid else ""))
        if invalid:
            print(f"{len(invalid)} invalid job(s): fix the sweep YAML (or run with --skip_invalid)", file=sys.stderr)
        return 2 if invalid else 0
    if invalid:
        report_invalid(every, invalid)
        if not args.skip_invalid:
            print("nothing was run: fix the sweep YAML, or pass --skip_invalid to run the other jobs", file=sys.stderr)
            return 2
        jobs = drop_invalid(jobs, invalid)
        every = [j for a in jobs for j in [a, *a.children]]
        todo = [j for j in every if not is_complete(j.out)]
        print(f"--skip_invalid: running the other {len(todo)} job(s)")
    t0 = time.time()
    if todo:
        ray = start_ray(args.address, args.num_cpus, args.num_gpus)
        r = ray.cluster_resources()
        print(f"Ray {'joined at ' + args.address if args.address else 'started locally'} in {time.time() - t0:.1f}s: "
              f"{r.get('CPU', 0):g} CPUs, {r.get('GPU', 0):g} GPUs")
        try:
            check_feasible(ray, todo, bool(args.address))
            run_sweep(jobs, ray)
        except KeyboardInterrupt:
            print("\ninterrupted: rerun the same command to resume (complete records are skipped, "
                  "interrupted ones continue from their checkpoint)", file=sys.stderr)
            return 130
        finally:
            ray.shutdown()
    else:
        for j in every:
            j.status = "skipped"
        print("nothing to run: every record is complete")
    ok = report(every, root, time.time() - t0, args.sweep)
    if not args.no_summary and any(is_complete(j.out) for j in every):
        from analysis.summarize import summarize
        summarize(root, root / "summary", show=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(run_main(main))
