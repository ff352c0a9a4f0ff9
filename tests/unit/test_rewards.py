"""pipeline/rollout/verifiers.py: the math verifier case by case, exact match, `last_boxed`, and the bounded-time verifier.

The math cases run through one shared `Verifier("math_answer")`, so its worker (math-verify, sympy, the LaTeX
grammar: a few seconds) starts once. Expectations follow math-verify 0.9 where its judgement is defensible;
the lenient ones are marked "math-verify:" in their comment.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from collections import Counter

import pytest

from pipeline.rollout.verifiers import (REWARDS, RewardError, RewardOutput, Verifier, Unscorable, exact_match,
                              last_boxed, math_answer, resolve_reward)

H = "tests.reward_helpers"


@pytest.fixture(scope="module", autouse=True)
def no_leaked_workers():
    """Set up first and torn down last in this module: every verifier's worker is gone by then."""
    before = set(mp.active_children())
    yield
    assert set(mp.active_children()) <= before


@pytest.fixture(scope="module")
def math_verifier():
    # timeout_s well above math-verify's own 3 s parse/verify timeouts, so the cases that hit those
    # report math-verify's outcome rather than the verifier's "timeout".
    with Verifier("math_answer", timeout_s=30.0) as verifier:
        yield verifier
    assert verifier._proc is None


def boxed(answer: str) -> str:
    return f"Let me think step by step. ... So the answer is $\\boxed{{{answer}}}$."


