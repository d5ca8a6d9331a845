"""The folder one run writes (conventions §10): the rules for an existing folder (--overwrite, --resume), and the
Run that tees the log, keeps metrics rows, checkpoints and finishes the record (names and markers:
utils/record_names.py).

Nothing here deletes what it cannot prove is a record of this toolkit, and --overwrite never deletes the old
record before the new one is complete: the old one is moved aside to a hidden sibling folder
(`.<name>.previous`), deleted when the new run writes its summary.json, and put back if the run fails, is
interrupted or is terminated. A run killed outright (SIGKILL, power loss) leaves the sibling; the next command
on the same name sees it and says what to do.
"""
import csv
import io
import os
import shutil
import sys
import time
from pathlib import Path

from utils.errors import UserError, os_error_message
from utils.io import Tee, atomic_torch_save, atomic_write_bytes, atomic_write_json, atomic_write_text, \
    atomic_write_yaml, load_weights
from utils.record_names import (FORMAT_VERSION, MARKER, TOOLKIT, defense_records, git_commit, is_complete, is_record,
                                previous_path, read_record_config, remove_record, versions)


RESUMABLE_CHANGES = ("device", "checkpoint_every")   # a resume may change these (a device switch is recorded)


# --- the run -----------------------------------------------------------------------------------------------------

