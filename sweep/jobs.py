"""A sweep YAML -> the jobs it asks for: the attacks of a grid, the defenses on each attack record and, with
`retune:`, the re-tuning attack on each defense record: a tree whose every job needs its parent's record
(sweep/checks.py checks them before anything runs)."""
import itertools
import pathlib
from dataclasses import dataclass, field

import yaml

from utils.errors import UserError

REPO = pathlib.Path(__file__).resolve().parents[1]

# --- what can be run: the registry's methods (utils/registry.py), plus the sweep YAML's own entries -------------
# Arguments may use {dataset}, {model}, {seed} (templated per job); `requires` lists files that must exist
# (templated too), otherwise the job is skipped with a warning. A sweep YAML may add entries of the same shape.

def builtin(kind: str) -> dict:
    """{name: {script, args, requires, out}} of every registered method of this kind."""
    from utils.registry import methods
    return {m.name: {"script": m.script, "args": list(m.args), "requires": list(m.requires),
                     **({"out": m.out} if m.out else {})} for m in methods(kind)}


GRID_ALIASES = {"seed": "random_seed", "target": "attack_target"}   # grid key -> attack option
NAME_ORDER = ("dataset", "model", "pratio", "target", "seed")        # parts of a record's name, in this order
NAME_PREFIX = {"dataset": "", "model": "", "pratio": "p", "target": "t", "seed": "s"}
RESOURCE_KEYS = ("num_cpus", "num_gpus", "memory", "gpu_memory")
RAY_KEYS = ("num_cpus", "num_gpus", "memory")   # gpu_memory (GiB a job needs on its card) is checked, not sent
TOP_KEYS = ("name", "root", "dataset_path", "grid", "attacks", "defenses", "args", "resources", "defense_seed",
            "retune")
RETUNE_SCRIPT = "analysis/retune.py"
RETUNE_FIXED = ("result_file", "random_seed", "out_suffix", "start_model")   # set by the sweep, not by `retune:`


@dataclass
class Job:
    name: str                  # unique, also the log's name
    kind: str                  # "attack", "defense" or "retune"
    method: str                # attack or defense name, or "retune"
    script: str
    args: list
    out: pathlib.Path          # the record folder this job completes
    resources: dict
    log: pathlib.Path
    dataset: str = "fashion_mnist"   # the attack's dataset (a defense job is checked against it)
    parent: "Job" = None       # the job whose record this one needs (a defense's attack, a retune's defense)
    values: dict = field(default_factory=dict)   # an attack's {dataset, model, seed}, for its defenses' templates
    children: list = field(default_factory=list)
    status: str = "todo"       # todo, skipped, running, done, failed, blocked
    seconds: float = None
    message: str = ""

    def command(self, python="python"):
        # --resume continues an interrupted record from its checkpoint, starts a missing one, and starts again one
        # that died before its first checkpoint; run_job skips a record that is already complete
        return [python, self.script, *self.device_args(), "--resume"]

    def device_args(self):
        """A job granted a GPU runs on it: --device auto (or none) becomes cuda (Ray's CUDA_VISIBLE_DEVICES names
        the granted card), so a CUDA that cannot start fails the job instead of dropping it to the CPU."""
        args = list(self.args)
        if not self.resources.get("num_gpus"):
            return args
        if "--device" not in args:
            return args + ["--device", "cuda"]
        i = args.index("--device") + 1
        if i < len(args) and args[i] == "auto":
            args[i] = "cuda"
        return args

    def ray_resources(self):
        return {k: v for k, v in self.resources.items() if k in RAY_KEYS}


def walk(jobs):
    """Every job of the trees, each before its children."""
    for j in jobs:
        yield j
        yield from walk(j.children)


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