# (response, gold, expected reward, expected reason), id
MATH_CASES = [
    # --- fractions
    pytest.param(boxed(r"\frac{1}{2}"), "1/2", 1.0, None, id="frac-vs-slash"),
    pytest.param(boxed(r"\dfrac{1}{2}"), r"\frac12", 1.0, None, id="dfrac-vs-frac12"),
    pytest.param(boxed("0.5"), r"\frac{1}{2}", 1.0, None, id="decimal-vs-frac"),
    pytest.param(boxed("1/2"), "0.5", 1.0, None, id="slash-vs-decimal"),
    pytest.param(boxed(r"\frac{1}{3}"), "1/2", 0.0, None, id="wrong-fraction"),
    pytest.param(boxed("0.333"), "1/3", 0.0, None, id="decimal-approx-too-coarse"),
    # math-verify: a decimal equal to 6 places counts as the exact value
    pytest.param(boxed("0.3333333"), "1/3", 1.0, None, id="decimal-approx-6-places"),
    pytest.param(boxed(r"\frac{1}{0}"), "1", 0.0, None, id="division-by-zero"),
    # --- integers, thousands separators, integer-valued forms
    pytest.param(boxed("42"), 42, 1.0, None, id="int-gold-not-a-string"),
    pytest.param(boxed("1,000"), "1000", 1.0, None, id="comma-thousands"),
    pytest.param(boxed("1{,}000"), "1000", 1.0, None, id="latex-braced-comma-thousands"),
    pytest.param(boxed("1000"), "1,000", 1.0, None, id="comma-thousands-in-gold"),
    pytest.param(boxed("1,001"), "1000", 0.0, None, id="comma-thousands-wrong"),
    pytest.param(boxed("1,5"), "15", 0.0, None, id="comma-not-thousands"),
    pytest.param(boxed("3.0"), "3", 1.0, None, id="trailing-zero-decimal"),
    pytest.param(boxed("003"), "3", 1.0, None, id="leading-zeros"),
    pytest.param(boxed("10^3"), "1000", 1.0, None, id="power-of-ten"),
    # math-verify: e-notation is not read as a number (defensible: it is not LaTeX)
    pytest.param(boxed("1e3"), "1000", 0.0, None, id="e-notation-not-a-number"),
    pytest.param(boxed(r"\sqrt{4}"), "2", 1.0, None, id="sqrt-evaluates"),
    # --- percentages (math-verify: "50\%" matches both 50 and 0.5)
    pytest.param(boxed(r"50\%"), "50", 1.0, None, id="percent-vs-number"),
    pytest.param(boxed(r"50\%"), "0.5", 1.0, None, id="percent-vs-fraction"),
    pytest.param(boxed("0.5"), r"50\%", 1.0, None, id="fraction-vs-percent-gold"),
    pytest.param(boxed(r"40\%"), r"50\%", 0.0, None, id="percent-wrong"),
    # --- intervals: the bracket kind matters
    pytest.param(boxed("(1, 2]"), "(1,2]", 1.0, None, id="interval-half-open"),
    pytest.param(boxed("[1, 2]"), "[1,2]", 1.0, None, id="interval-closed"),
    pytest.param(boxed("[1, 2)"), "(1,2]", 0.0, None, id="interval-brackets-swapped"),
    pytest.param(boxed("[1, 2]"), "(1,2)", 0.0, None, id="interval-closed-vs-open"),
    pytest.param(boxed("(0,1)"), "[0,1]", 0.0, None, id="interval-open-vs-closed"),
    pytest.param(boxed(r"(-\infty, 3)"), r"(-\infty,3)", 1.0, None, id="interval-infinite"),
    pytest.param(boxed(r"(-\infty, 3]"), r"(-\infty,3)", 0.0, None, id="interval-infinite-wrong-bracket"),
    pytest.param(boxed("x>3"), r"(3,\infty)", 0.0, None, id="inequality-vs-interval"),
    # --- tuples, sets, lists
    pytest.param(boxed("(1,2)"), "(2,1)", 0.0, None, id="tuple-order-matters"),
    pytest.param(boxed(r"\{1,2,3\}"), r"\{3,2,1\}", 1.0, None, id="set-order-free"),
    # math-verify: a bare comma list is compared as a set, so the order does not matter
    pytest.param(boxed("1,2,3"), "3,2,1", 1.0, None, id="bare-list-compared-as-set"),
    # --- negatives
    pytest.param(boxed("-3"), "-3", 1.0, None, id="negative"),
    pytest.param(boxed("3"), "-3", 0.0, None, id="sign-dropped"),
    pytest.param(boxed(r"-\frac{1}{2}"), "-0.5", 1.0, None, id="negative-fraction"),
    pytest.param(boxed(r"\frac{-1}{2}"), "-1/2", 1.0, None, id="negative-numerator"),
    pytest.param(boxed(r"-\infty"), r"\infty", 0.0, None, id="negative-infinity"),
    # --- roots, pi, symbolic
    pytest.param(boxed(r"2\sqrt{2}"), r"\sqrt{8}", 1.0, None, id="sqrt-simplified"),
    pytest.param(boxed(r"\sqrt{2}"), "1.414", 0.0, None, id="sqrt-vs-3-decimals"),
    # math-verify: again equal to 6 decimal places counts as exact
    pytest.param(boxed(r"\sqrt{2}"), "1.41421356", 1.0, None, id="sqrt-vs-8-decimals"),
    pytest.param(boxed(r"\pi"), r"\pi", 1.0, None, id="pi"),
    pytest.param(boxed("3.14"), r"\pi", 0.0, None, id="pi-approx-wrong"),
    pytest.param(boxed(r"2\pi"), r"\pi", 0.0, None, id="two-pi"),
    pytest.param(boxed(r"\pi/2"), r"\frac{\pi}{2}", 1.0, None, id="pi-over-2"),
    pytest.param(boxed(r"90^\circ"), r"\frac{\pi}{2}", 0.0, None, id="degrees-vs-radians"),
    pytest.param(boxed("x^2+2x+1"), "(x+1)^2", 1.0, None, id="polynomial-expanded"),
    pytest.param(boxed("a+b"), "b+a", 1.0, None, id="commutative"),
    pytest.param(boxed(r"2^{100}"), str(2**100), 1.0, None, id="big-power"),
    # --- equations
    pytest.param(boxed("x=5"), "5", 1.0, None, id="equation-vs-value"),
    pytest.param(boxed("5"), "x=5", 1.0, None, id="value-vs-equation-gold"),
    pytest.param(boxed("x = 5"), "x=5", 1.0, None, id="equation-spaces"),
    pytest.param(boxed("y=5"), "x=5", 0.0, None, id="equation-other-variable"),
    # --- units and decorations
    pytest.param(boxed(r"\$5"), "5", 1.0, None, id="dollar-sign"),
    pytest.param(boxed(r"5\text{ cm}"), "5", 1.0, None, id="unit-text"),
    pytest.param(boxed(r"5^\circ"), "5", 1.0, None, id="degree-sign"),
    pytest.param(boxed(r"\mathrm{5}"), "5", 1.0, None, id="mathrm"),
    pytest.param(r"\boxed{$5$}", "5", 1.0, None, id="dollars-inside-boxed"),
    # --- which \boxed counts
    pytest.param(r"First \boxed{3}, no wait: \boxed{5}.", "5", 1.0, None, id="last-boxed-counts"),
    pytest.param(r"First \boxed{5}, no wait: \boxed{3}.", "5", 0.0, None, id="earlier-boxed-ignored"),
    pytest.param(r"\boxed{\frac{1}{2}} or maybe \boxed{\frac{1}{3}}", "1/2", 0.0, None, id="last-of-two-fractions"),
    pytest.param(r"\boxed{\boxed{3}}", "3", 1.0, None, id="boxed-in-boxed"),
    pytest.param(r"So \fbox{7}", "7", 1.0, None, id="fbox"),
    pytest.param(r"\boxed {5}", "5", 1.0, None, id="space-before-brace"),
    pytest.param(boxed("7"), r"The answer is \boxed{7}.", 1.0, None, id="boxed-gold"),
    # --- wrong, empty, missing, unbalanced
    pytest.param(boxed("41"), "42", 0.0, None, id="wrong-integer"),
    pytest.param(boxed(""), "42", 0.0, "empty_boxed", id="empty-boxed"),
    pytest.param(r"\boxed{   }", "42", 0.0, "empty_boxed", id="blank-boxed"),
    pytest.param("The answer is 42.", "42", 0.0, "no_boxed", id="no-boxed"),
    pytest.param("", "42", 0.0, "no_boxed", id="empty-response"),
    pytest.param(r"The answer is \boxed 5", "5", 0.0, "no_boxed", id="boxed-without-braces"),
    pytest.param(r"The answer is \boxed{\frac{1}{2}", "1/2", 0.0, "no_boxed", id="unbalanced-truncated"),
    # the last \boxed is cut off: the last complete one counts (documented in last_boxed)
    pytest.param(r"\boxed{3}, or rather \boxed{5", "3", 1.0, None, id="unbalanced-last-falls-back"),
    pytest.param(r"\boxed{}}", "1", 0.0, "empty_boxed", id="extra-closing-brace"),
    # --- text answers
    pytest.param(boxed(r"\text{Paris}"), r"\text{Paris}", 1.0, None, id="text-answer"),
    pytest.param(boxed("Paris"), "Paris", 1.0, None, id="bare-word-answer"),
    pytest.param(boxed(r"\text{paris}"), r"\text{Paris}", 1.0, None, id="text-answer-case"),
    pytest.param(boxed(r"\text{London}"), r"\text{Paris}", 0.0, None, id="text-answer-wrong"),
    pytest.param(boxed(r"\textbf{(C)}"), "C", 1.0, None, id="multiple-choice-letter"),
    pytest.param(boxed("B"), "A", 0.0, None, id="multiple-choice-wrong"),
    # --- garbage and adversarial input
    pytest.param(boxed(r"\input{/etc/passwd}"), "1", 0.0, None, id="latex-input-injection"),
    pytest.param(boxed(r"\def\x{1}\x"), "1", 0.0, None, id="latex-def-injection"),
    pytest.param(boxed(r"\newcommand{\x}{5}\x"), "5", 0.0, None, id="latex-newcommand-injection"),
    pytest.param(boxed(r"1}\boxed{\input{/etc/passwd}"), "1", 0.0, None, id="injection-as-last-boxed"),
    pytest.param(boxed("αβγ ∞ 😀"), "1", 0.0, None, id="unicode-garbage"),
    # math-verify: unicode vulgar fractions and fullwidth digits are not numbers (the gold one is bad data)
    pytest.param(boxed("½"), "0.5", 0.0, None, id="unicode-vulgar-fraction"),
    pytest.param(boxed("2"), "２", 0.0, "unparseable_gold", id="fullwidth-digit-gold"),
    pytest.param("x" * 1_000_000 + r"\boxed{42}", "42", 1.0, None, id="megabyte-response"),
    pytest.param(r"\boxed{" * 20_000, "1", 0.0, "no_boxed", id="20k-unclosed-boxed"),
    pytest.param(boxed("9" * 4000), "9" * 4000, 1.0, None, id="4000-digit-number"),
    # CPython refuses int(str) over 4300 digits, so math-verify cannot read the number
    pytest.param(boxed("9" * 4301), "1", 0.0, "unparseable_answer", id="4301-digit-number"),
    # math-verify's parser is exponential in brace depth: its 3 s parse timeout gives up
    pytest.param(boxed("{" * 1000 + "1" + "}" * 1000), "1", 0.0, "unparseable_answer", id="1000-nested-braces"),
    # math-verify's own 3 s comparison timeout: a plain 0.0, not the verifier's "timeout"
    pytest.param(boxed("9^{9^{9^{9}}}"), "1", 0.0, None, id="power-tower"),
]


