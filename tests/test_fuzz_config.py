"""Every numeric config field, driven through 0, -1, NaN and a huge value (and, with hypothesis, through any
number): the answer is a one-line error or a documented meaning, never a traceback."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dataeff.config import load
from dataeff.errors import DataeffError
from dataeff.eval.command import EvalConfig
from dataeff.eval.tasks import TasksConfig
from dataeff.experiment.config import PipelineConfig
from dataeff.experiment.ensemble_train import EnsembleTrainConfig
from dataeff.generate.sample import SampleConfig
from dataeff.train import RunConfig
from dataeff.train.loop import check_run

CANONICAL = ["0", "-1", ".nan", "1e12"]


def numeric_fields(cls: type, prefix: str = "") -> list[str]:
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += numeric_fields(tp, f"{prefix}{f.name}.")
        elif {int, float} & {tp, *typing.get_args(tp)} and bool not in {tp, *typing.get_args(tp)}:
            out.append(f"{prefix}{f.name}")
    return out


RUN_FIELDS = numeric_fields(RunConfig)


@pytest.fixture(scope="module")
def base(small_corpus_module: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    cache = tmp_path_factory.mktemp("cache")
    return [f"data.corpus={small_corpus_module}", "data.val_docs=20", f"data.cache_dir={cache}", "tokenizer.kind=bpe",
            "tokenizer.vocab_size=300", "model.preset=nano", "model.seq_len=32", "train.batch_tokens=256",
            "train.progress=false", "train.epochs=2"]


def answer(cls: type, base: list[str], field: str, value: str) -> None:
    """Load the config with ``field=value`` and check it as its command would before doing any work."""
    try:
        cfg = load(cls, None, [*base, f"{field}={value}"])
        if cls is RunConfig:
            check_run(cfg)
    except DataeffError as e:
        assert "\n" not in str(e), f"{field}={value}: a multi-line error"


def test_every_numeric_run_field_gets_an_answer(base: list[str]) -> None:
    assert len(RUN_FIELDS) > 40  # the whole RunConfig, nested sections included
    for field in RUN_FIELDS:
        for value in CANONICAL:
            answer(RunConfig, base, field, value)


@pytest.mark.parametrize("cls", [EvalConfig, SampleConfig, TasksConfig, EnsembleTrainConfig, PipelineConfig])
def test_every_numeric_field_of_the_other_commands_gets_an_answer(cls: type) -> None:
    for field in numeric_fields(cls):
        for value in CANONICAL:
            answer(cls, [], field, value)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(RUN_FIELDS),
       value=st.one_of(st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True, width=64)))
def test_any_number_in_any_run_field_gets_an_answer(base: list[str], field: str, value: float) -> None:
    answer(RunConfig, base, field, repr(value) if not isinstance(value, float) or value == value else ".nan")
