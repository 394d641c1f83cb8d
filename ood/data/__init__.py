"""Datasets: offline demo sources, curation, and the on-disk manifest contract.

A curated dataset is a directory of PNG images plus `manifest.csv`
(index, path, label, split, sha256); see `ood.data.manifest`. The demo
sources in `ood.data.demo` use only data that installed packages ship.
Submodules are imported explicitly so that importing this package stays cheap.
"""
