"""From a bench file to cell records: the config and its grid, building and running one cell, resume
keys, the worker that runs cells in this process, the runner, and running beyond it (Ray, Slurm,
torchrun)."""
