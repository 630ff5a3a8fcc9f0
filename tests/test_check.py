"""Errors a user sees before any work: --check (no MPI), usage errors printed once, a launch
whose tasks could not form one MPI world, and what the results file records about the machine."""
import os
import subprocess
import sys

import pytest

from collafuse_mpi import config, machine, run

PROBE = """
import sys
from collafuse_mpi.run import main
sys.argv = ["collafuse_mpi.run", *sys.argv[1:]]
try:
    main()
except SystemExit as exc:
    code = exc.code
else:
    code = 0
print("MPI_IMPORTED" if "mpi4py" in sys.modules else "NO_MPI")
sys.exit(code)
"""


def _check(*args, cwd):
    return subprocess.run([sys.executable, "-c", PROBE, "--check", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def test_check_validates_without_mpi_and_names_what_a_run_writes(tmp_path):
    p = _check("--ranks", "3", "--cut", "0.5", "--timesteps", "10", "--sample-steps", "4", "-o", "r.h5", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "check: OK (3 ranks: 1 server + 2 clients, k = [5, 5] of T = 10)" in p.stdout
    assert f"results: {tmp_path / 'r.h5'} (new file)" in p.stdout
    assert f"checkpoints: {tmp_path / 'r-checkpoints'}" in p.stdout
    assert "NO_MPI" in p.stdout  # a login node without a working MPI can run it
    assert not (tmp_path / "r.h5").exists()  # a check writes nothing


def test_check_reports_the_problem_once_and_fails(tmp_path):
    p = _check("--ranks", "3", "--cut", "2", "-o", "r.h5", cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.count("error: cut must be a number in [0, 1]") == 1
    p = _check("--ranks", "2000", "-o", "r.h5", cwd=tmp_path)  # 1797 digits for 1999 clients
    assert p.returncode == 2 and "images cannot be split over 1999 clients" in p.stderr
    (tmp_path / "r.h5").write_bytes(b"")
    p = _check("--ranks", "3", "-o", "r.h5", cwd=tmp_path)
    assert p.returncode == 2 and "pass --append" in p.stderr


@pytest.mark.mpi
def test_a_bad_option_is_reported_once_not_by_every_rank(tmp_path):
    from conftest import launch
    p = launch(3, ["--no-such-option"], timeout=120, cwd=tmp_path)
    assert p.returncode != 0
    assert p.stderr.count("No such option") == 1 and p.stderr.count("Usage:") == 1, p.stderr


def test_a_world_of_one_among_many_tasks_is_named(monkeypatch):
    for var in run.LAUNCHER_SIZE:
        monkeypatch.delenv(var, raising=False)
    run.world_problem(1)  # a singleton nobody asked more of: the usual "need 2 ranks" applies
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "3")
    with pytest.raises(config.ConfigError, match=r"3 tasks of this launch could not form one MPI world.*"
                                                 r"SLURM_STEP_NUM_TASKS=3.*srun --mpi=pmix"):
        run.world_problem(1)


def test_machine_records(monkeypatch):
    env = {"SLURM_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": "2", "SLURM_CPUS_PER_TASK": "4", "OTHER": "x"}
    assert machine.slurm_info(env) == {"job_id": "77", "array_task_id": "2", "cpus_per_task": "4"}
    assert machine.slurm_info({"SLURM_CPUS_PER_TASK": "4"}) == {}  # not a job
    cpu = machine.cpu_info()
    assert cpu["logical_cores"] == os.cpu_count() and cpu["model"]
    a = {"host": "n1", "cpus": [0, 1]}
    b = {"host": "n1", "cpus": [1]}
    c = {"host": "n2", "cpus": [0]}
    assert not machine.oversubscribed([a, b])      # 2 ranks on 2 cores of n1
    assert machine.oversubscribed([a, b, dict(b)])  # 3 ranks on cores {0, 1} of n1
    assert not machine.oversubscribed([a, c])       # one rank on each host
    info = machine.rank_info(1, {"CUDA_VISIBLE_DEVICES": "3"})
    assert info["cuda_visible_devices"] == "3" and info["local_rank"] == 1 and info["cpus"]


def test_check_names_the_file_the_last_output_option_chooses(tmp_path):
    # the job scripts pass --output first; a user's later --output (or --set run.output) wins,
    # and the log's results: line must name that one
    p = _check("--ranks", "3", "--sample-steps", "4", "--timesteps", "10", "--output", "a.h5",
               "--output", "b.h5", cwd=tmp_path)
    assert p.returncode == 0 and f"results: {tmp_path / 'b.h5'}" in p.stdout, p.stderr


def test_submit_script_checks_before_sbatch(tmp_path):
    """jobs/submit.sh runs --check with the job's rank count; a bad run never reaches the queue."""
    import pathlib
    script = pathlib.Path(__file__).resolve().parents[1] / "jobs"
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    p = subprocess.run(["bash", str(script / "submit.sh"), "--ntasks=2000", str(script / "collafuse.sbatch")],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "images cannot be split over 1999 clients" in p.stderr and "Submitted" not in p.stdout
    p = subprocess.run(["bash", str(script / "submit.sh"), str(script / "cut_sweep.sbatch")],
                       capture_output=True, text=True, cwd=tmp_path, env=dict(env, CF_CUTS="0.2,7"), timeout=120)
    assert p.returncode == 2 and "cut must be a number in [0, 1], got 7.0" in p.stderr, p.stdout + p.stderr
    assert p.stdout.count("check: OK (3 ranks") == 1  # cut 0.2 passed, with the script's --ntasks=3


def test_check_takes_a_requeued_jobs_checkpoints_and_refuses_another_runs(tmp_path):
    """The stable folder of a resubmitted experiment: a resume with the same config and rank
    count passes the check (its identity matches); another seed or rank count is refused naming
    the difference; a fresh run of another config is refused. The check changes nothing."""
    from collafuse_mpi import checkpoint
    cfg = config.Config()
    cfg.run.output, cfg.run.checkpoint_dir = str(tmp_path / "results-1.h5"), str(tmp_path / "checkpoints" / "exp")
    checkpoint.claim(cfg, 3, overwrite=False)
    checkpoint.save(cfg, 1, 4, {"x": 1})
    cfg.run.output, cfg.run.resume = str(tmp_path / "results-2.h5"), True  # the next job's own file
    run.verify(cfg, 3)
    run.verify(cfg, None)  # no rank count given: the world size is not compared
    with pytest.raises(config.ConfigError, match="world size: 3 ranks in the checkpoints, 2 now"):
        run.verify(cfg, 2)
    other = config.from_dict(cfg.to_dict())
    other.run.seed = cfg.run.seed + 1
    with pytest.raises(config.ConfigError, match=rf"belong to another run.*run.seed: {cfg.run.seed} in the checkpoints"):
        run.verify(other, 3)
    other.run.resume = False
    with pytest.raises(config.ConfigError, match="holds checkpoints of another run that did not complete"):
        run.verify(other, 3)
    assert checkpoint.latest_complete(cfg, [1]) == 4 and checkpoint.read_identity(cfg)["world_size"] == 3
