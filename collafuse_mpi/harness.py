"""Per-rank phase timers and energy windows.

Every step keeps one row of phase seconds, process CPU-seconds and FLOPs; nothing is averaged
here (statistics are derived when reading). CPU time is time.process_time() (all threads of
the process, so torch's intra-op threads count; roles that share a process, as over loopback,
share it too) read at the same edges as the wall clock. In attribution mode CUDA work is synchronised at each phase edge so time lands
in the phase that issued it; in throughput mode there are no extra syncs and only whole
steps are meaningful.
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import numpy as np

PHASES = ("data", "noise", "forward", "backward", "optimizer", "send", "recv", "wait",
          "sample", "metrics", "checkpoint", "io")


class PhaseTimer:
    def __init__(self, mode: str = "attribution", sync=None, meter=None, clock_offset: float = 0.0,
                 keep_events: int = 200):
        self.mode = mode
        self.sync = sync if mode == "attribution" else None  # e.g. torch.cuda.synchronize
        self.meter = meter
        self.offset = clock_offset  # added to perf_counter: rank 0's clock
        self.keep_events = keep_events  # timeline events kept for the first steps only
        self.rows, self.steps, self.warmup, self.t_start, self.t_end = [], [], [], [], []
        self.losses, self.energy, self.energy_short, self.images = [], [], [], []
        self.cpu_rows, self.flop_rows = [], []
        self.client_losses = []  # a rank hosting logical clients: each one's loss per step
        self.flops_total = 0  # every FLOP counted, in steps or not: windows take differences
        self.events = []  # (step, phase index, start, end) on the aligned clock
        self.windows = {}
        self._row = self._cpu = self._flops = None
        self._energy0 = None

    def now(self) -> float:
        return time.perf_counter() + self.offset

    def _read_energy(self):
        return self.meter.read() if self.meter is not None else None

    def start_step(self, step: int, warmup: bool):
        if self.sync:
            self.sync()
        self._row, self._cpu, self._flops = np.zeros(len(PHASES)), np.zeros(len(PHASES)), np.zeros(len(PHASES))
        self.steps.append(step)
        self.warmup.append(warmup)
        self._energy0 = self._read_energy()
        self.t_start.append(self.now())

    @contextmanager
    def phase(self, name: str):
        i = PHASES.index(name)
        if self.sync:
            self.sync()
        t0, c0 = self.now(), time.process_time()
        try:
            yield
        finally:
            if self.sync:
                self.sync()
            t1, c1 = self.now(), time.process_time()
            if self._row is not None:
                self._row[i] += t1 - t0
                self._cpu[i] += c1 - c0
                if len(self.steps) <= self.keep_events:
                    self.events.append((self.steps[-1], i, t0, t1))

    def end_step(self, loss: float = float("nan"), images: int = 0, client_losses=None):
        if self.sync:
            self.sync()
        self.t_end.append(self.now())
        e1 = self._read_energy()
        self.energy.append(e1 - self._energy0 if e1 is not None and self._energy0 is not None else np.nan)
        # a step shorter than two counter updates cannot be metered on its own: flag, don't trust
        period = getattr(self.meter, "update_period_s", 0.0) if self.meter is not None else 0.0
        self.energy_short.append(self.t_end[-1] - self.t_start[-1] < 2 * period)
        self.rows.append(self._row)
        self.cpu_rows.append(self._cpu)
        self.flop_rows.append(self._flops)
        self.losses.append(loss)
        self.images.append(images)
        if client_losses is not None:
            self.client_losses.append(list(client_losses))
        self._row = self._cpu = self._flops = None

    def add_flops(self, name: str, flops: int):
        """FLOPs done in a phase (counted by the caller, see flops.py): into the step's row when
        a step is open, and always into the running total that windows difference."""
        self.flops_total += flops
        if self._flops is not None:
            self._flops[PHASES.index(name)] += flops

    @contextmanager
    def window(self, name: str):
        """A run phase (train, sample, metrics) with its own time and energy."""
        if self.sync:
            self.sync()
        e0, t0, c0, f0 = self._read_energy(), self.now(), time.process_time(), self.flops_total
        try:
            yield
        finally:
            if self.sync:
                self.sync()
            t1, e1, c1 = self.now(), self._read_energy(), time.process_time()
            energy = e1 - e0 if e1 is not None and e0 is not None else float("nan")
            short = bool(self.meter is not None and t1 - t0 < 2 * getattr(self.meter, "update_period_s", 0.0))
            self.windows[name] = {"start": t0, "end": t1, "energy_j": energy, "energy_short_window": short,
                                  "cpu_seconds": c1 - c0, "flops": float(self.flops_total - f0)}

    @contextmanager
    def loose(self, name: str):
        """A phase outside any step (sampling, metrics): timed into a window-less event list."""
        with self.phase(name):
            yield

    def arrays(self) -> dict:
        n = len(self.rows)
        out = {
            "step": np.asarray(self.steps[:n], dtype=np.int64),
            "warmup": np.asarray(self.warmup[:n], dtype=bool),
            "phase_seconds": np.asarray(self.rows, dtype=np.float64).reshape(n, len(PHASES)),
            "phase_cpu_seconds": np.asarray(self.cpu_rows[:n], dtype=np.float64).reshape(n, len(PHASES)),
            "phase_flops": np.asarray(self.flop_rows[:n], dtype=np.float64).reshape(n, len(PHASES)),
            "step_start": np.asarray(self.t_start[:n], dtype=np.float64),
            "step_end": np.asarray(self.t_end[:n], dtype=np.float64),
            "loss": np.asarray(self.losses, dtype=np.float64),
            "energy_j": np.asarray(self.energy, dtype=np.float64),
            "energy_short_window": np.asarray(self.energy_short, dtype=bool),
            "images": np.asarray(self.images, dtype=np.int64),
            "events": np.asarray(self.events, dtype=np.float64).reshape(-1, 4),
        }
        if self.client_losses:
            out["client_loss"] = np.asarray(self.client_losses[:n], dtype=np.float64)
        return out