def test_math_case_table_is_large():
    assert len(MATH_CASES) >= 30


@pytest.mark.parametrize(("response", "gold", "expected", "reason"), MATH_CASES)
def test_math_answer(math_verifier, response, gold, expected, reason):
    assert math_verifier.reward_one(response, {"id": "q", "answer": gold}) == (expected, reason)


def test_math_answer_direct_raises_unscorable():
    # Called in-process (no worker): the reasons come as Unscorable before math-verify is touched.
    with pytest.raises(Unscorable) as info:
        math_answer("no box here", {"answer": "1"})
    assert info.value.reason == "no_boxed"
    with pytest.raises(Unscorable) as info:
        math_answer(r"\boxed{ }", {"answer": "1"})
    assert info.value.reason == "empty_boxed"


def test_score_counts_reasons(math_verifier):
    responses = [boxed("4"), boxed("5"), "no box", boxed(""), boxed("9" * 4301), boxed(r"\frac{8}{2}")]
    rows = [{"id": i, "answer": "4"} for i in range(len(responses))]
    out = math_verifier.reward(responses, rows)
    assert isinstance(out, RewardOutput)
    assert out.rewards == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert out.reasons == Counter(scored=3, no_boxed=1, empty_boxed=1, unparseable_answer=1)


# ---------------------------------------------------------------------------------------------------------
# exact_match
# ---------------------------------------------------------------------------------------------------------

