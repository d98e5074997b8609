"""Run the real ``stitch-compile`` entry point in-process and return its exit code."""

from stitch_compile.cli import main


def run_cli(*args) -> int:
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        return exc.code
    return 0
