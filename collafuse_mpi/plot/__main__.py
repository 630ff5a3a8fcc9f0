"""`python -m collafuse_mpi.plot`: the same as `collafuse-plot`."""
from .cli import main

main()