EXACT_CASES = [
    pytest.param(r"So it is \boxed{Paris}.", "paris", 1.0, id="boxed-case-insensitive"),
    pytest.param("  Paris.  ", "Paris", 1.0, id="whole-response-trailing-period"),
    pytest.param("$42$", "42", 1.0, id="dollars"),
    pytest.param("$42$.", "42", 1.0, id="dollars-then-period"),
    pytest.param("new   york\ncity", "New York City", 1.0, id="whitespace-collapsed"),
    pytest.param("The answer is Paris.", "Paris", 0.0, id="no-boxed-whole-response"),
    pytest.param(r"\boxed{1} then \boxed{2}", "1", 0.0, id="last-boxed-only"),
    pytest.param(r"\boxed{1/2}", "0.5", 0.0, id="no-math-equivalence"),
    pytest.param(r"\boxed{42}", 42, 1.0, id="int-gold"),
]


@pytest.mark.parametrize(("response", "gold", "expected"), EXACT_CASES)
def test_exact_match_direct(response, gold, expected):
    assert exact_match(response, {"answer": gold}) == expected


def test_exact_match_through_scorer():
    responses, golds, expected = zip(*[p.values for p in EXACT_CASES])
    with Verifier("exact_match", timeout_s=10.0) as verifier:
        out = verifier.reward(list(responses), [{"id": i, "answer": g} for i, g in enumerate(golds)])
    assert out.rewards == list(expected)
    assert out.reasons == Counter(scored=len(EXACT_CASES))


# ---------------------------------------------------------------------------------------------------------
# last_boxed
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    pytest.param("no box at all", None, id="none"),
    pytest.param("", None, id="empty-text"),
    pytest.param(r"\boxed{1}", "1", id="simple"),
    pytest.param(r"\boxed{  x + 1 }", "x + 1", id="stripped"),
    pytest.param(r"\boxed{}", "", id="empty"),
    pytest.param(r"\boxed{\frac{1}{2}}", r"\frac{1}{2}", id="nested-braces"),
    pytest.param(r"\boxed{\{1,2\}}", r"\{1,2\}", id="escaped-braces-balanced"),
    pytest.param(r"\boxed{1} and \boxed{2}", "2", id="last-of-several"),
    pytest.param(r"\boxed{1} and \fbox{3}", "3", id="fbox-counts"),
    pytest.param(r"\boxed {4}", "4", id="space-before-brace"),
    pytest.param(r"\boxed{\boxed{3}}", "3", id="boxed-in-boxed-innermost-last"),
    pytest.param(r"\boxed{a}}", "a", id="extra-closing-brace"),
    pytest.param(r"} \boxed{a}", "a", id="stray-closing-brace-before"),
    pytest.param(r"\boxed{1} and \boxed{2", "1", id="unbalanced-last-falls-back"),
    pytest.param(r"\boxed{1 \boxed{2", None, id="all-unbalanced"),
    pytest.param(r"\boxed{1 \boxed{2}", "2", id="inner-balanced-outer-not"),
    pytest.param(r"\boxed 5", None, id="no-brace"),
    pytest.param(r"\boxedx{5}", None, id="other-command"),
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_last_boxed_is_linear_on_adversarial_text():
    # 200k unclosed \boxed{ (1.4 MB): the old scan from every match was quadratic (hours here).
    start = time.perf_counter()
    assert last_boxed(r"\boxed{" * 200_000) is None
    assert last_boxed(r"\boxed{" * 200_000 + "}") == ""
    assert last_boxed("{" * 100_000 + r"\boxed{7}" + "}" * 100_000) == "7"
    assert time.perf_counter() - start < 5.0


