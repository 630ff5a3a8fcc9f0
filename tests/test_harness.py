"""Phase timers: every step keeps a row, phases land where they ran, energy is never a fake zero."""
import math
import time

import numpy as np

from collafuse_mpi.harness import PHASES, PhaseTimer


class FakeMeter:
    source, device_key, update_period_s = "fake", "dev", 0.001

    def __init__(self):
        self.j = 0.0

    def read(self):
        self.j += 5.0
        return self.j


def test_rows_phases_and_warmup():
    syncs = []
    t = PhaseTimer("attribution", sync=lambda: syncs.append(1))
    for step in range(3):
        t.start_step(step, warmup=step == 0)
        with t.phase("forward"):
            time.sleep(0.01)
        with t.phase("noise"):
            pass
        with t.phase("noise"):  # a phase entered twice in one step accumulates
            time.sleep(0.005)
        t.end_step(loss=1.0 / (step + 1), images=4)
    a = t.arrays()
    assert a["phase_seconds"].shape == (3, len(PHASES))
    f, n = PHASES.index("forward"), PHASES.index("noise")
    assert np.all(a["phase_seconds"][:, f] >= 0.01)
    assert np.all(a["phase_seconds"][:, n] >= 0.005)
    assert np.all(a["phase_seconds"][:, PHASES.index("send")] == 0)
    assert list(a["warmup"]) == [True, False, False]
    assert np.all(a["step_end"] - a["step_start"] >= a["phase_seconds"].sum(1))
    assert a["events"].shape == (9, 4) and len(syncs) > 0
    assert np.all(np.isnan(a["energy_j"]))  # no meter: NaN, never 0


def test_throughput_mode_does_not_sync():
    syncs = []
    t = PhaseTimer("throughput", sync=lambda: syncs.append(1))
    t.start_step(0, False)
    with t.phase("forward"):
        pass
    t.end_step()
    assert syncs == []


def test_energy_per_step_and_window():
    t = PhaseTimer(meter=FakeMeter())
    with t.window("train"):
        t.start_step(0, False)
        time.sleep(0.003)
        t.end_step()
    a = t.arrays()
    assert a["energy_j"][0] == 5.0 and not a["energy_short_window"][0]
    assert t.windows["train"]["energy_j"] == 15.0  # window edges bracket the step's two reads
    assert not math.isnan(t.windows["train"]["end"])


def test_clock_offset_is_applied():
    t = PhaseTimer(clock_offset=1000.0)
    assert t.now() - time.perf_counter() > 999
