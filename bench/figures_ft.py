"""Figures of the fine-tuning family: every mode (ft, lp, fe-tuning, ft-init, fst) on each attack record, as a
Markdown table of ACC / ASR / RA (and DER) beside the undefended model's figures, plus FST's targets
(ASR <= 0.05, clean accuracy at most 3 points below the attack's).

    python bench/figures_ft.py                       # record/badnet_demo, blend_demo, badnet_p001, blend_p001
    python bench/figures_ft.py --records badnet_demo --modes fst ft --bb

Missing default records at pratio 0.01 are made first (`python attack/badnet.py --save_folder_name badnet_p001
--pratio 0.01`, likewise blend_p001). A defense whose record is already complete is read, not re-run, unless
--overwrite is given. Each defense runs with its dataset's defaults from config/defense/ft/.
"""
import argparse
import json
import pathlib
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from utils.record import is_complete, record_path  # noqa: E402

MODES = ["ft", "lp", "fe-tuning", "ft-init", "fst"]
DEFAULT_RECORDS = ["badnet_demo", "blend_demo", "badnet_p001", "blend_p001"]
MAKE = {"badnet_p001": ["attack/badnet.py", "--pratio", "0.01"], "blend_p001": ["attack/blend.py", "--pratio", "0.01"]}


def sh(argv):
    print("$ python " + " ".join(argv), flush=True)
    t0 = time.time()
    r = subprocess.run([sys.executable, *argv], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        print(r.stdout[-3000:])
        sys.exit(f"failed (exit {r.returncode}): python {' '.join(argv)}")
    return time.time() - t0


def ensure_record(name):
    path = record_path(name)
    if is_complete(path):
        return path
    if name not in MAKE:
        sys.exit(f"no complete attack record at {path}; make it first (python attack/badnet.py --save_folder_name {name})")
    script, *rest = MAKE[name]
    resume = ["--resume"] if path.exists() else []
    sh([script, "--save_folder_name", name, *rest, *resume])
    return path


def run_defense(path, mode, overwrite, bb=False):
    out = path / "defense" / ("ft-bb" if bb else mode)
    if is_complete(out) and not overwrite:
        return json.loads((out / "summary.json").read_text()), None
    dataset = json.loads((path / "poison.json").read_text())["dataset"]
    argv = ["defense/ft.py", "--result_file", str(path)]
    argv += ["--yaml_path", f"config/defense/ft/backdoorbench_{dataset}.yaml"] if bb else ["--ft_mode", mode]
    if out.exists():
        argv.append("--overwrite")
    seconds = sh(argv)
    return json.loads((out / "summary.json").read_text()), seconds


def pct(v):
    return f"{100 * v:.2f}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", nargs="+", default=DEFAULT_RECORDS, help="attack records (names under record/ or paths)")
    p.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    p.add_argument("--bb", action="store_true", help="also run BackdoorBench's FT baseline (defense/ft-bb/)")
    p.add_argument("--overwrite", action="store_true", help="re-run defenses whose records are complete")
    args = p.parse_args(argv)

    rows, checks, times = [], [], []
    for name in args.records:
        path = ensure_record(name)
        poison = json.loads((path / "poison.json").read_text())
        label = f"{poison['attack']} {poison['pratio']:g}"
        results = [(m, *run_defense(path, m, args.overwrite)) for m in args.modes]
        if args.bb:
            results.append(("ft-bb", *run_defense(path, "ft", args.overwrite, bb=True)))
        a = results[0][1]
        rows.append(f"| {label} | no defense | {pct(a['attack_test_acc'])} | {pct(a['attack_test_asr'])} | "
                    f"{pct(a['attack_test_ra'])} | |")
        for mode, s, secs in results:
            rows.append(f"| {label} | {mode} | {pct(s['test_acc'])} | {pct(s['test_asr'])} | {pct(s['test_ra'])} | "
                        f"{pct(s['der'])} |")
            if secs is not None:
                times.append(f"{name}/{mode}: {secs:.0f}s")
            if mode == "fst":
                drop = s["attack_test_acc"] - s["test_acc"]
                ok = s["test_asr"] <= 0.05 and drop <= 0.03
                checks.append(f"- {name}: fst ASR {pct(s['test_asr'])} (target <= 5), ACC drop {100 * drop:.2f} points "
                              f"(target <= 3): {'met' if ok else 'MISSED'}")

    print("\n| attack pratio | defense | ACC | ASR | RA | DER |\n|---|---|---|---|---|---|")
    print("\n".join(rows))
    if checks:
        print("\nFST targets:\n" + "\n".join(checks))
    if times:
        print("\nwall time per defense run (this machine, as measured): " + ", ".join(times))


if __name__ == "__main__":
    main()
