"""Stage prepare: load the configured images and write the versioned splits to data/prepared/."""

from pathlib import Path

from fct_registry.core.config import load_params
from fct_registry.core.errors import report_errors_in_one_line
from fct_registry.method.data import load_source, save_prepared

report_errors_in_one_line()
params = load_params()
splits, classes = load_source(params.data)
save_prepared(splits, classes, Path("data/prepared"), params.data.source)
print({name: len(split) for name, split in splits.items()})
