"""What runs inside Ray: one job's command in a subprocess with its own log, and starting or joining Ray."""
import os
import pathlib
import sys
import time

from sweep.jobs import is_complete
from utils.errors import UserError


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


def card_memory_gib():
    """Memory of this machine's first GPU in GiB, or None without one."""
    try:
        import torch
        return torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else None
    except Exception:
        return None


def check_gpu_memory(jobs, card_gib):
    """Jobs that share a card (num_gpus below 1) must fit in its memory together. Any set Ray may place on one card
    has num_gpus summing to at most 1, so its memory is at most max(gpu_memory / num_gpus) over the jobs: that
    bound must fit the card. Jobs without gpu_memory are not checked."""
    declared = [j for j in jobs if j.resources.get("gpu_memory") and j.resources.get("num_gpus")]
    if not declared or card_gib is None:
        return
    worst = max(declared, key=lambda j: j.resources["gpu_memory"] / j.resources["num_gpus"])
    need = worst.resources["gpu_memory"] / worst.resources["num_gpus"]
    if need > card_gib:
        per_card = int(1 / worst.resources["num_gpus"])
        raise UserError(f"{worst.name}: {per_card} such jobs share a card (num_gpus {worst.resources['num_gpus']:g}) "
                        f"and need {worst.resources['gpu_memory']:g} GiB each, {need:.1f} GiB together, but the card "
                        f"has {card_gib:.1f} GiB; raise num_gpus (fewer jobs per card) or lower gpu_memory")


def check_feasible(ray, jobs, joining):
    check_gpu_memory(jobs, card_memory_gib())
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


