"""The Lightning layer: modules, the data module, the trainer factory, resumable checkpoints, the
NaN guard, and every run that trains (``lens_run.train``, ``translator_run.train_translator``,
``surgery.skip_sweep``). The only part of the package that imports Lightning."""
