"""The ``medseg`` command line: thin typer commands over the Python API, heavy imports inside."""
