"""``python -m wardgate`` is the ``wardgate`` command."""

from wardgate.cli import main

main()
