"""Many students in one pass: grids and choices made on validation (:mod:`.grid`), :func:`~kdistill.sweeps.multi.fit_many`
(:mod:`.multi`) and the stacked-tensor backend (:mod:`.stacked`)."""
