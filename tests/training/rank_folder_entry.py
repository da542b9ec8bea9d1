"""``torchrun ... rank_folder_entry.py FOLDER ARGS``: run ``bcosify ARGS`` in ``FOLDER/rank<RANK>``, so that a test
sees what each process writes (``--out`` relative).

Faults for the tests, from the environment: ``KILL_AFTER_CHECKPOINTS=K`` kills rank 0 (SIGKILL) right after it
wrote its K-th checkpoint (torchrun then stops the others); ``POISON=RANK:N`` makes the loss of the N-th training batch
of process RANK NaN (the model refuses NaN images before any loss).
"""

import os
import pathlib
import signal
import sys


def _install_faults(rank: int) -> None:
    import bcosify.training.loop as loop

    kill_after = int(os.environ.get("KILL_AFTER_CHECKPOINTS", 0))
    if kill_after and rank == 0:
        save, written = loop.save_checkpoint, []

        def save_then_die(*args, **kwargs):
            path = save(*args, **kwargs)
            written.append(path)
            if len(written) == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
            return path

        loop.save_checkpoint = save_then_die
    poison_rank, _, poison_batch = os.environ.get("POISON", "").partition(":")
    if poison_rank and int(poison_rank) == rank:
        compute_loss, calls = loop.compute_loss, []

        def poisoned(*args, **kwargs):
            calls.append(1)
            loss = compute_loss(*args, **kwargs)
            return loss * float("nan") if len(calls) == int(poison_batch) else loss

        loop.compute_loss = poisoned


if __name__ == "__main__":
    rank = int(os.environ["RANK"])
    folder = pathlib.Path(sys.argv[1]) / f"rank{rank}"
    folder.mkdir(parents=True, exist_ok=True)
    os.chdir(folder)
    _install_faults(rank)
    from bcosify.cli import main

    sys.exit(main(sys.argv[2:]))
