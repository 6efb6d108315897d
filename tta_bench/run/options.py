"""How `run` runs a bench's cells: one object, resolved once from the bench file and the command line,
then handed to everything that runs cells (here, on remote workers, under torchrun)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RunOptions:
    """`force`: recompute cells that have a current result; `progress`: progress bars; `check`: each
    cell's record also holds the validity checks of its setting (SPEC 6); `log_tokens`: keep every
    scored token's log-probability beside its cell (for `report`); `overrides`: the command line's
    `--set`s (overrides.py), listed in each cell's provenance. Frozen and plain, so that it
    pickles to Ray and Slurm workers as it is."""

    force: bool = False
    progress: bool = True
    check: bool = False
    log_tokens: bool = False
    overrides: tuple = ()

    @classmethod
    def resolve(
        cls,
        cfg,
        force: bool = False,
        progress: bool | None = None,
        check: bool | None = None,
        log_tokens: bool | None = None,
        overrides: tuple = (),
    ) -> RunOptions:
        """The command line's choices where it makes one (not None), else the bench file's (`cfg`)."""

        def pick(given, bench):
            return bench if given is None else given

        return cls(
            force,
            pick(progress, cfg.progress),
            pick(check, cfg.check),
            pick(log_tokens, cfg.log_tokens),
            tuple(overrides),
        )
