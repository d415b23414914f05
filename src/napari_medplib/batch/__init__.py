"""Batch runs: the same questions and prompts over folders, stacks and clusters (`medplib batch`).

napari-free; the CLI, the widget's "Run on folder…" and scripts call `batch` the same way::

    from napari_medplib.batch import Actions, BatchOptions, batch
    result = batch(["images/"], "results/", BatchOptions(Actions(ground=("Please segment the nuclei.",))))

See `run` for where the work runs, `outputs` for what is written, `inputs` for what an item is.
Nothing here imports torch or Dask until a run starts.
"""

from .options import Actions, BatchError, BatchOptions, ItemError
from .run import BatchResult, Progress, batch

__all__ = ["Actions", "BatchError", "BatchOptions", "BatchResult", "ItemError", "Progress", "batch"]
