"""The ``edgekv`` command.

    main.py    the group and chat, generate, serve, formats (eval: edgekv.eval.cli)
    chat.py    the chat loop: commands, status line, Ctrl-C
    plan.py    ``edgekv plan``
    errors.py  a user's mistake as one line and exit code 2
"""

from edgekv.cli.main import main

__all__ = ["main"]
