"""The ``edgekv`` command (its entry point: ``edgekv.cli.main:main``).

    main.py      the click group; each command in its own module joins it there
    options.py   the options of the commands that load a model, and loading it
    chat.py      edgekv chat;  repl.py  its loop: commands, status line, Ctrl-C
    generate.py  edgekv generate;  serve.py  edgekv serve;  formats.py  edgekv formats
    plan.py      edgekv plan  (edgekv eval: edgekv/eval/cli.py)
    errors.py    a user's mistake as one line and exit code 2

Importing this package imports none of them (``edgekv.eval.cli`` imports ``errors`` from
here, and ``main`` imports ``edgekv.eval.cli``).
"""
