"""Timing device work without a host sync inside the timed sections."""
import time

import torch


class Stopwatch:
    """Seconds spent in timed sections: CUDA events on a GPU (read once, at the end), the wall clock on a CPU."""

    def __init__(self, device):
        self.cuda, self.seconds, self.events = device.type == "cuda", 0.0, []

    def start(self):
        if self.cuda:
            self.events.append([torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)])
            self.events[-1][0].record()
        else:
            self.t0 = time.perf_counter()

    def stop(self):
        if self.cuda:
            self.events[-1][1].record()
        else:
            self.seconds += time.perf_counter() - self.t0

    def total(self):
        if self.cuda:
            torch.cuda.synchronize()
            return sum(a.elapsed_time(b) for a, b in self.events) / 1000
        return self.seconds
