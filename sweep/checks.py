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
    script of the YAML's own, and the re-tuning attack (its options are checked by name when the sweep is read; it
    needs its defense record to resolve the rest), are checked when they run."""
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
    """{job name: error} for every job whose command line is refused, and every job below a refused one (parents
    come first in `jobs`)."""
    invalid = {}
    for j in jobs:
        msg = check_job(j)
        if msg is None and j.parent is not None and j.parent.name in invalid:
            msg = f"{j.parent.name}, whose record it needs, is invalid"
        if msg is not None:
            invalid[j.name] = msg
    return invalid


def drop_invalid(jobs: list, invalid: dict) -> list:
    """The jobs that are valid, each with only its valid children, at every level (--skip_invalid)."""
    kept = [j for j in jobs if j.name not in invalid]
    for j in kept:
        j.children = drop_invalid(j.children, invalid)
    return kept


def report_invalid(every: list, invalid: dict):
    print(f"{len(invalid)} job(s) have settings their script refuses:", file=sys.stderr)
    for j in every:
        if j.name in invalid:
            print(f"  {j.name}: {invalid[j.name]}\n      {' '.join(j.command())}", file=sys.stderr)
