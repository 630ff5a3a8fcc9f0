"""Rank 0's progress lines in a batch log: at an interval, with rate and ETA; silent when quiet."""
import io

from collafuse_mpi.progress import Progress


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_plain_lines_at_an_interval_with_rate_and_eta():
    out, clock = io.StringIO(), Clock()  # StringIO is not a terminal, as a job's log file
    p = Progress(10, True, images_per_step=8, every_s=5.0, stream=out, clock=clock)
    for step in range(10):
        p.update(step, 0.5)
        clock.t += 2.0  # 2 s per step
    p.close()
    lines = out.getvalue().splitlines()
    # step 1 at once, then every >= 5 s (steps 4, 7: 6 s apart), and the last step
    assert [ln.split()[2] for ln in lines] == ["1/10", "4/10", "7/10", "10/10"]
    assert lines[0] == "progress: step 1/10  server loss 0.5000  images/s -  ETA -"
    # after step 4: 3 steps of 8 images in 6 s = 4 images/s; 6 steps left at 2 s = 12 s
    assert lines[1] == "progress: step 4/10  server loss 0.5000  4 images/s  ETA 0:00:12"
    assert "\r" not in out.getvalue()


def test_quiet_writes_nothing():
    out = io.StringIO()
    p = Progress(3, False, 8, every_s=0.0, stream=out, clock=Clock())
    for step in range(3):
        p.update(step, 0.1)
    p.close()
    assert out.getvalue() == ""


def test_terminal_gets_one_redrawn_bar():
    class Tty(io.StringIO):
        def isatty(self):
            return True
    out, clock = Tty(), Clock()
    p = Progress(2, True, 4, stream=out, clock=clock)
    p.update(0, 1.0)
    clock.t += 1.0
    p.update(1, 0.9)
    p.close()
    text = out.getvalue()
    assert text.count("\r") == 2 and text.endswith("\n") and "step 2/2" in text