# ---------------------------------------------------------------------------------------------------------
# Verifier: timeouts, errors, None, construction, cleanup
# ---------------------------------------------------------------------------------------------------------


def test_timeout_scores_zero_and_next_call_gets_a_fresh_worker():
    start = time.perf_counter()
    with Verifier(f"{H}:sleepy", timeout_s=1.0) as verifier:
        assert verifier.reward_one("fine", {"id": 0}) == (1.0, None)
        first = verifier._proc
        assert verifier.reward_one("hang", {"id": 1}) == (0.0, "timeout")
        assert verifier._proc is None and not first.is_alive()  # killed, not left sleeping
        assert verifier.reward_one("fine", {"id": 2}) == (1.0, None)
        assert verifier._proc.pid != first.pid
        out = verifier.reward(["fine", "hang", "fine"], [{"id": i} for i in range(3)])
        assert out.rewards == [1.0, 0.0, 1.0]
        assert out.reasons == Counter(scored=2, timeout=1)
    assert time.perf_counter() - start < 15.0  # two 1 s timeouts and three cheap worker starts


def test_math_worker_is_warm_before_the_first_timed_call():
    # A fresh worker imports math-verify and sympy (about 0.5 s here) before it says ready, not inside the
    # first call's timeout_s: else, with a short timeout, every call times out, as each one gets a fresh
    # worker that pays the imports again. A call on a warm worker takes milliseconds; three tries leave
    # room for a loaded machine.
    with Verifier("math_answer", timeout_s=0.25) as verifier:
        results = [verifier.reward_one(boxed("2"), {"id": i, "answer": "2"}) for i in range(3)]
    assert (1.0, None) in results


def test_the_warm_up_sets_no_math_verify_alarm(monkeypatch):
    # On a loaded machine math-verify's first parse (imports, grammar) can pass its own 3 s alarm; parse then
    # returns nothing, the warm-up raised Unscorable and the worker died with "exit code None". The start is
    # bounded by the parent's startup_timeout_s instead, so the warm-up arms no alarm.
    import signal

    from pipeline.rollout import verifiers

    armed: list[int] = []
    real = signal.alarm
    monkeypatch.setattr(signal, "alarm", lambda s: armed.append(s) or real(s))
    verifiers._warm_up(verifiers.math_answer)
    assert not [s for s in armed if s > 0]


def test_a_worker_that_fails_to_start_says_why(monkeypatch):
    import tests.reward_helpers  # noqa: F401 (imported here, so only the spawned worker's import fails)

    monkeypatch.setenv("GFT_TEST_REWARD_IMPORT_FAILS", "1")
    with Verifier(f"{H}:returns_none") as verifier:
        with pytest.raises(RewardError, match=r"failed while starting: RuntimeError: this reward's module cannot"):
            verifier.reward_one("resp", {"id": 1})


def test_reward_exception_raises_reward_error_naming_the_row():
    with Verifier(f"{H}:raises_value_error") as verifier:
        with pytest.raises(RewardError, match=r"row id='row-17'.*ValueError: cannot score 'resp'"):
            verifier.reward_one("resp", {"id": "row-17"})
        with pytest.raises(RewardError, match="row id=5"):
            verifier.reward(["a", "b"], [{"id": 5}, {"id": 6}])
        with pytest.raises(RewardError, match=r"row id='\?'"):
            verifier.reward_one("resp", {"answer": 1})


