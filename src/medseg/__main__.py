"""``python -m medseg`` runs the ``medseg`` command line."""

from medseg.cli.main import main

main()
