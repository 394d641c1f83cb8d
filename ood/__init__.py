"""oodbench: out-of-distribution detection benchmarks as a Snakemake workflow.

Submodules are imported lazily by the CLI so that light jobs (scoring,
tables) never pay for importing torch.
"""

__version__ = "0.1.0"
