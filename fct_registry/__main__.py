"""``python -m fct_registry``: the ``fct-registry`` command line."""

from fct_registry.cli.app import app

app(prog_name="fct-registry")
