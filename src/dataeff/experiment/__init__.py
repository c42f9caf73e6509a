"""Experiments of many runs: the pipeline driver (``pipeline``), its config and stage registry (``config``), the
stage contract (``stage``) and the stages themselves (``stages/``), the executor (``executor``), the run index
(``runstore``), the tuner (``tune``), scaling-law fits (``scaling``) and ensemble training (``ensemble_train``)."""
