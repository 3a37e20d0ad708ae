"""``python -m edgekv.cli``: the ``edgekv`` command."""

from edgekv.cli.main import main

main()
