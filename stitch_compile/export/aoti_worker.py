"""One AOTInductor compile in its own process: ``python -m stitch_compile.export.aoti_worker PROGRAM PACKAGE``.

A plain subprocess rather than multiprocessing: spawned pools re-run the caller's main module,
which breaks scripts that call ``export`` without a ``__main__`` guard. Prints the JSON list of
the constants the package reads; on failure, one line on stderr and exit code 1.
"""

from __future__ import annotations

import json
import sys

import torch


def main(program_path: str, package_path: str) -> None:
    from .aoti_target import compile_program

    print(json.dumps(sorted(compile_program(torch.export.load(program_path), package_path))))


if __name__ == "__main__":
    try:
        main(*sys.argv[1:3])
    except Exception as e:  # the parent turns this line into its error message
        print(f"{e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300], file=sys.stderr)
        sys.exit(1)
