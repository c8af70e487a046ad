"""Benchmark: stillhouse's score_samples against plain Math-Verify on the same rows.

Builds a deterministic mixed set (seeded) of >= 10,000 teacher-style samples, 8 per problem with
realistic answer sharing:
- GSM8K-style: arithmetic chain of thought ending "#### N", "The answer is N." or "The answer is
  $N." with thousands separators, dollar signs, trailing zeros and units; right and wrong answers.
- MATH-style: LaTeX reasoning ending in \\boxed{...} (or Minerva's "Final Answer: ... I hope it is
  correct."): fractions, roots, intervals, points, find-all lists, polynomials, multiples of pi;
  each correct sample uses one of several equivalent forms, each wrong one a near miss.

The generator knows the truth label of every row. Both verifiers run in this process, one after the
other: ours = score_samples(rows) (all cores); baseline = math_verify.parse(response),
math_verify.parse("$" + reference + "$"), math_verify.verify(gold, pred) per row with Math-Verify's
default configs and timeouts, single process (the way reward functions usually call it).

Run: .venv/bin/python bench/verifier.py [--rows N] [--seed S] [--baseline-rows N]
Last line: verifier: ours_per_s=... mathverify_per_s=... ratio=... agreement=...
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import random
import time
from dataclasses import dataclass

SAMPLES_PER_PROBLEM = 8


@dataclass(frozen=True)
class Row:
    response: str
    reference: str
    label: bool  # ground truth: is the response's final answer right?
    kind: str  # "gsm" or "math"


# --------------------------------------------------------------------------- GSM8K-style

_NAMES = ["Natalia", "Weng", "Betty", "Julie", "James", "Albert", "Ken", "Alexis", "Tina", "Mark"]
_ITEMS = ["clips", "apples", "books", "cookies", "marbles", "tickets", "pages", "stamps"]


def _fmt_number(value: float, rng: random.Random, *, money: bool) -> str:
    """One of the ways a model writes a number."""
    if value == int(value):
        n = int(value)
        styles = [str(n), f"{n:,}", f"{n:,}", f"{n}.00" if money else str(n)]
    else:
        styles = [f"{value:.2f}", f"{value:,.2f}"]
    s = rng.choice(styles)
    if money and rng.random() < 0.4:
        s = "$" + s
    return s


def _gsm_text(rng: random.Random, answer_text: str, item: str) -> str:
    name = rng.choice(_NAMES)
    a, b, c = rng.randint(2, 90), rng.randint(2, 40), rng.randint(2, 300)
    steps = [
        f"{name} has {a} {item} and buys {b} more each day for {c % 7 + 2} days.",
        f"That is {b} * {c % 7 + 2} = <<{b}*{c % 7 + 2}={b * (c % 7 + 2)}>>{b * (c % 7 + 2)} {item}.",
        f"Adding the {a} {item} from before gives {a} + {b * (c % 7 + 2)} = {a + b * (c % 7 + 2)}.",
        f"Then we account for the remaining {c} {item} in the second step of the problem.",
    ]
    ending = rng.choices(
        [
            f"#### {answer_text}",
            f"The answer is {answer_text}.",
            f"Therefore, the answer is {answer_text} {item}.",
            f"So the final answer is {answer_text}.",
        ],
        weights=[5, 3, 1, 1],
    )[0]
    return "\n".join(steps[: rng.randint(2, 4)]) + "\n" + ending


def _gsm_problem(rng: random.Random) -> list[Row]:
    money = rng.random() < 0.35
    if money and rng.random() < 0.3:
        value = rng.randint(100, 999_999) / 100
    else:
        magnitude = rng.choice([99, 9_999, 2_000_000])
        value = float(rng.randint(2, magnitude))
    reference = f"{value:.2f}".rstrip("0").rstrip(".") if value != int(value) else str(int(value))
    # A few distinct wrong answers per problem, shared by the wrong samples (realistic duplication).
    wrong_values = set()
    while len(wrong_values) < rng.randint(1, 3):
        w = rng.choice(
            [value + rng.randint(1, 20), value - rng.randint(1, 9), value * 10, round(value / 10, 2), value * 2]
        )
        if w != value and w > 0:
            wrong_values.add(w)
    wrong_values = sorted(wrong_values)
    p_correct = rng.random()
    item = rng.choice(_ITEMS)
    rows = []
    for _ in range(SAMPLES_PER_PROBLEM):
        correct = rng.random() < p_correct
        v = value if correct else rng.choice(wrong_values)
        rows.append(Row(_gsm_text(rng, _fmt_number(v, rng, money=money), item), reference, correct, "gsm"))
    return rows


# --------------------------------------------------------------------------- MATH-style


def _squarefree(rng: random.Random) -> int:
    return rng.choice([2, 3, 5, 6, 7, 10, 11, 13, 14, 15])


def _math_family(rng: random.Random) -> tuple[str, list[str], list[str]]:
    """(reference, equivalent forms, wrong forms) for one MATH-style problem."""
    kind = rng.choice(
        ["frac", "frac_dec", "root", "sqrt_frac", "interval", "poly", "point", "set", "int", "pi"]
    )
    if kind in ("frac", "frac_dec"):
        den = rng.choice([3, 7, 9, 11, 13]) if kind == "frac" else rng.choice([4, 5, 8, 16, 20, 25])
        num = rng.choice([n for n in range(1, 4 * den) if math.gcd(n, den) == 1])
        ref = f"\\frac{{{num}}}{{{den}}}"
        right = [ref, f"\\dfrac{{{num}}}{{{den}}}", f"\\frac{{{2 * num}}}{{{2 * den}}}", f"{num}/{den}"]
        if kind == "frac_dec":
            right.append(f"{num / den:g}")
        wrong = [f"\\frac{{{den}}}{{{num}}}" if num != den else "0", f"\\frac{{{num + 1}}}{{{den}}}"]
    elif kind == "root":
        k, m = rng.randint(2, 9), _squarefree(rng)
        ref = f"{k}\\sqrt{{{m}}}"
        right = [ref, f"\\sqrt{{{k * k * m}}}", f"{k} \\sqrt{{{m}}}"]
        wrong = [f"\\sqrt{{{k * m}}}", f"{k + 1}\\sqrt{{{m}}}"]
    elif kind == "sqrt_frac":
        m = _squarefree(rng)
        ref = f"\\frac{{\\sqrt{{{m}}}}}{{{m}}}"
        right = [ref, f"\\frac{{1}}{{\\sqrt{{{m}}}}}", f"\\sqrt{{{m}}}/{m}"]
        wrong = [f"\\sqrt{{{m}}}", f"\\frac{{\\sqrt{{{m}}}}}{{2}}" if m != 2 else "1"]
    elif kind == "interval":
        a = rng.randint(-9, 5)
        b = a + rng.randint(1, 9)
        ref = f"[{a}, {b})"
        right = [ref, f"[{a},{b})", f"{a} \\le x < {b}"]
        wrong = [f"({a}, {b})", f"[{a}, {b}]", f"[{a}, {b + 1})"]
    elif kind == "poly":
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        ref = f"(x+{a})(x+{b})"
        right = [ref, f"x^2+{a + b}x+{a * b}", f"(x+{b})(x+{a})", f"{a * b}+{a + b}x+x^2"]
        wrong = [f"(x+{a})(x-{b})", f"x^2+{a + b}x-{a * b}", f"(x+{a})^2" if a != b else f"(x+{a + 1})^2"]
    elif kind == "point":
        a, b = rng.randint(-9, 9), rng.randint(-9, 9)
        if a == b:
            b += 1
        ref = f"({a}, {b})"
        right = [ref, f"({a},{b})", f"\\left({a}, {b}\\right)"]
        wrong = [f"({b}, {a})", f"({a}, {b + 1})"]
    elif kind == "set":
        a = rng.randint(-9, 3)
        b = a + rng.randint(1, 6)
        ref = f"{a}, {b}"
        right = [ref, f"{b}, {a}", f"\\{{{a}, {b}\\}}"]
        wrong = [f"{a}", f"{b}", f"{a}, {b}, {b + 1}"]  # partial and extra answers
    elif kind == "int":
        n = rng.randint(2, 5000)
        ref = str(n)
        right = [ref, f"{n}.0" if n < 1000 else f"{n:,}"]
        wrong = [str(n + 1), str(n * 10)]
    else:  # pi
        num, den = rng.randint(1, 7), rng.choice([2, 3, 4, 6])
        if math.gcd(num, den) != 1:
            num = 1
        ref = f"\\frac{{{num}\\pi}}{{{den}}}"
        right = [ref, f"\\frac{{{num}}}{{{den}}}\\pi", f"{num}\\pi/{den}"]
        wrong = [f"\\frac{{{den}\\pi}}{{{num}}}" if num != den else "\\pi^2", f"\\frac{{{num + 1}\\pi}}{{{den}}}"]
    return ref, right, wrong


def _math_text(rng: random.Random, answer: str) -> str:
    body = rng.choice(
        [
            "We start by simplifying the expression. Note that $a^2 - b^2 = (a-b)(a+b)$, so",
            "Let $x$ be the unknown. Substituting $x = 2$ into $f(x) = x^2 + 1$ gives $5$, hence",
            "By the AM-GM inequality, $\\frac{a+b}{2} \\ge \\sqrt{ab}$, with equality when $a = b$. Thus",
            "Solving $3x + 4 = 10$ gives $x = 2$. Combining this with the second condition, we obtain",
        ]
    )
    if rng.random() < 0.2:
        return f"{body} the result follows.\nFinal Answer: The final answer is ${answer}$. I hope it is correct."
    return f"{body} the answer is $\\boxed{{{answer}}}$."


def _math_problem(rng: random.Random) -> list[Row]:
    ref, right, wrong = _math_family(rng)
    p_correct = rng.random()
    # Samples share forms: a problem's 8 samples use a few of the available forms.
    right_used = rng.sample(right, k=min(len(right), rng.randint(1, 3)))
    wrong_used = rng.sample(wrong, k=min(len(wrong), rng.randint(1, 2)))
    rows = []
    for _ in range(SAMPLES_PER_PROBLEM):
        correct = rng.random() < p_correct
        answer = rng.choice(right_used if correct else wrong_used)
        rows.append(Row(_math_text(rng, answer), ref, correct, "math"))
    return rows


def build_rows(n_rows: int, seed: int) -> list[Row]:
    rng = random.Random(seed)
    rows: list[Row] = []
    while len(rows) < n_rows:
        rows.extend(_gsm_problem(rng) if rng.random() < 0.55 else _math_problem(rng))
    return rows


# --------------------------------------------------------------------------- runs


def run_ours(rows: list[Row], **kwargs) -> tuple[list[bool], float]:
    from stillhouse.tasks.verify.score import score_samples

    started = time.perf_counter()
    results = score_samples([(r.response, r.reference) for r in rows], **kwargs)
    return [r.correct for r in results], time.perf_counter() - started


def run_math_verify(rows: list[Row]) -> tuple[list[bool], float]:
    from math_verify import parse, verify

    started = time.perf_counter()
    out = []
    for r in rows:
        gold = parse("$" + r.reference + "$")
        pred = parse(r.response)
        out.append(bool(verify(gold, pred)))
    return out, time.perf_counter() - started


def _accuracy(decisions: list[bool], rows: list[Row], kind: str = "all") -> float:
    pairs = [(d, r) for d, r in zip(decisions, rows) if kind in ("all", r.kind)]
    return sum(d == r.label for d, r in pairs) / max(1, len(pairs))


def _fast_path_share(rows: list[Row]) -> str:
    """How much work the fast path and the per-call cache take off Math-Verify."""
    from stillhouse.tasks.verify.equivalence import quick_verdict, normalize_answer
    from stillhouse.tasks.verify.extract import extract_answer

    try:  # references are read the way score_samples reads them (issue 17)
        from stillhouse.tasks.verify.extract import extract_reference

        def reference_answer(ref: str) -> str | None:
            return extract_reference(ref).answer
    except ImportError:  # a verifier from before issue 17 compares references as written
        def reference_answer(ref: str) -> str | None:
            return ref

    slow = []
    for r in rows:
        ext = extract_answer(r.response)
        ref = reference_answer(r.reference)
        if ext.answer is None or ref is None:
            continue
        key = (normalize_answer(ext.answer), normalize_answer(ref))
        if quick_verdict(*key) is None:
            slow.append(key)
    return (f"fast path decides {len(rows) - len(slow)} rows; Math-Verify needed for {len(slow)} "
            f"rows = {len(set(slow))} distinct (answer, reference) pairs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline-rows", type=int, default=None,
                        help="time Math-Verify on the first N rows only (default: all)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # Math-Verify logs every timeout at WARNING

    rows = build_rows(args.rows, args.seed)
    n_gsm = sum(r.kind == "gsm" for r in rows)
    print(f"rows={len(rows)} gsm={n_gsm} math={len(rows) - n_gsm} "
          f"positives={sum(r.label for r in rows)} seed={args.seed} load_avg={os.getloadavg()[0]:.1f}")
    print(_fast_path_share(rows))

    ours, t_ours = run_ours(rows)
    ours_1p, t_ours_1p = run_ours(rows, workers=0)
    ours_nc, t_ours_nc = run_ours(rows, cache=False)
    assert ours_1p == ours and ours_nc == ours, "verdicts must not depend on workers or cache"
    print(f"ours: {t_ours:.2f}s all cores ({os.cpu_count()}) | {t_ours_1p:.2f}s in process | "
          f"{t_ours_nc:.2f}s all cores without the (answer, reference) cache")

    base_rows = rows[: args.baseline_rows] if args.baseline_rows else rows
    base, t_base = run_math_verify(base_rows)
    ours = ours[: len(base_rows)]
    agreement = sum(a == b for a, b in zip(ours, base)) / len(base_rows)
    print(f"math-verify baseline: {t_base:.2f}s on {len(base_rows)} rows (single process, default settings)")
    for kind in ("all", "gsm", "math"):
        print(f"accuracy vs labels [{kind}]: ours={_accuracy(ours, base_rows, kind):.4f} "
              f"mathverify={_accuracy(base, base_rows, kind):.4f}")
    disagreements = [(r, a, b) for r, a, b in zip(base_rows, ours, base) if a != b]
    for r, a, b in disagreements[:3]:
        print(f"  disagreement: reference={r.reference!r} label={r.label} ours={a} mathverify={b} "
              f"response ends {r.response[-60:]!r}")
    ours_per_s = len(rows) / t_ours
    mv_per_s = len(base_rows) / t_base
    print(f"verifier: ours_per_s={ours_per_s:.1f} mathverify_per_s={mv_per_s:.1f} "
          f"ratio={ours_per_s / mv_per_s:.2f} agreement={agreement:.4f}")


if __name__ == "__main__":
    main()
