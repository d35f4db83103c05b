"""The ``fct-registry`` command line (:data:`fct_registry.cli.app.app`)."""
