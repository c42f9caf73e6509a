"""The pipeline's stages, one file each (see :mod:`dataeff.experiment.stage` for the contract)."""
