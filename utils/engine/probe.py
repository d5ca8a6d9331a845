"""--amp auto and --channels_last auto: the precision and memory layout that train this model fastest here.

On a GPU the rule is known (bf16 or fp16 autocast, channels_last). On a CPU it is not: bf16 autocast with
channels_last was 2.7x faster than fp32 on one AVX-512 machine and 0.79x on another (conventions §5, §14), so a
short timed probe decides. Each candidate trains a copy of the model for a few steps on random data of the run's
shape; a candidate other than plain fp32 is taken only when it is more than 5% faster (below that the timing
noise decides). The answer is cached per machine, torch version, thread count, model and batch size in the user
cache (a later run skips the probe) and recorded in config.yaml; a resumed or overwritten record keeps the choice
it recorded, so the same seed gives the same result on the same machine.
"""
import copy
import json
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from utils.engine.device import Precision, cpu_bf16
from utils.io import atomic_write_json

MARGIN = 1.05          # a non-fp32 candidate must be this much faster than plain fp32
ROUNDS = 3             # interleaved timing rounds per candidate
ROUND_SECONDS = 0.1    # a round is one step, or as many as take this long (small models)
PROBE_BATCH = 64       # at most this batch: a PreAct-ResNet-18 step on a CPU takes a second already


def cache_file() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "backdoor-toolkit" / "precision_probe.json"


def processor() -> str:
    """The CPU's model name and the flags that decide its bf16 speed."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    have = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name} [{' '.join(have)}]" if have else name


def label(amp, channels_last):
    return f"{'bf16' if amp and cpu_bf16() else 'fp32'}{' + channels_last' if channels_last else ''}"


def measure(model, device, candidates, input_shape, batch_size, rounds=ROUNDS, round_seconds=ROUND_SECONDS):
    """img/s of training steps (forward, CE, backward, SGD) of a copy of the model per candidate, on random data.
    One warm-up step each (allocation, oneDNN's kernel choice), then `rounds` interleaved rounds, so that a burst of
    load on the machine hits every candidate alike; each keeps its best round."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch_size, *input_shape, generator=g).to(device)
    y = torch.randint(0, 2, (batch_size,), generator=g).to(device)
    runs = []
    for amp, cl in candidates:
        p = Precision(device, amp, cl)
        m = p.prepare_model(copy.deepcopy(model).to(device).train())
        runs.append((p, m, torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9), p.prepare_input(x)))

    def step(p, m, opt, xb):
        with p.autocast():
            loss = F.cross_entropy(m(xb).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for r in runs:
        step(*r)
    best = [0.0] * len(runs)
    for _ in range(rounds):
        for i, r in enumerate(runs):
            n, t0 = 0, time.perf_counter()
            while n == 0 or time.perf_counter() - t0 < round_seconds:
                step(*r)
                n += 1
            best[i] = max(best[i], batch_size * n / (time.perf_counter() - t0))
    return best


def probe_key(model_id, input_shape, batch_size):
    return (f"{processor()} | torch {torch.__version__} | {torch.get_num_threads()} threads | {model_id} | "
            f"input {list(input_shape)} | batch {batch_size}")


def read_cache():
    try:
        d = json.loads(cache_file().read_text())
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}   # no cache yet, or a damaged one: probe again


def write_cache(key, entry):
    d = read_cache()
    d[key] = entry
    try:
        cache_file().parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(cache_file(), d)
    except OSError as e:
        print(f"note: could not cache the precision probe in {cache_file()} ({e.strerror}); later runs probe again")


def resolve_precision(cfg, device, model, model_id, input_shape, batch_size, recorded=None):
    """(amp, channels_last, how): cfg's amp and channels_last with 'auto' decided; model_id names the model and its
    width in the cache. recorded: the choice an earlier
    session of this record wrote into config.yaml, kept so that a resumed or rerun record does not switch."""
    amp, cl = cfg["amp"], cfg["channels_last"]
    if amp != "auto" and cl != "auto":
        return amp, cl, {"source": "forced", "amp": amp, "channels_last": cl}
    if recorded and "amp" in recorded and "channels_last" in recorded:
        return (recorded["amp"] if amp == "auto" else amp, recorded["channels_last"] if cl == "auto" else cl,
                {**recorded, "source": "recorded in this record's earlier session"})
    if device.type == "cuda":
        a, c = True if amp == "auto" else amp, True if cl == "auto" else cl
        return a, c, {"source": "rule for CUDA", "amp": a, "channels_last": c}
    amps = ([False, True] if cpu_bf16() else [False]) if amp == "auto" else [amp]
    layouts = [False, True] if cl == "auto" else [cl]
    candidates = [(a, c) for a in amps for c in layouts]
    if len(candidates) == 1:
        (a, c), = candidates
        return a, c, {"source": "only candidate (this CPU has no bf16)", "amp": a, "channels_last": c}
    key = probe_key(model_id, input_shape, batch_size)
    cached = read_cache().get(key)
    if cached and all(label(a, c) in cached.get("img_per_s", {}) for a, c in candidates):
        speeds, source = cached["img_per_s"], "cached probe"
    else:
        t0 = time.perf_counter()
        rates = measure(model, device, candidates, input_shape, min(batch_size, PROBE_BATCH))
        speeds = {label(a, c): round(v, 1) for (a, c), v in zip(candidates, rates)}
        source = f"probe of {time.perf_counter() - t0:.1f}s"
        write_cache(key, {"img_per_s": speeds, "date": time.strftime("%Y-%m-%d %H:%M:%S")})
    base = candidates[0]   # the plainest candidate: fp32 (or the forced precision) in the default layout
    best = max(candidates, key=lambda ac: speeds[label(*ac)])
    if speeds[label(*best)] <= MARGIN * speeds[label(*base)]:
        best = base
    a, c = best
    print(f"precision: {label(a, c)} ({source}: " + ", ".join(f"{k} {v:g} img/s" for k, v in speeds.items()) + ")")
    return a, c, {"source": source, "amp": a, "channels_last": c, "img_per_s": speeds,
                  "probe_batch": min(batch_size, PROBE_BATCH), "machine": processor(), "threads": torch.get_num_threads()}
