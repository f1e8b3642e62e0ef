"""`python -m xdsl ...` (and `torchrun -m xdsl run spec.xspec`)."""

from xdsl.cli import main

main()
