"""``python -m perf``: see :mod:`perf.cli`."""

from perf.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
