"""Run a grid of experiments on Ray: every attack of the grid (attacks x datasets x models x pratios x seeds ...),
then every defense on each finished attack record (and, with `retune:`, the re-tuning attack on each finished
defense record), each job a Ray task that runs the ordinary command
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
import json
import math
import pathlib
import sys
import time

from sweep.checks import check_jobs, drop_invalid, report_invalid
from sweep.jobs import expand, is_complete, load_sweep, walk
from sweep.ray_tasks import check_feasible, last_line, run_job, start_ray
from utils.errors import UserError, run_main

REPO = pathlib.Path(__file__).resolve().parents[1]


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


def finished(ray, ref, job) -> bool:
    """Record how a job ended (seconds, message) and whether its record is complete."""
    try:
        r = ray.get(ref)
        job.seconds = r["seconds"]
        ok = r["rc"] == 0 and is_complete(job.out)
        job.message = "" if ok else (f"exit code {r['rc']}: {last_line(job.log)}" if r["rc"] != 0 else
                                     "ended without writing summary.json")
    except Exception as e:  # the worker died (killed, out of memory, node lost)
        ok, job.message = False, f"Ray task failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
    job.status = "done" if ok else "failed"
    return ok


class Submitter:
    """Ray tasks in flight: {object ref: job}."""

    def __init__(self, ray):
        self.task, self.pending = ray.remote(run_job), {}

    def submit(self, job):
        job.log.unlink(missing_ok=True)  # a stale log from an earlier sweep would look like a running job
        threads = max(1, math.ceil(job.resources.get("num_cpus", 1) or 1))
        ref = self.task.options(**job.ray_resources(), max_retries=1, name=job.name).remote(
            job.command(), str(REPO), str(job.log), threads, str(job.out))
        job.status = "queued"
        self.pending[ref] = job

    def submit_or_skip(self, jobs) -> int:
        """Submit each job whose record is not complete, and the children of each that is; returns how many were
        skipped."""
        skipped = 0
        for j in jobs:
            if is_complete(j.out):
                j.status = "skipped"
                skipped += 1 + self.submit_or_skip(j.children)
            else:
                self.submit(j)
        return skipped


def run_sweep(jobs: list, ray, progress_every=60.0):
    """Submit attacks, then each job's children (an attack's defenses, a defense's re-tuning) as soon as its record
    is complete; return when all are settled."""
    sub = Submitter(ray)
    every = list(walk(jobs))
    skipped = sub.submit_or_skip(jobs)
    prog = Progress(len(every), skipped)
    prog.line(every)
    try:
        while sub.pending:
            done, _ = ray.wait(list(sub.pending), num_returns=1, timeout=5.0)
            started = [j for j in sub.pending.values() if j.status == "queued" and j.log.exists()]
            for j in started:  # a job counts as running once its task has opened its log
                j.status = "running"
            if started and not done:
                prog.line(every, "started " + ", ".join(j.name for j in started))
            for ref in done:
                job = sub.pending.pop(ref)
                ok = finished(ray, ref, job)
                note = f"{'finished' if ok else 'FAILED'} {job.name}" + (f" ({job.seconds:.0f}s)" if job.seconds else "")
                if not ok:
                    note += f": {job.message}; log {job.log}"
                    for d in walk(job.children):
                        d.status, d.message = "blocked", f"not run: {job.name}, whose record it needs, failed"
                else:
                    prog.skipped += sub.submit_or_skip(job.children)
                prog.line(every, note)
            if not done and time.time() - prog.last >= progress_every:
                prog.line(every)
    except KeyboardInterrupt:
        for ref in sub.pending:
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
    p.add_argument("sweep", nargs="?", help="the sweep YAML, e.g. config/sweep/demo.yaml")
    p.add_argument("--list", action="store_true", help="list the registered attacks and defenses (name, script and "
                   "arguments, paper, what each needs) and exit")
    p.add_argument("--kind", choices=("attack", "defense"), help="with --list: only this kind")
    p.add_argument("--commands", action="store_true", help="with --list: one line per method, its script and fixed "
                   "arguments (for shell loops such as sh/demo.sh)")
    p.add_argument("--markdown", action="store_true", help="with --list: the README's methods table")
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


def methods_markdown(listed) -> str:
    """The README's methods table, one row per registered method."""
    rows = ["| name | kind | command | what it does | paper | needs |", "|---|---|---|---|---|---|"]
    rows += [f"| `{m.name}` | {m.kind} | `python {' '.join(m.command())}` | {m.summary} | {m.paper} | "
             f"{', '.join(m.needs)} |" for m in listed]
    return "\n".join(rows)


def list_methods(kind=None, commands=False, markdown=False):
    from utils.registry import methods
    listed = sorted(methods(kind, listed_only=True), key=lambda m: (m.kind, m.script, m.name))
    if commands or markdown:
        print(methods_markdown(listed) if markdown else "\n".join(" ".join(m.command()) for m in listed))
        return 0
    w = max(len(m.name) for m in listed)
    for m in listed:
        print(f"{m.kind:8} {m.name:<{w}}  {' '.join(m.command()):<34} {m.paper}\n{'':{w + 10}}{m.summary}; "
              f"needs: {', '.join(m.needs) or 'nothing'}")
    return 0


def main(argv=None):
    args = parse_args(argv)
    if args.list:
        return list_methods(args.kind, args.commands, args.markdown)
    if not args.sweep:
        raise UserError("give a sweep YAML (e.g. config/sweep/demo.yaml), or --list")
    cfg = load_sweep(args.sweep)
    root = pathlib.Path(args.root or cfg.get("root") or f"record/sweep_{cfg['name']}")
    root = (root if root.is_absolute() else REPO / root).resolve()
    jobs = expand(cfg, root, {"num_cpus": args.num_cpus_per_job, "num_gpus": args.num_gpus_per_job})
    every = list(walk(jobs))
    todo = [j for j in every if not is_complete(j.out)]
    n_retune = sum(j.kind == "retune" for j in every)
    print(f"sweep {cfg['name']}: {len(jobs)} attack and {len(every) - len(jobs) - n_retune} defense jobs"
          + (f", {n_retune} re-tuning attacks" if n_retune else "") + f", {len(every) - len(todo)} "
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
        every = list(walk(jobs))
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