def test_reward_worker_death_raises_reward_error_and_recovers():
    with Verifier(f"{H}:dies", timeout_s=10.0) as verifier:
        with pytest.raises(RewardError, match=r"row id=7.*died \(exit code 3\)"):
            verifier.reward_one("die", {"id": 7})
        assert verifier.reward_one("fine", {"id": 8}) == (1.0, None)


def test_reward_returning_non_float_raises_reward_error():
    with Verifier(f"{H}:returns_text") as verifier:
        with pytest.raises(RewardError, match=r"row id=3.*'one'"):
            verifier.reward_one("x", {"id": 3})


def test_reward_returning_none():
    with Verifier(f"{H}:returns_none") as verifier:
        assert verifier.reward_one("x", {"id": 0}) == (None, None)
    with Verifier(f"{H}:none_without_answer") as verifier:
        out = verifier.reward(["a", "b", "c"], [{"id": 0, "answer": 1}, {"id": 1}, {"id": 2, "answer": 2}])
    assert out.rewards == [1.0, None, 1.0]
    assert out.reasons == Counter(scored=3)  # a reward that does not apply still counts as scored


def test_unknown_reward_fails_at_construction():
    with pytest.raises(KeyError, match="unknown reward 'no_such_reward'"):
        Verifier("no_such_reward")
    with pytest.raises(ImportError):
        Verifier("tests.no_such_module:fn")
    with pytest.raises(ValueError, match="not a Python function defined in"):
        Verifier(f"{H}:no_such_function")


@pytest.mark.parametrize("spec", ["builtins:exec", "builtins:eval", "os:system", "subprocess:Popen",
                                  "tests.reward_helpers:time"])
def test_a_reward_spec_names_a_function_of_its_own_module(spec):
    """Not a builtin, not something the module imported from elsewhere (os.system is posix.system), not a class
    or a module."""
    with pytest.raises(ValueError, match="not a Python function defined in"):
        Verifier(spec)


def test_a_run_config_allows_reward_modules_only_by_name():
    from pydantic import ValidationError

    from pipeline.config import GRPOConfig, RunConfig

    with pytest.raises(ValidationError, match=r"grpo.rewards\[1\] = 'tests.reward_helpers:none_for_odd_id'.*reward_modules"):
        RunConfig(grpo=GRPOConfig(rewards=("math_answer", f"{H}:none_for_odd_id")))
    with pytest.raises(ValidationError, match="eval.reward = 'builtins:exec'"):
        RunConfig(eval={"reward": "builtins:exec"})
    RunConfig(grpo=GRPOConfig(rewards=("math_answer", f"{H}:none_for_odd_id")), reward_modules=("tests",))


def test_resolve_reward():
    assert resolve_reward("math_answer") is math_answer is REWARDS["math_answer"]
    assert resolve_reward("exact_match") is exact_match
    from tests.reward_helpers import sleepy

    assert resolve_reward(f"{H}:sleepy") is sleepy


def test_mismatched_lengths_raise_before_starting_a_worker():
    verifier = Verifier("exact_match")
    with pytest.raises(ValueError, match="2 responses but 1 rows"):
        verifier.reward(["a", "b"], [{"answer": "a"}])
    assert verifier._proc is None
    verifier.close()  # closing a never-started verifier is fine


def test_close_kills_the_worker_and_is_idempotent():
    verifier = Verifier("exact_match")
    assert verifier.reward_one("a", {"answer": "a"}) == (1.0, None)
    proc = verifier._proc
    assert proc.is_alive()
    verifier.close()
    assert not proc.is_alive() and verifier._proc is None
    verifier.close()
    assert verifier.reward_one("a", {"answer": "b"}) == (0.0, None)  # restarts on demand
    verifier.close()


@pytest.mark.parametrize("gold,ok", [("12", True), ("\\frac{1}{2}", True), ("(1,2]", True), ("\\text{(C)}", True),
                                     ("\\boxed{7}", True), ("\\frac{", False), ("x^{", False), ("}{", False)])
def test_gold_check(gold, ok):
    from pipeline.rollout.verifiers import Unscorable, gold_check

    if ok:
        assert gold_check("", {"answer": gold}) == 1.0
    else:
        with pytest.raises(Unscorable, match="unparseable_gold"):
            gold_check("", {"answer": gold})
