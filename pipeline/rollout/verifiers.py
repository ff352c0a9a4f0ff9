"""Verifiers by name: `reward(response, row) -> float | None`, and the `Verifier` process that runs one and
never hangs. ("Reward" names what a verifier gives a response; "score" is kept for token log-probs.)

A reward sees the response text and the whole dataset row (the gold answer is `row["answer"]`). It returns
a float, or None when it does not apply to the row. A response it cannot score (no `\\boxed{}`, an
unparseable answer) raises `Unscorable(reason)`: the `Verifier` gives it 0.0 and counts the reason.

`Verifier` runs the reward in a child process, so each call is bounded in time: math-verify's own timeouts use
`signal.alarm`, which works only in a main thread (Prefect runs tasks in worker threads), and a pathological
sympy expression can spin for minutes. A call that passes `timeout_s` kills the child, scores 0.0 with the
reason "timeout", and a fresh child takes the next response. Any other exception in a reward is a bug in the
reward or the data and is raised, naming the row.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import multiprocessing as mp
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["REWARDS", "Unscorable", "RewardError", "RewardOutput", "Verifier", "last_boxed",
           "math_answer", "exact_match", "gold_check", "resolve_reward"]

RewardFn = Callable[[str, Mapping[str, Any]], "float | None"]


class Unscorable(Exception):
    """The response cannot be scored (scores 0.0); `reason` is a short stable label that gets counted."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class RewardError(RuntimeError):
    """A reward raised something other than Unscorable: a bug in the reward or bad data in the row."""


