"""The architecture: one way in for every method (the registry), a library whose imports only go down, the trigger
protocol (any trigger saved as tensors and rebuilt bit for bit), phases that resume in the right place, hooks
into an attack's training, named model stages with one recorder, and options whose --help tells the truth."""
import ast
import subprocess
import sys


import pytest
import torch
from torch import nn

from models import build_model
from tests.conftest import REPO, make_record
from utils.engine.loop import Phase, fit
from utils.registry import methods
from utils.run_folder import Run
from utils.stages import Intervene, Recorder
from utils.triggers import TRIGGER_KINDS, register_trigger, trigger_file_bytes, trigger_from_record

PACKAGES = ("utils", "models", "attack", "defense", "sweep", "analysis", "bench")
# entry points that run another method's code under its original repository's name, and a method's own helpers
ALLOWED = {"attack.badnet_bypass": {"attack.bypass"}, "attack.blend_bypass": {"attack.bypass"},
           "defense.fst": {"defense.ft"}, "defense.pdb": {"defense.pdb_model"},
           "defense.fmp": {"defense.fmp_ranking"}, "defense.anp": {"defense.anp_pruning"},
           "defense.rnp": {"defense.anp_pruning"}}


# --- the registry -------------------------------------------------------------------------------------------

def test_the_readme_methods_table_is_the_registrys():
    from sweep.run import methods_markdown
    listed = sorted(methods(listed_only=True), key=lambda m: (m.kind, m.script, m.name))
    assert methods_markdown(listed) in (REPO / "README.md").read_text(), \
        "regenerate the README's table with `python sweep/run.py --list --markdown`"


def test_every_method_file_registers_and_the_sweep_reads_the_registry():
    from sweep.jobs import builtin
    scripts = {m.script for m in methods()}
    for kind in ("attack", "defense"):
        for p in sorted((REPO / kind).glob("*.py")):
            name = f"{kind}.{p.stem}"
            helper = any(name in v for v in ALLOWED.values()) and name not in ("attack.bypass", "defense.ft")
            if p.stem == "__init__" or helper or name in ALLOWED and name.endswith("_bypass"):
                continue
            assert f"{kind}/{p.name}" in scripts, f"{kind}/{p.name} registers no method"
        assert set(builtin(kind)) == {m.name for m in methods(kind)}


