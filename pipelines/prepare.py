"""Stage prepare: load the configured images and write the versioned splits to data/prepared/."""

from pathlib import Path

from fct_registry.config import load_params
from fct_registry.data import load_source, save_prepared
from fct_registry.errors import report_errors_in_one_line

report_errors_in_one_line()
params = load_params()
splits, classes = load_source(params.data)
save_prepared(splits, classes, Path("data/prepared"), params.data.source)
print({name: len(split) for name, split in splits.items()})
