"""Fault injection for flow runs that a Prefect worker starts (tests/system/test_team_stack.py): a worker's flow run is a
fresh interpreter, so the test cannot monkeypatch it; the test puts this folder on the run's PYTHONPATH instead.

GFT_TEST_FAIL_GFT_ROUND="<round>:<sentinel file>" makes GFT round <round> raise while the sentinel file exists
(the stage keeps its signature, so the call binds and keys as the real one). Delete the file and retry the run:
the round then runs for real.
"""

import os

_SPEC = os.environ.get("GFT_TEST_FAIL_GFT_ROUND")

if _SPEC:
    import functools
    from dataclasses import replace

    from pipeline import stages

    _round, _sentinel = _SPEC.split(":", 1)
    _real = stages.STAGES["gft_round"]

    @functools.wraps(_real.fn)
    def _failing(job, cfg, round_idx, *args, **kw):
        if round_idx == int(_round) and os.path.exists(_sentinel):
            raise RuntimeError(f"injected failure in gft round {round_idx}")
        return _real.fn(job, cfg, round_idx, *args, **kw)

    stages.STAGES["gft_round"] = replace(_real, fn=_failing)
