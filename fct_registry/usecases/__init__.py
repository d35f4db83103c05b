"""Use cases: one module per command group; functions take library objects, return results and print nothing."""