class Run:
    """The folder one run writes. Opens it under the overwrite / resume rules, tees the log, keeps metrics rows,
    checkpoints, and finishes the record with summary.json."""

    def __init__(self, path, method: str, cfg: dict, overwrite=False, resume=False, deviations=None, extra=None):
        self.path = Path(path)
        self.method = method
        self.cfg = cfg
        self.rows = []
        self.start = time.time()
        self.earlier_seconds = 0.0   # wall time of the sessions before a --resume
        self.previous = None         # the old record, kept aside while this run replaces it
        self.tee = None
        self.recorded = {}           # the config.yaml of the record this run resumes or replaces
        self._open(overwrite, resume)
        self.created = not self.path.exists()
        self.fresh = not (self.path / "checkpoint.pt").exists()   # not a resumed run
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            if not (self.path / MARKER).exists():
                atomic_write_json(self.path / MARKER, {"toolkit": TOOLKIT, "format_version": FORMAT_VERSION,
                                                       "method": method, "created": time.strftime("%Y-%m-%d %H:%M:%S")})
            self.tee = Tee(self.path / "log.txt")
            self.meta = {"method": method, "format_version": FORMAT_VERSION, "config": cfg,
                         "deviations": deviations or [], **(extra or {}), "command": " ".join(sys.argv),
                         "git_commit": git_commit(), "versions": versions(),
                         "start_time": time.strftime("%Y-%m-%d %H:%M:%S"), "end_time": None}
            atomic_write_yaml(self.path / "config.yaml", self.meta)
        except BaseException:   # e.g. no space for the first file: put everything back as it was
            self.close()
            raise

    # --- the rules for an existing folder ---------------------------------------------------------------------
    def _open(self, overwrite, resume):
        p = self.path
        for q in (p, previous_path(p)):
            if q.is_dir() and is_record(q) and (q / "config.yaml").exists():
                try:
                    self.recorded = read_record_config(q)
                    break
                except UserError:
                    pass   # a damaged config.yaml: nothing recorded to keep (the rules below still apply)
        if previous_path(p).exists():
            self._after_killed_overwrite(overwrite, resume)
            if self.previous is not None:
                return
        if not p.exists():
            if resume:
                print(f"--resume: nothing to resume at {p}; starting a new run")
            return
        if not p.is_dir():
            raise UserError(f"{p} is a file, not a record folder; choose another name")
        if not is_record(p):
            names = sorted(f.name for f in p.iterdir())
            if names:
                raise UserError(f"{p} exists and is not a record of this toolkit (it holds {', '.join(names[:5])}"
                                f"{' ...' if len(names) > 5 else ''}); nothing was changed: choose another name, or "
                                "move that folder away yourself")
            return   # an empty folder: used as it is
        if is_complete(p):
            if not overwrite:
                raise UserError(f"a complete record already exists at {p}; pass --overwrite to replace it, "
                                "or choose another name")
        elif (p / "checkpoint.pt").exists():
            if resume:
                self._check_same_config(p)
                return
            if not overwrite:
                raise UserError(f"an interrupted run left an incomplete record at {p}; pass --resume to continue it "
                                "or --overwrite to start again")
        elif not (resume or overwrite):
            raise UserError(f"a run that stopped before its first checkpoint left {p}; pass --resume or --overwrite "
                            "to start it again")
        elif resume:
            print(f"--resume: the run at {p} stopped before its first checkpoint; starting it again")
        self._move_aside()

    def _move_aside(self):
        p, prev = self.path, previous_path(self.path)
        defenses = defense_records(p)
        what = f"the previous record at {p}" + (f" with its defense records ({', '.join(defenses)})" if defenses else "")
        os.rename(p, prev)
        self.previous = prev
        print(f"--overwrite: {what} is moved to {prev}; it is deleted when this run completes and put back if it "
              "fails or is interrupted")

    def _after_killed_overwrite(self, overwrite, resume):
        """An earlier --overwrite of this name was killed before it ended: its old record waits at .<name>.previous."""
        p, prev = self.path, previous_path(self.path)
        if not is_record(prev):
            raise UserError(f"{prev} exists and is not a record of this toolkit; move it away and run the command again")
        if is_complete(p):        # killed after the new record was complete: finish the replacement
            print(f"an earlier --overwrite of {p} completed; deleting the previous record it kept at {prev}")
            remove_record(prev)
        elif not p.exists():      # killed before anything new was written: nothing to decide
            os.rename(prev, p)
            print(f"an earlier --overwrite of {p} was interrupted: the previous record is back in place")
        elif resume and (p / "checkpoint.pt").exists():
            self._check_same_config(p)
            self.previous = prev
            print(f"--resume: continuing the interrupted replacement at {p}; the previous record stays at {prev} "
                  "until it completes")
        elif overwrite:
            remove_record(p)       # the incomplete replacement, ours
            self.previous = prev
            print(f"--overwrite: discarded the incomplete replacement at {p}; the previous record stays at {prev} "
                  "until this run completes")
        else:
            raise UserError(f"an earlier --overwrite of {p} was interrupted: the previous record is kept at {prev} and "
                            f"the incomplete new one is at {p}; pass --resume to continue the new one, --overwrite to "
                            f"start it again, or put the previous one back with `rm -r {p} && mv {prev} {p}`")

    def _check_same_config(self, p):
        old = read_record_config(p)["config"]
        diff = [k for k in set(old) | set(self.cfg) if k not in RESUMABLE_CHANGES and old.get(k) != self.cfg.get(k)]
        if diff:
            raise UserError(f"--resume with settings that differ from the interrupted run at {p}: "
                            + ", ".join(f"{k} ({old.get(k)!r} -> {self.cfg.get(k)!r})" for k in sorted(diff))
                            + "; resume with the same settings, or pass --overwrite to start again")

    # --- per-epoch bookkeeping -------------------------------------------------------------------------
    def log_epoch(self, row: dict, label="epoch", show=()):
        """Append the row to metrics.csv and print it on one line: loss, ACC, ASR, RA, the method's `show` keys."""
        self.rows.append(row)
        self.write_metrics()
        shown = [f"{label} {row['epoch']}"]
        for k in ("train_loss", "test_acc", "test_asr", "test_ra"):
            if k in row and row[k] is not None:
                shown.append(f"{k} {row[k]:.4f}")
        shown += [f"{k} {row[k]:.4f}" for k in show if isinstance(row.get(k), float)]
        shown.append(f"lr {row['lr']:.2e}" if isinstance(row.get("lr"), float) else "")
        shown.append(f"{row['seconds']:.1f}s")
        print(" | ".join(s for s in shown if s))

    def write_metrics(self):
        keys = []
        for r in self.rows:
            keys += [k for k in r if k not in keys]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        w.writerows(self.rows)
        atomic_write_text(self.path / "metrics.csv", buf.getvalue())

    def save_checkpoint(self, epoch, state: dict, phase=0):
        """`epoch`: how many epochs of phase number `phase` are done."""
        atomic_torch_save({"phase": phase, "epoch": epoch, "rows": self.rows, "elapsed": self.elapsed(),
                           "state": {k: v.state_dict() for k, v in state.items() if v is not None}},
                          self.path / "checkpoint.pt")

    def restore_checkpoint(self, state: dict):
        """Load every object of `state` from checkpoint.pt; returns (phase, epochs done in it), (0, 0) if none."""
        ck = self.path / "checkpoint.pt"
        if not ck.exists():
            return 0, 0
        d = load_weights(ck, "checkpoint")
        try:
            for k, v in state.items():
                if v is not None:
                    v.load_state_dict(d["state"][k])
            rows, epoch, phase = d["rows"], int(d["epoch"]), int(d.get("phase", 0))
        except Exception as e:
            raise UserError(f"the checkpoint {ck} does not fit this run ({type(e).__name__}: {e}); pass --overwrite "
                            "to start again") from None
        self.rows = rows
        self.earlier_seconds = float(d.get("elapsed", 0.0))
        where = f"epoch {rows[-1]['epoch']}" if rows else f"epoch {epoch}"
        print(f"resuming from the checkpoint of {where}" + (f" ({rows[-1]['phase']})" if rows and "phase" in rows[-1] else ""))
        return phase, epoch

    def elapsed(self) -> float:
        """Wall time of this run, the sessions before a --resume included."""
        return self.earlier_seconds + time.time() - self.start

    def update_meta(self, **entries):
        """Add entries to config.yaml now (not only at the end), so that an interrupted record says them too."""
        self.meta.update(entries)
        atomic_write_yaml(self.path / "config.yaml", self.meta)

    # --- the end ---------------------------------------------------------------------------------------
    def save_model(self, payload: dict, name="model.pt"):
        atomic_torch_save({"format_version": FORMAT_VERSION, **payload}, self.path / name)

    def write_file(self, name, data):
        (atomic_write_bytes if isinstance(data, bytes) else atomic_write_text)(self.path / name, data)

    def finish(self, summary: dict):
        """Write summary.json last: from here on the record is complete (and the record it replaced goes)."""
        self.meta["end_time"] = time.strftime("%Y-%m-%d %H:%M:%S")
        atomic_write_yaml(self.path / "config.yaml", self.meta)
        summary = {**summary, "seconds": round(self.elapsed(), 2), "format_version": FORMAT_VERSION}
        atomic_write_json(self.path / "summary.json", summary)
        if (self.path / "checkpoint.pt").exists():
            os.unlink(self.path / "checkpoint.pt")
        if self.previous is not None:
            defenses = defense_records(self.previous)
            print(f"deleting the replaced record{' and its defense records (' + ', '.join(defenses) + ')' if defenses else ''}")
            remove_record(self.previous)
            self.previous = None
        self.tee.close()
        return summary

    def close(self):
        """End the run. A run that did not complete puts back the record it was replacing; a new run that stops
        before its first checkpoint leaves nothing to resume, so its folder goes and the same command simply runs
        again. Never raises: it runs while another error is on its way to the user."""
        if self.tee is not None:
            self.tee.close()
        p = self.path
        if is_complete(p):
            return
        if self.previous is not None:
            self._put_back()
        elif self.fresh and p.exists() and not (p / "checkpoint.pt").exists():
            if self.created:
                shutil.rmtree(p, ignore_errors=True)
            else:          # a folder that was empty before this run: empty it again, keep it
                for f in p.iterdir():
                    shutil.rmtree(f, ignore_errors=True) if f.is_dir() else f.unlink(missing_ok=True)

    def _put_back(self):
        p, prev = self.path, self.previous
        discarded = p.parent / f".{p.name}.discarded-{os.getpid()}"
        try:
            if p.exists():
                os.rename(p, discarded)
            os.rename(prev, p)
        except OSError as e:
            print(f"error: could not put the previous record back ({os_error_message(e)}); it is kept at {prev}: "
                  f"move it to {p} by hand", file=sys.stderr)
            return
        self.previous = None
        if discarded.exists():
            shutil.rmtree(discarded, ignore_errors=True)
        print(f"the run did not complete: the previous record is back at {p}, unchanged (this run's progress is "
              "discarded: --resume has nothing to continue)")

