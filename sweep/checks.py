"""Every job of a sweep checked before anything runs: its full command line through its own script's option checks
(the registered configure()), all bad jobs reported at once."""
import contextlib
import io
import sys

from sweep.jobs import Job
from utils.errors import UserError


def check_job(job: Job):
    """None if the job's command passes its script's own option checks (the registered configure()), else the
    one-line error. A defense whose attack record does not exist yet is checked against the attack's dataset. A
    script of the YAML's own is checked when it runs."""
    from utils.registry import REGISTRY, discover
    discover()
    m = REGISTRY.get(job.method)
    if m is None or m.script != job.script:
        return None
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            m.configure(job.args) if job.kind == "attack" else m.configure(job.args, dataset=job.dataset)
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
