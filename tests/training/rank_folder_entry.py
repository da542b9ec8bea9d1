"""``torchrun ... rank_folder_entry.py FOLDER ARGS``: run ``bcosify ARGS`` in ``FOLDER/rank<RANK>``, so that a test
sees what each process writes (``--out`` relative)."""

import os
import pathlib
import sys

if __name__ == "__main__":
    folder = pathlib.Path(sys.argv[1]) / f"rank{os.environ['RANK']}"
    folder.mkdir(parents=True, exist_ok=True)
    os.chdir(folder)
    from bcosify.cli import main

    sys.exit(main(sys.argv[2:]))