_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BRACE = re.compile(r"[{}]")


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`) with balanced braces, or None.

    One pass over the braces, so it stays linear on adversarial text (thousands of unclosed `\\boxed{`)."""
    starts = [match.end() for match in _BOXED.finditer(text)]
    if not starts:
        return None
    closing: dict[int, int] = {}  # position of each "{" -> position of its matching "}"
    stack: list[int] = []
    for brace in _BRACE.finditer(text, starts[0] - 1):
        if brace.group() == "{":
            stack.append(brace.start())
        elif stack:
            closing[stack.pop()] = brace.start()
    for start in reversed(starts):
        end = closing.get(start - 1)
        if end is not None:
            return text[start:end].strip()
    return None


def _parse_math(expr: str, what: str, timeout_s: int):
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    configs = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    parsed = parse(f"${expr}$", extraction_config=configs, parsing_timeout=timeout_s)
    if not parsed:
        raise Unscorable(f"unparseable_{what}")
    return parsed


def math_answer(response: str, row: Mapping[str, Any], *, timeout_s: int = 3) -> float:
    """1.0 if the last `\\boxed{}` of the response equals the gold `row["answer"]` mathematically, else 0.0."""
    boxed = last_boxed(response)
    if boxed is None:
        raise Unscorable("no_boxed")
    if not boxed:
        raise Unscorable("empty_boxed")
    gold_text = str(row["answer"])
    gold = _parse_math(last_boxed(gold_text) or gold_text, "gold", timeout_s)
    pred = _parse_math(boxed, "answer", timeout_s)
    from math_verify import verify

    return 1.0 if verify(gold, pred, timeout_seconds=timeout_s) else 0.0


def gold_check(_response: str, row: Mapping[str, Any], *, timeout_s: int = 3) -> float:
    """1.0 when `row["answer"]` (or its last `\\boxed{}`) parses with math-verify, else Unscorable: a data
    check, run through a `Verifier` ("pipeline.rollout.verifiers:gold_check") so that it is bounded in time too."""
    gold_text = str(row["answer"])
    parsed = _parse_math(last_boxed(gold_text) or gold_text, "gold", timeout_s)
    if all(isinstance(p, str) for p in parsed):  # math-verify falls back to the raw string: "\\frac{"
        raise Unscorable("unparseable_gold")
    return 1.0


def _normalize(text: str) -> str:
    text = " ".join(text.split()).lower()
    previous = None
    while text != previous:  # "$42$." and "$42.$" both end as "42"
        previous, text = text, text.strip().strip("$").rstrip(".").strip()
    return text


def exact_match(response: str, row: Mapping[str, Any]) -> float:
    """1.0 if the last `\\boxed{}` (or the whole response when none) equals `row["answer"]` after
    whitespace, case, `$` and trailing-period normalization."""
    answer = last_boxed(response)
    candidate = response if answer is None else answer
    return 1.0 if _normalize(candidate) == _normalize(str(row["answer"])) else 0.0


REWARDS: dict[str, RewardFn] = {"math_answer": math_answer, "exact_match": exact_match}


def resolve_reward(spec: str) -> RewardFn:
    """A reward by registered name, or by import path `package.module:function` for user rewards."""
    if spec in REWARDS:
        return REWARDS[spec]
    if ":" in spec:
        module, _, name = spec.partition(":")
        fn = getattr(importlib.import_module(module), name, None)
        if not inspect.isfunction(fn) or fn.__module__ != module:  # builtins:exec, os:system re-exported, a class
            raise ValueError(f"reward {spec!r}: {module}.{name} is not a Python function defined in {module}; a "
                             "reward spec names a function of the user's own module")
        return fn
    raise KeyError(f"unknown reward {spec!r}; known: {sorted(REWARDS)} or an import path 'module:function'")


# ---------------------------------------------------------------------------------------------------------
# Bounded-time scoring in a child process
# ---------------------------------------------------------------------------------------------------------


def _warm_up(fn: RewardFn) -> None:
    """Pay the one-time costs (importing math-verify and sympy, building the LaTeX parser) before `ready`,
    so they do not count against the first response's `timeout_s`: with a short timeout, every fresh worker
    would otherwise time out on its first response, and so on every response after a timeout. Without
    math-verify's own alarm (`timeout_s=0`): on a loaded machine the first parse can pass its 3 s, and the
    parent's `startup_timeout_s` bounds the start anyway."""
    if fn is math_answer:
        quiet = logging.getLogger("math_verify")  # its one-time "Timeout is disabled" warning
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            math_answer("\\boxed{\\frac{1}{2}}", {"answer": "0.5"}, timeout_s=0)
        finally:
            quiet.setLevel(level)


def _worker_main(conn, spec: str) -> None:
    try:
        fn = resolve_reward(spec)
        _warm_up(fn)
    except BaseException as exc:  # reported to the parent, which raises it naming the reward
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", None))
    while True:
        item = conn.recv()
        if item is None:
            return
        response, row = item
        try:
            conn.send(("ok", fn(response, row)))
        except Unscorable as exc:
            conn.send(("unscorable", exc.reason))
        except Exception as exc:  # reported to the parent, which raises it with the row
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


@dataclass
class RewardOutput:
    """Rewards aligned with the responses (None where the reward does not apply) and reason counts."""

    rewards: list[float | None]
    reasons: Counter = field(default_factory=Counter)


class Verifier:
    """Rewards responses with one verifier in a child process, each call bounded by `timeout_s` seconds."""

    def __init__(self, reward: str, *, timeout_s: float = 10.0, startup_timeout_s: float = 120.0):
        resolve_reward(reward)  # fail here, in the caller, on an unknown name
        self.spec, self.timeout_s, self.startup_timeout_s = reward, timeout_s, startup_timeout_s
        self._proc = self._conn = None

    def __enter__(self) -> Verifier:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> None:
        ctx = mp.get_context("spawn")  # fork after torch/threads start can deadlock
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_worker_main, args=(child, self.spec), daemon=True)
        self._proc.start()
        child.close()
        if not self._conn.poll(self.startup_timeout_s):
            self.close()
            raise RewardError(f"reward worker for {self.spec!r} did not start in {self.startup_timeout_s}s")
        try:
            status, reason = self._conn.recv()
        except (EOFError, OSError):  # it died while starting (a crash in C code, the OOM killer)
            self._proc.join(10)
            code = self._proc.exitcode
            self.close()
            raise RewardError(f"reward worker for {self.spec!r} died while starting (exit code {code})") from None
        if status == "failed":
            self.close()
            raise RewardError(f"reward worker for {self.spec!r} failed while starting: {reason}")

    def close(self) -> None:
        if self._proc is not None:
            if self._proc.is_alive():
                self._proc.kill()
            self._proc.join()
            self._conn.close()
        self._proc = self._conn = None

    def reward_one(self, response: str, row: Mapping[str, Any]) -> tuple[float | None, str | None]:
        """(reward, reason): reason is None for a rewarded response, else why it got 0.0."""
        if self._proc is None:
            self._start()
        where = f"reward {self.spec!r} failed on row id={row.get('id', '?')!r}"
        try:
            self._conn.send((response, dict(row)))
            if not self._conn.poll(self.timeout_s):
                self.close()  # the next call starts a fresh worker
                return 0.0, "timeout"
            status, value = self._conn.recv()
        except (EOFError, OSError):  # the worker died (os._exit, a crash in C code, the OOM killer)
            self._proc.join(1)
            code = self._proc.exitcode
            self.close()  # the next call starts a fresh worker
            raise RewardError(f"{where}: the reward worker died (exit code {code})") from None
        if status == "unscorable":
            return 0.0, value
        if status == "error":
            raise RewardError(f"{where}: {value}")
        if value is None:
            return None, None
        try:
            return float(value), None
        except (TypeError, ValueError):
            raise RewardError(f"{where}: returned {value!r}, not a float or None") from None

    def reward(self, responses: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> RewardOutput:
        """Reward responses[i] against rows[i]."""
        if len(responses) != len(rows):
            raise ValueError(f"{len(responses)} responses but {len(rows)} rows")
        out = RewardOutput(rewards=[])
        for response, row in zip(responses, rows):
            value, reason = self.reward_one(response, row)
            out.rewards.append(value)
            out.reasons["scored" if reason is None else reason] += 1
        return out
