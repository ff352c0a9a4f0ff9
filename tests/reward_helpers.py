"""Rewards for tests/test_rewards.py, loaded by import path (`tests.reward_helpers:NAME`) in the scorer's
spawned worker. Each takes `(response, row)` like a registered reward; all but `sleepy` and `dies` act the
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
