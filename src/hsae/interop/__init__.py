"""Bridges to the rest of the SAE ecosystem: SAELens folders (and the Hub), SAEBench, shareable
run archives."""

from hsae.interop.archive import export_archive, extract_archive
from hsae.interop.hub import upload
from hsae.interop.saebench import SAEBenchSAE, run_saebench, saebench_saes, table1
from hsae.interop.saelens import (
    InteropError,
    export_saelens,
    forest_from_saelens,
    import_forest,
    load_saelens_export,
    read_saelens,
)

__all__ = [
    "InteropError",
    "SAEBenchSAE",
    "export_archive",
    "export_saelens",
    "extract_archive",
    "forest_from_saelens",
    "import_forest",
    "load_saelens_export",
    "read_saelens",
    "run_saebench",
    "saebench_saes",
    "table1",
    "upload",
]
