"""Stopping together: a signal asks the run to stop, and every rank stops at the same step edge.

SLURM warns a job before its time limit (`sbatch --signal=B:USR1@120`, forwarded to the ranks by
the job script) and sends SIGTERM at the limit or on preemption. Either sets a flag on the ranks
that got it. Ranks then agree, with a max-vote over all ranks at step edges every
`run.stop_check_every` steps, on one edge where all of them save their state and stop, so no rank
is left mid-step and the saved steps form one complete checkpoint.

A vote is started at one edge and read at the next one (`Transport.vote`, through rank 0 on
point-to-point messages, so its waits have the receive deadline): a rank running ahead does not wait for the slowest at every checked edge, and the
decision still falls on the same edge everywhere. The last training step's edge decides at once.
"""
from __future__ import annotations

import os
import signal
import threading

STOP_REQUESTED = threading.Event()  # set by the signal handler (or a test hook); read at step edges
SIGNALS = ("SIGUSR1", "SIGTERM")
EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped early with state saved; the job scripts requeue on it
received = []  # names of the signals that arrived, for the log


def install() -> None:
    """Make SIGUSR1 and SIGTERM ask for a stop instead of killing the rank."""
    def handler(signum, frame):
        received.append(signal.Signals(signum).name)
        STOP_REQUESTED.set()
    for name in SIGNALS:
        signal.signal(getattr(signal, name), handler)


class Stopped(SystemExit):
    """Raised on every rank at the same step edge, after each rank saved its state."""

    def __init__(self, steps_done: int):
        super().__init__(EXIT_STOPPED)
        self.steps_done = steps_done


def hook(rank: int, step: int) -> None:
    """Testing hook: COLLAFUSE_STOP_AT=rank:step requests a stop on that rank at that step, as a
    signal would (the other ranks do not know of it until they vote)."""
    if os.environ.get("COLLAFUSE_STOP_AT") == f"{rank}:{step}":
        STOP_REQUESTED.set()


class StopVote:
    """Decides, the same on every rank, at which step edge the run stops.

    `at_edge(step)` is called by every rank after each completed step, in step order. At edges
    where (step + 1) is a multiple of `every` it reads the vote started at the previous such edge
    and starts a new one; at the last step's edge it votes and waits. True means: save, then stop.
    """

    def __init__(self, tp, every: int, steps: int, flag: threading.Event = STOP_REQUESTED):
        self.tp, self.every, self.steps, self.flag = tp, every, steps, flag
        self.pending = None

    def at_edge(self, step: int) -> bool:
        done = step + 1
        last = done >= self.steps
        if not self.every or (done % self.every and not last):
            return False
        stop = bool(self.pending.result()) if self.pending is not None else False
        self.pending = None
        if stop:
            return True
        vote = self.tp.vote(int(self.flag.is_set()))
        if last:
            return bool(vote.result())
        self.pending = vote
        return False