def _defense_names(cfg, defenses: dict, warn) -> list:
    """defenses: "all" (every registered one), none, a list of names, or {name: {script, ...}} entries (added to
    `defenses`)."""
    dsel = cfg.get("defenses", "all")
    if dsel in (None, "none", []):
        return []
    if dsel == "all":
        names = list(defenses)
    else:
        names = []
        for d in _as_list(dsel):
            if isinstance(d, dict):
                defenses.update(_registry({}, d, "defense"))
                names += list(d)
            else:
                names.append(str(d))
    unknown = [d for d in names if d not in defenses]
    if unknown:
        raise UserError(f"unknown defense(s) {unknown}; known: {', '.join(defenses)} (or give a mapping with its script)")
    missing = sorted({d for d in names if not _script_path(defenses[d]["script"]).exists()})
    if missing:
        raise UserError(f"defense script(s) not found: {', '.join(sorted({defenses[d]['script'] for d in missing}))}")
    return names


def _grid_points(grid: dict):
    """Every combination of the grid's values, keys in record-name order."""
    for k in grid:
        grid[k] = _as_list(grid[k])
        if not grid[k]:
            raise UserError(f"grid.{k} is empty")
    named = [k for k in NAME_ORDER if k in grid] + sorted(k for k in grid if k not in NAME_ORDER)
    return [dict(zip(named, values)) for values in itertools.product(*(grid[k] for k in named))]


@dataclass
class Plan:
    """What every job of one sweep shares."""
    cfg: dict
    root: pathlib.Path
    args: dict
    dataset_path: str
    defense_seed: object
    override: dict
    warn: object
    retune: dict = None        # the re-tuning attack's options after every defense; None: none


def _plan(cfg, root, override_res, warn) -> Plan:
    args = cfg.get("args") or {}
    if not isinstance(args, dict):
        raise UserError("'args' must be a mapping: {attack: {...}, defense: {...}, <method>: {...}}")
    defense_seed = cfg.get("defense_seed", "grid")
    seed_ok = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0   # noqa: E731
    if not (defense_seed == "grid" or seed_ok(defense_seed) or (isinstance(defense_seed, list) and defense_seed
                                                                and all(map(seed_ok, defense_seed))
                                                                and len(set(defense_seed)) == len(defense_seed))):
        raise UserError(f"defense_seed = {defense_seed!r}; allowed: 'grid' (the attack's seed), an integer >= 0, or "
                        "a list of distinct integers (each defense runs once per seed on every attack record)")
    dataset_path = cfg.get("dataset_path")
    return Plan(cfg, root, args, None if dataset_path is None else str(_script_path(dataset_path)), defense_seed,
                override_res or {}, warn, _retune_options(cfg.get("retune", False)))


def _retune_options(value):
    """retune: false (default), true (the re-tuning attack with its dataset's settings after every defense), or a
    mapping of analysis/retune.py options."""
    if value in (None, False):
        return None
    if value is True:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"retune = {value!r}; allowed: false, true, or a mapping of analysis/retune.py options "
                        "(e.g. {epochs: 5})")
    from analysis.retune import OPTIONS
    known = {o.name for o in OPTIONS} - set(RETUNE_FIXED)
    bad = sorted(set(value) - known)
    if bad:
        raise UserError(f"retune: unknown option(s) {bad}; allowed: {', '.join(sorted(known))} (the sweep sets "
                        f"{', '.join(RETUNE_FIXED[:3])} itself)")
    return dict(value)


def _attack_job(p: Plan, a: str, spec: dict, point: dict) -> Job:
    name = "_".join([a] + [f"{NAME_PREFIX.get(k, k)}{_fmt(v)}".replace("/", "-") for k, v in point.items()])
    given = {**(p.args.get("attack") or {}), **(p.args.get(a) or {}), **point}
    values = {"dataset": given.get("dataset", "fashion_mnist"), "model": given.get("model", ""),
              "seed": given.get("seed", given.get("random_seed", 0))}
    out = p.root / name
    a_args = _template(spec.get("args", []), values) + ["--save_folder_name", str(out)]
    if p.dataset_path:
        a_args += ["--dataset_path", p.dataset_path]
    a_args += _option_args({GRID_ALIASES.get(k, k): v for k, v in point.items()}, "grid")
    a_args += _option_args(p.args.get("attack") or {}, "args.attack") + _option_args(p.args.get(a) or {}, f"args.{a}")
    return Job(name, "attack", a, spec["script"], a_args, out, _resources(p.cfg, "attack", a, p.override),
               p.root / "sweep_logs" / f"{name}.log", str(values["dataset"]), values=values)


