"""`python -m ldm.eval`: the same as `ldm-eval`."""

from ldm.eval.cli import main

main()
