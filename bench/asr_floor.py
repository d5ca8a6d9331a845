"""The ASR floor: what the ASR metric gives for models that do not carry a record's backdoor.

ASR counts the non-target test images that, with the trigger on, are classified as the target (conventions §9). A
model without the backdoor still sends some of them there: images of classes that look like the target, and
images the trigger damages (the Blended trigger covers the whole image). A defense's residual ASR is best read
against that level, so this script measures it: every model listed is evaluated on every record's poisoned test
set.

    python attack/badnet.py --save_folder_name clean_ref --p_num 1    # one poisoned image in 60,000: no backdoor
    python bench/asr_floor.py --records badnet_demo blend_demo --models clean_ref badnet_demo blend_demo \
        badnet_demo/defense/pdb

--models takes attack records or defense records (record/<name>/defense/<defense>, e.g. PDB's defended model on
the other attack's trigger); weights only. Each row is one model, each column one record's trigger; a cell is
ASR (RA). A record's own model on its own trigger is the attack; the other cells are floors.
"""
import argparse
import pathlib


import torch

from utils.errors import UserError, run_main
from utils.record import load_attack_record, load_record_model
from utils.engine.device import Precision, pick_device
from utils.engine.evaluate import EvalSets, evaluate_backdoor


@torch.no_grad()
def floor_table(records, models, precision, device):
    """{model name: {record name: (acc, asr, ra)}}: each model on each record's clean and poisoned test sets."""
    loaded = {name: load_attack_record(name, device=device) for name in dict.fromkeys(records)}
    first = loaded[records[0]]
    for name, rec in loaded.items():
        if rec.config["dataset"] != first.config["dataset"]:
            raise UserError(f"record {name} is on {rec.config['dataset']}, record {records[0]} on {first.config['dataset']}: "
                            "compare records of one dataset")
    sets = {name: EvalSets(rec.data, device) for name, rec in loaded.items()}   # built once, used by every model
    table = {}
    for m in models:
        model = precision.prepare_model(load_record_model(m, first.config["dataset"], device)).eval()
        table[m] = {}
        for r in records:
            d = evaluate_backdoor(model, sets[r], precision)
            table[m][r] = (d["test_acc"], d["test_asr"], d["test_ra"])
    return table


def markdown(table, records):
    short = lambda name: "/".join(pathlib.Path(name).parts[-3:] if "defense" in pathlib.Path(name).parts
                                  else pathlib.Path(name).parts[-1:])
    lines = ["| model | ACC | " + " | ".join(f"{short(r)}: ASR (RA)" for r in records) + " |",
             "|---|---|" + "---|" * len(records)]
    for m, row in table.items():
        acc = row[records[0]][0]
        cells = [f"{row[r][1]:.4f} ({row[r][2]:.3f})" + (" = attack" if r == m else "") for r in records]
        lines.append(f"| {short(m)} | {acc:.4f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", nargs="+", required=True, help="attack records whose poisoned test sets are used")
    ap.add_argument("--models", nargs="+", required=True, help="attack records or defense records (<record>/defense/<defense>) whose models are evaluated")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    device = pick_device(args.device)
    table = floor_table(args.records, args.models, Precision(device, amp=False, channels_last=False), device)
    print(markdown(table, args.records))
    return table


if __name__ == "__main__":
    run_main(main)
