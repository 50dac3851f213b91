"""The runs layer: what every command does before and after its sink, below the methods and above
the store. :mod:`.documents` (options checked, token budget, documents loaded and tokenized,
subsamples, token fingerprints), :mod:`.manifests` (a run's manifest, its normalizers),
:mod:`.shared_store` (the store a run writes on one process or several, and the collection pass
that fills it) and :mod:`.rundir` (one run directory: overwrite, saved-config check, timings).

It may import the store, data, models, transforms, collect, distributed, config and the bottom
floor; never the methods, search, cli or reports."""