def _defense_jobs(p: Plan, job: Job, d: str, dspec: dict) -> list:
    """The jobs of defense d on the attack job's record: one, or one per seed of a defense_seed list (each in a
    folder of its own, <out>_ds<seed>)."""
    if not isinstance(p.defense_seed, list):
        j = _defense_job(p, job, d, dspec)
        return [j] if j is not None else []
    jobs = [_defense_job(p, job, d, dspec, s, f"_ds{s}") for s in p.defense_seed]
    return [j for j in jobs if j is not None]


def _defense_job(p: Plan, job: Job, d: str, dspec: dict, seed=None, suffix=""):
    """The job of defense d on the attack job's record; None (with a warning) when a file it requires is missing."""
    req = [_script_path(r) for r in _template(dspec.get("requires", []), job.values)]
    lacking = [str(r.relative_to(REPO) if r.is_relative_to(REPO) else r) for r in req if not r.exists()]
    if lacking:
        p.warn(f"warning: skipping {d} on {job.name}: {', '.join(lacking)} missing")
        return None
    d_args = _template(dspec.get("args", []), job.values) + ["--result_file", str(job.out)]
    if p.dataset_path:
        d_args += ["--dataset_path", p.dataset_path]
    if seed is None:
        seed = job.values["seed"] if p.defense_seed == "grid" else p.defense_seed
    d_args += ["--random_seed", str(seed)] + (["--out_suffix", suffix] if suffix else [])
    d_args += _option_args(p.args.get("defense") or {}, "args.defense") + _option_args(p.args.get(d) or {}, f"args.{d}")
    dj = Job(f"{job.name}__{d}{suffix}", "defense", d, dspec["script"], d_args,
             job.out / "defense" / (str(dspec.get("out", d)) + suffix), _resources(p.cfg, "defense", d, p.override),
             p.root / "sweep_logs" / f"{job.name}__{d}{suffix}.log", job.dataset, job, values=job.values)
    if p.retune is not None:
        dj.children = [_retune_job(p, dj, seed)]
    return dj


def _retune_job(p: Plan, dj: Job, seed) -> Job:
    """The re-tuning attack on defense job dj's record, at the defense's seed; resources under resources.retune."""
    r_args = ["--result_file", str(dj.out), "--random_seed", str(seed)]
    if p.dataset_path:
        r_args += ["--dataset_path", p.dataset_path]
    r_args += _option_args(p.retune, "retune")
    return Job(f"{dj.name}__retune", "retune", "retune", RETUNE_SCRIPT, r_args, dj.out / "retune",
               _resources(p.cfg, "retune", "retune", p.override), p.root / "sweep_logs" / f"{dj.name}__retune.log",
               dj.dataset, dj, values=dj.values)


def expand(cfg: dict, root: pathlib.Path, override_res=None, warn=print) -> list:
    """Every attack job of the grid, each with its defense jobs as children (and theirs, the re-tuning attack, with
    `retune:`). Nothing runs here."""
    attacks = _registry(builtin("attack"), cfg.get("attacks"), "attack")
    defenses = _registry(builtin("defense"), None, "defense")
    grid = dict(cfg["grid"])
    attack_names = [str(a) for a in _as_list(grid.pop("attack"))]
    unknown = [a for a in attack_names if a not in attacks]
    if unknown:
        raise UserError(f"unknown attack(s) {unknown} in grid.attack; known: {', '.join(attacks)} "
                        "(add others under 'attacks:' with their script)")
    dnames = _defense_names(cfg, defenses, warn)
    p = _plan(cfg, root, override_res, warn)
    jobs, seen = [], set()
    for a in attack_names:
        for point in _grid_points(grid):
            job = _attack_job(p, a, attacks[a], point)
            if job.name in seen:
                raise UserError(f"two grid points give the record name {job.name}; make the grid values distinct")
            seen.add(job.name)
            jobs.append(job)
            job.children = [dj for d in dnames for dj in _defense_jobs(p, job, d, defenses[d])]
    return jobs
