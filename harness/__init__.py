"""The run harness that serves the three answer files, used the same way by each.

- ``harness.run``: the flags every script shares, device, seeds, training precision, the ``Run``
  (log, checkpoint and resume, the rebuild from committed weights, metrics.json) and ``cli``.
- ``harness.settings``: one frozen dataclass of settings per model, ``--template`` and
  ``--set name=value``.
- ``harness.schema``: the declared shape of metrics.json, its writer and its reader.
- ``harness.files``: atomic writes, weights-only files checked by SHA-256, the checkpoint dict.
- ``harness.figures``: the plots and image grids the scripts share (PNG + PDF).

The names a script needs are importable from ``harness`` itself.
"""

from harness import schema, settings
from harness.figures import image_grid, save_curves, save_figure, save_image_grid
from harness.files import RunError, load_checkpoint
from harness.run import (
    DEFAULT_DATA_ROOT,
    Run,
    add_run_args,
    argument_parser,
    check_finite,
    cli,
    get_device,
    matmul_precision,
    parse_args,
    positive_float,
    positive_int,
    seed_everything,
)

__all__ = ["schema", "settings", "image_grid", "save_curves", "save_figure", "save_image_grid", "RunError",
           "load_checkpoint", "DEFAULT_DATA_ROOT", "Run", "add_run_args", "argument_parser", "check_finite",
           "cli", "get_device", "matmul_precision", "parse_args", "positive_float", "positive_int",
           "seed_everything"]
