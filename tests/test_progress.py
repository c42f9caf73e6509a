"""The pipeline's progress line: counts, elapsed time and an ETA from measured job times."""

from __future__ import annotations

import io

from dataeff.experiment.progress import PipelineProgress, clock


def test_clock() -> None:
    assert [clock(s) for s in (0, 42.4, 185, 3720)] == ["0s", "42s", "3m05s", "1h02m"]


def test_eta_is_the_mean_job_time_times_the_jobs_left_shared_by_the_workers() -> None:
    out = io.StringIO()
    p = PipelineProgress(file=out, refresh=60)
    p.enter("tuning")
    assert p.eta() is None and p.line().endswith("ETA ?")  # nothing planned yet is not "done in 0s"
    p.batch(pending=5, skipped=1, workers=2)
    assert p.eta() is None and "runs 1/6" in p.line() and "ETA ?" in p.line()
    p.finished(10.0)
    p.finished(30.0, failed=True)
    # 3 jobs left at 20 s each on 2 workers.
    assert p.eta() == 30.0
    assert "pipeline · tuning · runs 3/6 (1 failed)" in p.line() and p.line().endswith("ETA 30s")
    p.finished(20.0)
    p.finished(20.0)
    assert p.eta() == 20.0  # the last job has one worker
    p.enter("ensembles")
    p.write("[dataeff run] ensembles: 4 members")
    p.close()
    text = out.getvalue()
    assert "[dataeff run] ensembles: 4 members" in text and "pipeline · ensembles · runs 5/6" in text


def test_disabled_progress_writes_nothing() -> None:
    out = io.StringIO()
    p = PipelineProgress(enabled=False, file=out)
    p.batch(pending=2, skipped=0, workers=1)
    p.finished(1.0)
    p.close()
    assert out.getvalue() == "" and p.eta() == 1.0
