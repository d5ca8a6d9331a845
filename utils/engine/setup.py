"""The engine of one run: determinism, the precision that --amp / --channels_last auto resolve to, compile, and
what config.yaml records of them (per session, so a resume on another device or precision says so)."""
import time

from utils.engine.device import Precision
from utils.engine.probe import resolve_precision
from utils.seeding import set_determinism


def start_engine(run, cfg, device, model, model_id, input_shape, batch_size) -> Precision:
    """Set determinism (the caller has seeded), decide the precision (a probe on a copy of `model` where cfg says auto; the
    global random streams are not touched), and record it all. run: a utils.run_folder.Run."""
    set_determinism(cfg["deterministic"], device)
    amp, cl, how = resolve_precision(cfg, device, model, model_id, input_shape, batch_size,
                                     run.recorded.get("precision_choice"))
    precision = Precision(device, amp, cl, cfg["compile"])
    session = {"device": str(device), "precision": precision.description,
               "start": time.strftime("%Y-%m-%d %H:%M:%S")}
    earlier = [] if run.fresh else list(run.recorded.get("sessions") or [])
    changed = [s for s in earlier if (s.get("device"), s.get("precision")) != (session["device"], session["precision"])]
    if changed:
        print(f"warning: this record's earlier session ran on {changed[-1].get('device')} with "
              f"{changed[-1].get('precision')}; this one runs on {device} with {precision.description}: the result "
              "differs from an uninterrupted run (both are recorded in config.yaml under sessions)")
    run.update_meta(device=str(device), precision=precision.description, precision_choice=how, tf32=False,
                    sessions=earlier + [session])
    return precision
