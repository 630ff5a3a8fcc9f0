# Sourced by the demo, the tests' launcher and the job scripts: how to call mpirun here.
# Open MPI refuses root and more ranks than cores unless told; MPICH needs neither flag.
if mpirun --version 2>&1 | grep -q "Open MPI"; then
    CF_MPIRUN_FLAGS=${CF_MPIRUN_FLAGS:---oversubscribe}
    if [ "$(id -u)" = 0 ]; then
        export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
    fi
else
    CF_MPIRUN_FLAGS=${CF_MPIRUN_FLAGS:-}
fi
export CF_MPIRUN_FLAGS