def test_method_options_are_unique_and_listing_works():
    for m in methods():
        names = [o.name for o in m.options]
        assert len(names) == len(set(names)), m.name
    out = subprocess.run([sys.executable, "sweep/run.py", "--list"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0 and all(m.name in out.stdout for m in methods(listed_only=True))


# --- imports only go down -----------------------------------------------------------------------------------

def module_imports():
    """{module: {imported modules of this repository}} from every import statement (module level or not)."""
    graph = {}
    for pkg in PACKAGES:
        for p in (REPO / pkg).rglob("*.py"):
            mod = ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            deps = set()
            for node in ast.walk(ast.parse(p.read_text())):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    # `from attack import bypass` imports the module attack.bypass
                    subs = [f"{node.module}.{a.name}" for a in node.names
                            if (REPO / node.module.replace(".", "/") / f"{a.name}.py").exists()]
                    names = subs or [node.module]
                else:
                    names = []
                deps |= {n for n in names if n.split(".")[0] in PACKAGES}
            graph[mod] = deps
    return graph


def test_the_library_imports_only_downwards_and_has_no_circle():
    graph = module_imports()
    for mod, deps in graph.items():
        top = mod.split(".")[0]
        if top == "models":
            assert all(d.startswith("models") for d in deps), (mod, deps)
        if top == "utils":
            assert all(d.split(".")[0] in ("utils", "models") for d in deps), (mod, deps)
        if top in ("attack", "defense"):
            others = {d for d in deps if d.split(".")[0] in ("attack", "defense")}
            assert others <= ALLOWED.get(mod, set()), (mod, others)
    # no circle: a depth-first search over the graph of modules (packages resolve to their __init__)
    state = {}

    def visit(m, path):
        state[m] = "open"
        for d in graph.get(m, ()):
            d = d if d in graph else d.rsplit(".", 1)[0]
            assert state.get(d) != "open", f"import circle: {' -> '.join(path + [d])}"
            if d in graph and d not in state:
                visit(d, path + [d])
        state[m] = "done"
    for m in graph:
        if m not in state:
            visit(m, [m])


# --- the trigger protocol -----------------------------------------------------------------------------------

@register_trigger
class ShiftWarp:
    """A toy warp: each image shifted right by a per-image amount from a stored table (WaNet's grid is a warp too)."""
    kind = "test_shift_warp"

    def __init__(self, shifts):
        self.shifts = shifts

    def apply(self, x, idx=None, gen=None, train=True):
        return torch.stack([torch.roll(img, int(self.shifts[i % len(self.shifts)]), dims=-1) for img, i in zip(x, idx)])

    def spec(self):
        return {"kind": self.kind}

    def tensors(self):
        return {"shifts": self.shifts}

    @classmethod
    def from_record(cls, spec, tensors):
        return cls(tensors["shifts"])


@register_trigger
class NetTrigger:
    """A toy sample-specific trigger: a small network's output (noise drawn from the run's generator) added."""
    kind = "test_net_trigger"

    def __init__(self, net):
        self.net = net

    def apply(self, x, idx=None, gen=None, train=True):
        z = torch.rand(x.shape, generator=gen)
        with torch.no_grad():
            d = self.net(z)
        return (x.float() + 40 * d).clamp(0, 255).to(torch.uint8)

    def spec(self):
        return {"kind": self.kind}

    def tensors(self):
        return self.net.state_dict()

    @classmethod
    def from_record(cls, spec, tensors):
        net = nn.Conv2d(1, 1, 3, padding=1)
        net.load_state_dict(tensors)
        return cls(net)


@pytest.mark.parametrize("make", [lambda: ShiftWarp(torch.tensor([1, 3, 5])),
                                  lambda: NetTrigger(nn.Conv2d(1, 1, 3, padding=1))])
def test_warps_and_networks_fit_the_protocol_and_rebuild_bit_for_bit(make):
    import hashlib
    torch.manual_seed(0)
    trig = make()
    x = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8)
    idx = torch.arange(10, 16)
    out = trig.apply(x, idx, torch.Generator().manual_seed(3))
    blob = trigger_file_bytes(trig)
    spec = {**trig.spec(), "tensors_sha256": hashlib.sha256(blob).hexdigest()}
    again = trigger_from_record(spec, blob, "test")
    assert type(again) is type(trig) and trig.kind in TRIGGER_KINDS
    assert torch.equal(again.apply(x, idx, torch.Generator().manual_seed(3)), out)
    from utils.errors import UserError
    with pytest.raises(UserError, match="does not match the digest"):
        trigger_from_record(spec, blob[:-1] + bytes([blob[-1] ^ 1]), "test")


def test_a_format_1_record_still_loads(tmp_path, fake_root):
    """Records written before trigger.safetensors (format 1: the pattern in trigger_pattern.png) still load."""
    import json
    from utils.record import load_attack_record
    rec = tmp_path / "v1"
    make_record(rec, fake_root)
    new = load_attack_record(rec)
    (rec / "trigger.safetensors").unlink()
    for f in ("poison.json", "summary.json"):
        d = json.loads((rec / f).read_text())
        d["format_version"] = 1
        if f == "poison.json":
            d["trigger"] = {k: v for k, v in d["trigger"].items() if not k.startswith("tensors")}
        (rec / f).write_text(json.dumps(d))
    model = torch.load(rec / "model.pt", weights_only=True)
    model["format_version"] = 1
    torch.save(model, rec / "model.pt")
    old = load_attack_record(rec)
    assert torch.equal(old.data.x_bd_test, new.data.x_bd_test) and torch.equal(old.data.x_train, new.data.x_train)


# --- phases and hooks -----------------------------------------------------------------------------------------

class Counter:
    """A checkpointable object whose state is one number."""

    def __init__(self):
        self.n = 0

    def state_dict(self):
        return {"n": torch.tensor(self.n)}

    def load_state_dict(self, d):
        self.n = int(d["n"])


def two_phases(c, trace):
    def step(tag):
        def f(epoch):
            c.n = c.n * 3 + epoch + (100 if tag == "b" else 0)
            trace.append((tag, epoch))
            return {"lr": 0.1, "train_loss": float(c.n)}
        return f
    return [Phase("a", 2, step("a"), lambda: {"test_acc": 0.5}, start=0),
            Phase("b", 3, step("b"), lambda: {"test_acc": float(c.n % 7)}, setup=lambda: trace.append("setup b"))]


def test_a_run_interrupted_in_its_second_phase_resumes_there(tmp_path, monkeypatch):
    c, trace = Counter(), []
    full = fit(Run(tmp_path / "full", "toy", {}), two_phases(c, trace), {"c": c})
    assert trace == [("a", 0), ("a", 1), "setup b", ("b", 1), ("b", 2), ("b", 3)]
    assert [r["phase"] for r in full] == ["a", "a", "b", "b", "b"]
    original = Run.save_checkpoint

    def die(self, epoch, state, phase=0):
        original(self, epoch, state, phase)
        if phase == 1 and epoch == 1:
            raise KeyboardInterrupt
    monkeypatch.setattr(Run, "save_checkpoint", die)
    c2, trace2 = Counter(), []
    run = Run(tmp_path / "cut", "toy", {})
    with pytest.raises(KeyboardInterrupt):
        fit(run, two_phases(c2, trace2), {"c": c2})
    monkeypatch.setattr(Run, "save_checkpoint", original)
    c3, trace3 = Counter(), []
    resumed = fit(Run(tmp_path / "cut", "toy", {}, resume=True), two_phases(c3, trace3), {"c": c3})
    assert trace3 == ["setup b", ("b", 2), ("b", 3)]
    assert [(r["phase"], r["epoch"], r["train_loss"]) for r in resumed] == \
        [(r["phase"], r["epoch"], r["train_loss"]) for r in full]
    assert c3.n == c.n


def stopping_phases(c, trace, stop_at):
    """Phase a stops early once its loss reaches stop_at (of 5 epochs at most), then phase b runs 2 epochs."""
    def step(tag):
        def f(epoch):
            c.n += 1
            trace.append((tag, epoch))
            return {"lr": 0.1, "train_loss": float(c.n)}
        return f
    return [Phase("a", 5, step("a"), lambda: {}, stop=lambda row: row["train_loss"] >= stop_at),
            Phase("b", 2, step("b"), lambda: {}, setup=lambda: trace.append("setup b"))]


def test_a_phase_stops_early_and_a_resume_after_the_stop_goes_on_with_the_next_phase(tmp_path, monkeypatch):
    c, trace = Counter(), []
    full = fit(Run(tmp_path / "full", "toy", {}), stopping_phases(c, trace, 3), {"c": c})
    assert trace == [("a", 1), ("a", 2), ("a", 3), "setup b", ("b", 1), ("b", 2)]
    assert [(r["phase"], r["epoch"]) for r in full] == [("a", 1), ("a", 2), ("a", 3), ("b", 1), ("b", 2)]
    c0, trace0 = Counter(), []   # a stop that never fires: every epoch runs
    fit(Run(tmp_path / "never", "toy", {}), stopping_phases(c0, trace0, 99), {"c": c0})
    assert [t for t in trace0 if t[0] == "a"] == [("a", k) for k in range(1, 6)]
    original, saved = Run.save_checkpoint, []

    def die(self, epoch, state, phase=0):   # killed right after the checkpoint of the stopping epoch
        original(self, epoch, state, phase)
        saved.append((phase, epoch))
        if phase == 0 and len(saved) == 3:
            raise KeyboardInterrupt
    monkeypatch.setattr(Run, "save_checkpoint", die)
    c2 = Counter()
    with pytest.raises(KeyboardInterrupt):
        fit(Run(tmp_path / "cut", "toy", {}), stopping_phases(c2, [], 3), {"c": c2})
    monkeypatch.setattr(Run, "save_checkpoint", original)
    assert saved == [(0, 1), (0, 2), (0, 5)]   # the stop is written as the phase's epochs done
    c3, trace3 = Counter(), []
    resumed = fit(Run(tmp_path / "cut", "toy", {}, resume=True), stopping_phases(c3, trace3, 99), {"c": c3})
    assert trace3 == ["setup b", ("b", 1), ("b", 2)]   # no further epoch of a, even with a stop that would not fire
    assert [(r["phase"], r["epoch"], r["train_loss"]) for r in resumed] == \
        [(r["phase"], r["epoch"], r["train_loss"]) for r in full] and c3.n == c.n


def test_an_attack_can_build_its_own_batches_and_act_before_each_epoch(tmp_path, fake_root):
    """Training.batch and Training.epoch_start: here every batch is relabelled to class 3 and the epochs counted;
    the model must then answer 3 everywhere."""
    from utils.attack import Training, run_attack
    from utils.engine.augment import to_unit
    import attack.badnet as badnet
    seen = {"epochs": [], "batches": 0}

    def training(ctx):
        def batch(ctx, idx):
            seen["batches"] += 1
            return to_unit(ctx.x_train[idx]), torch.full_like(ctx.y_train[idx], 3)
        return Training(batch=batch, epoch_start=lambda ctx, e: seen["epochs"].append(e))
    cfg, args, trigger, meta = badnet.configure(["--dataset_path", str(fake_root), "--save_folder_name",
                                                 str(tmp_path / "r"), "--epochs", "2", "--batch_size", "100",
                                                 "--lr", "0.05"])
    s = run_attack("badnet", cfg, args, trigger, meta, training=training)
    assert seen == {"epochs": [1, 2], "batches": 12}
    assert s["test_asr"] == 0.0 and 0.0 < s["test_acc"] < 0.2   # class 3 is about a tenth of the test set


# --- stages and the recorder ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return build_model("preactresnet18", 10, 3, (0.5,) * 3, (0.5,) * 3, 4).eval()


def test_stages_carry_backdoorbenchs_names(resnet):
    assert list(resnet.stages()) == ["conv1", "layer1", "layer2", "layer3", "layer4"]
    assert list(build_model("cnn", 10, 1, (0.5,), (0.5,)).stages()) == ["layer1", "layer2", "layer3", "layer4"]
    names = dict(resnet.named_modules())
    assert all(f"layer{i}.{j}.{m}" in names for i in range(1, 5) for j in (0, 1) for m in ("conv1", "bn1", "conv2", "bn2"))


def test_the_recorder_serves_nad_fine_pruning_anp_and_npd(resnet):
    x = torch.rand(3, 3, 16, 16, requires_grad=True)
    # NAD: attention maps of stage outputs, with gradients flowing
    with Recorder(resnet, ["layer2", "layer3", "layer4"], grads=True) as rec:
        logits = resnet(x)
    a = rec["layer3"].pow(2).mean(1)                      # the attention map: mean over channels of |F|^2
    assert a.shape == (3, 4, 4)
    logits.sum().backward()
    assert rec.grad["layer4"].shape == rec["layer4"].shape and rec.grad["layer4"].abs().sum() > 0
    # Fine-Pruning: mean activation per channel of the last stage; pruning = masking those channels
    with torch.no_grad(), Recorder(resnet, ["layer4"]) as rec:
        resnet(x)
    mean_act = rec["layer4"].mean((0, 2, 3))
    mask = torch.ones_like(mean_act)
    mask[mean_act.argsort()[:5]] = 0
    with torch.no_grad(), Intervene(resnet, {"layer4": lambda out: out * mask[None, :, None, None]}), \
            Recorder(resnet, ["layer4"]) as rec:
        pruned = resnet(x)
    assert (rec["layer4"][:, mask == 0] == 0).all() and not torch.allclose(pruned, resnet(x))
    # ANP: a multiplicative neuron mask on a batch norm's output; NPD: a layer inserted after a stage
    with torch.no_grad(), Intervene(resnet, {"layer1.0.bn2": lambda out: out * 0}):
        assert not torch.allclose(resnet(x), resnet(x) * 0 + resnet(x).detach() + 1)
    polarizer = nn.Conv2d(32, 32, 1)
    nn.init.dirac_(polarizer.weight)
    nn.init.zeros_(polarizer.bias)
    with torch.no_grad(), Intervene(resnet, {"layer4": polarizer}):   # the identity at initialisation
        assert torch.allclose(resnet(x), resnet(x), atol=1e-6)
    from utils.errors import UserError
    with pytest.raises(UserError, match="no stage or module 'layer9'"):
        Recorder(resnet, ["layer9"])


# --- options ---------------------------------------------------------------------------------------------------

def test_help_shows_the_value_that_will_be_used(tiny_record):
    out = subprocess.run([sys.executable, "defense/pdb.py", "--result_file", str(tiny_record), "--help"], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    assert "(default: 5; spec: 100)" in text and "(default: 0.5; spec: 0.1)" in text   # epochs, ratio
    out = subprocess.run([sys.executable, "attack/badnet.py", "--help"], cwd=REPO, capture_output=True, text=True)
    assert "(default: 6; spec: 100)" in " ".join(out.stdout.split())   # epochs of the fashion_mnist prototype


def test_a_defense_needs_no_file_per_dataset(tiny_record, tmp_path):
    """config/defense/<defense>/default.yaml plus optional overrides: a dataset without a file of its own resolves."""
    from utils.defense import DefenseLayers
    layers = DefenseLayers("sau", "sau", given_dataset="cifar10")
    files = [f for f, _ in layers({"result_file": str(tmp_path / "not_yet")}, {})]
    assert files == ["config/defense/sau/default.yaml"]
    layers = DefenseLayers("sau", "sau")
    assert [f for f, _ in layers({"result_file": str(tiny_record)}, {})] == \
        ["config/defense/sau/default.yaml", "config/defense/sau/fashion_mnist.yaml"]
