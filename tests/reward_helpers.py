"""Rewards for tests/unit/test_rewards.py, loaded by import path (`tests.reward_helpers:NAME`) in the verifier's
spawned worker (tests/integration/test_stages.py grades evaluations with `even_length`). Each takes `(response, row)` like a registered reward; all but `sleepy` and `dies` act the
same on every response, those two misbehave only on the response that asks for it."""

from __future__ import annotations

import os
import time


def sleepy(response, row):
    """Hangs on the response "hang" (a sympy expression that spins for minutes); 1.0 otherwise."""
    if response == "hang":
        time.sleep(1000)
    return 1.0


def raises_value_error(response, row):
    """A buggy reward: any exception but Unscorable is a bug, raised in the parent with the row id."""
    raise ValueError(f"cannot score {response!r}")


def returns_none(response, row):
    """A reward that does not apply to any row."""
    return None


def none_without_answer(response, row):
    """Applies only to rows with an "answer": 1.0 there, None elsewhere."""
    return 1.0 if "answer" in row else None


def dies(response, row):
    """The worker process dies under the reward (a crash in C code, the OOM killer) on the response "die"."""
    if response == "die":
        os._exit(3)
    return 1.0


def returns_text(response, row):
    """A buggy reward that returns something that is not a float."""
    return "one"


def none_for_odd_id(response, row):
    """Applies only to rows whose id ends in an even digit: 1.0 if the response contains "4", else 0.0."""
    if int(str(row["id"])[-1]) % 2:
        return None
    return 1.0 if "4" in response else 0.0


def none_unless_long(response, row):
    """Applies only to responses of more than 3 characters: their length / 10."""
    return len(response) / 10 if len(response) > 3 else None


def even_length(response, row):
    """1.0 for a response of even length, else 0.0: a reward a tiny untrained model earns about half the time."""
    return 1.0 if len(response) % 2 == 0 else 0.0


if os.environ.get("GFT_TEST_REWARD_IMPORT_FAILS"):  # set by a test after this module is imported in the parent
    raise RuntimeError("this reward's module cannot be imported in the worker")
