"""The epoch loop: one or more phases of epochs, a row of metrics and a checkpoint after each, and --resume.

A run is a list of phases (FMP: rank and prune, then fine-tune; NAD: teacher, then student; most methods: one).
The checkpoint records the phase and how many of its epochs are done, so --resume continues in the right phase
and ends with the result of an uninterrupted run.
"""
import math
import time
from dataclasses import dataclass
from typing import Callable, Optional


class GeneratorState:
    """Lets a torch.Generator sit in a checkpoint beside models and optimisers."""

    def __init__(self, gen):
        self.gen = gen

    def state_dict(self):
        return {"state": self.gen.get_state()}

    def load_state_dict(self, d):
        self.gen.set_state(d["state"])


@dataclass
class Phase:
    """`epochs` steps of train_epoch(epoch) -> training stats (with 'lr'), each followed by evaluate() -> test metrics.
    Epochs are numbered from `start`. setup() runs once before the phase's first epoch in this process (a fresh
    start or a resume inside the phase). `show`: metric keys the epoch line prints besides loss, ACC, ASR and RA.
    stop(row) -> True ends the phase after that epoch (an early stop, RNP's unlearning); its checkpoint then counts
    the phase as done, so a resume goes on with the next phase."""
    name: str
    epochs: int
    train_epoch: Callable[[int], dict]
    evaluate: Callable[[], dict]
    label: str = "epoch"
    start: int = 1
    eval_every: int = 1
    setup: Optional[Callable[[], None]] = None
    show: tuple = ()
    stop: Optional[Callable[[dict], bool]] = None


def fit(run, phases, state: dict):
    """Run the phases in order (a single Phase is one phase). After every epoch a row goes to metrics.csv (with a
    'phase' column when there are several); every `checkpoint_every` epochs of a phase (the run's setting) and after
    its last, a checkpoint of every object in `state` (model, optimiser, scheduler, generators) and of the position
    is written. Returns every row, earlier sessions' included."""
    phases = [phases] if isinstance(phases, Phase) else list(phases)
    every = int(run.cfg.get("checkpoint_every", 1))
    done_phase, done = run.restore_checkpoint(state)
    for i in range(done_phase, len(phases)):
        ph = phases[i]
        first = done if i == done_phase else 0
        if first < ph.epochs and ph.setup is not None:
            ph.setup()
        for k in range(first, ph.epochs):
            epoch = ph.start + k
            t0 = time.time()
            stats = dict(ph.train_epoch(epoch))
            last = k == ph.epochs - 1
            metrics = ph.evaluate() if ph.eval_every > 0 and ((k + 1) % ph.eval_every == 0 or last) else {}
            row = {"epoch": epoch, **({"phase": ph.name} if len(phases) > 1 else {}),
                   "lr": stats.pop("lr", math.nan), "seconds": round(time.time() - t0, 3), **stats, **metrics}
            run.log_epoch(row, ph.label, ph.show)
            stop = not last and ph.stop is not None and ph.stop(row)
            if last or stop or (k + 1) % every == 0:
                run.save_checkpoint(ph.epochs if stop else k + 1, state, phase=i)
            if stop:
                break
    return run.rows

