"""``python -m medseg.cli`` (e.g. under torchrun) runs the ``medseg`` command line."""

from medseg.cli.main import main

main()
