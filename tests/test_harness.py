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


def _spin(seconds):
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_cpu_seconds_per_phase_count_work_not_sleep():
    """process_time lands in the phase that burned it; a sleeping phase has wall time, ~no CPU."""
    t = PhaseTimer()
    t.start_step(0, warmup=False)
    with t.phase("forward"):
        _spin(0.05)
    with t.phase("wait"):
        time.sleep(0.05)
    t.end_step()
    a = t.arrays()
    cpu, wall = a["phase_cpu_seconds"][0], a["phase_seconds"][0]
    f, w = PHASES.index("forward"), PHASES.index("wait")
    assert a["phase_cpu_seconds"].shape == (1, len(PHASES))
    assert cpu[f] >= 0.05 and wall[f] >= 0.04  # process time counts every thread: wall may be a little less
    assert wall[w] >= 0.05 and cpu[w] < 0.02
    assert np.all(cpu[[i for i in range(len(PHASES)) if i not in (f, w)]] == 0)


def test_flops_rows_and_windows():
    """add_flops goes to the open step's phase column, and every FLOP (in a step or not) to the
    window it happened in; CPU seconds of a window are measured too."""
    t = PhaseTimer()
    with t.window("train"):
        for step in range(2):
            t.start_step(step, warmup=False)
            t.add_flops("forward", 10)
            t.add_flops("backward", 20)
            t.end_step()
    with t.window("sample"):
        t.add_flops("sample", 7)  # outside any step: only the window sees it
        _spin(0.02)
    a = t.arrays()
    assert a["phase_flops"][:, PHASES.index("forward")].tolist() == [10, 10]
    assert a["phase_flops"][:, PHASES.index("backward")].tolist() == [20, 20]
    assert a["phase_flops"].sum() == 60
    assert t.windows["train"]["flops"] == 60 and t.windows["sample"]["flops"] == 7
    assert t.windows["sample"]["cpu_seconds"] >= 0.02
