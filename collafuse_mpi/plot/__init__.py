"""`collafuse-plot`: figures from one or more CollaFuse results files.

    collafuse-plot results.h5 [more.h5 ...] [-o figures/] [--format png,pdf]
                   [--only disclosure,phases,timeline,energy,kid,bytes,samples,scaling,trends]
                   [--timeline-steps FIRST:LAST]

Files are read with `collafuse_mpi.results.read` (h5py + numpy; layout in
docs/results-schema.md). Runs from every file are merged and grouped by configuration
(cut, number of clients); figures that show one run per configuration use the latest complete
run of each group. This package never imports torch or mpi4py: it runs on a login node.

Modules: runs (reading and grouping runs), style (figure helpers), timing (phases, timeline,
energy), privacy (disclosure), quality (KID, samples), traffic (bytes, scaling), trends (mean and
CI over seeds against cut, compute shares), cli (the command).

Exit status:
  0  at least one figure was written (figures whose data were missing are named on stderr)
  1  every input was read, but no figure could be drawn from them
  2  usage error, or an input file is missing, unreadable or not a results file
     (checked before anything is drawn: nothing is written then)
The paths written are printed on stdout, one per line; messages go to stderr.

`main()` reads with HDF5 file locking off (HDF5_USE_FILE_LOCKING=FALSE unless already set), so
plotting a file that a running job is still flushing to can never make that job's next write fail.
"""
import matplotlib

# Before any submodule touches matplotlib: figures are only ever written to files.
matplotlib.use("Agg")

from .cli import DRAW, cli, main, save  # noqa: E402
from .privacy import fig_disclosure  # noqa: E402
from .quality import POOLED_STYLE, SAMPLE_KINDS, fig_kid, fig_samples, kid_data, sample_panels, tile  # noqa: E402
from .runs import (DEFAULT_PHASES, DPI, FIGURES, FORMATS, IGNORED_CONFIG, MAX_PANELS, PROG,  # noqa: E402
                   Ctx, Missing, Run, config_differences, config_label, load, n_steps, steady)
from .style import (OTHER_COLOR, PHASE_COLORS, cut_axis, empty_message, footnote,  # noqa: E402
                    new_figure, phase_colors, time_unit)
from .timing import fig_energy, fig_phases, fig_timeline  # noqa: E402
from .traffic import fig_bytes, fig_scaling, throughput, wait_fraction  # noqa: E402
from .trends import client_share, fig_trends, mean_ci, trend_data  # noqa: E402

__all__ = [
    "DEFAULT_PHASES", "DPI", "DRAW", "FIGURES", "FORMATS", "IGNORED_CONFIG", "MAX_PANELS", "OTHER_COLOR",
    "PHASE_COLORS", "POOLED_STYLE", "PROG", "SAMPLE_KINDS", "Ctx", "Missing", "Run", "cli", "config_differences",
    "config_label", "cut_axis", "empty_message", "fig_bytes", "fig_disclosure", "fig_energy", "fig_kid",
    "fig_phases", "fig_samples", "fig_scaling", "fig_timeline", "footnote", "kid_data", "load", "main",
    "n_steps", "new_figure", "phase_colors", "sample_panels", "save", "steady", "throughput", "tile",
    "time_unit", "wait_fraction", "client_share", "fig_trends", "mean_ci", "trend_data",
]
