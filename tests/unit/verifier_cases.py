"""The verifier's behaviour table, and item functions for the worker-pool tests.

Each case is what a careful human grader would say about (response, reference). The styles come
from real model outputs: GSM8K chain-of-thought endings ("#### 72", "The answer is $1,234."),
MATH solutions with \\boxed LaTeX, Minerva's "Final Answer: ... I hope it is correct.", markdown
bold, and the ways such outputs go wrong (truncated boxes, several boxes, code, huge numbers).

Policy choices a grader could make differently are listed at the end of this docstring and are
tested separately in test_verifier.py, not hidden in the table:
- a percent sign is a unit: "5%" matches 5, and 50% does not match 0.5 (no rescaling);
- decimals match a fraction when they agree to 6 decimal places (0.333333 ~ 1/3, not 0.333);
- "4 2/3" and "4\\frac{2}{3}" are mixed numbers (14/3).

This module is also imported by worker processes in the pool tests (hence the top-level item
functions below): keep it free of pytest imports and side effects.
"""

from __future__ import annotations

import os
import signal
import time
from typing import NamedTuple


class _Any:
    def __repr__(self) -> str:
        return "ANY"


ANY = _Any()  # "do not check the extracted answer"


class Case(NamedTuple):
    id: str
    response: str
    reference: str
    correct: bool
    extracted: object = ANY


GSM_COT = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n"
)

CASES: list[Case] = [
    # ---------------------------------------------------------------- GSM8K "#### N"
    Case("gsm-hash", GSM_COT + "#### 72", "72", True, "72"),
    Case("gsm-hash-wrong", GSM_COT + "#### 71", "72", False, "71"),
    Case("gsm-hash-thousands", "Total = 1,234 dollars.\n#### 1,234", "1234", True, "1,234"),
    Case("gsm-hash-ref-thousands", "#### 1234", "1,234", True),
    Case("gsm-hash-millions", "#### 1,000,000", "1000000", True),
    Case("gsm-hash-dollar", "He pays $18.\n#### $18", "18", True),
    Case("gsm-hash-escaped-dollar", "#### \\$18", "18", True),
    Case("gsm-hash-trailing-zeros", "#### 18.00", "18", True),
    Case("gsm-hash-ref-decimal", "#### 12", "12.0", True),
    Case("gsm-hash-half-wrong", "#### 18.5", "18", False),
    Case("gsm-hash-negative", "#### -5", "-5", True),
    Case("gsm-hash-sign-wrong", "#### 5", "-5", False),
    Case("gsm-hash-unicode-minus", "#### \u22127", "-7", True),
    Case("gsm-hash-decimal", "#### 3.14", "3.14", True),
    Case("gsm-hash-decimal-wrong", "#### 3.1", "3.14", False),
    Case("gsm-hash-decimal-thousands", "#### 1,234.56", "1234.56", True),
    Case("gsm-hash-dollar-decimal", "#### $1,234.56", "1234.56", True),
    Case("gsm-hash-fraction", "#### 1/2", "0.5", True),
    Case("gsm-hash-fraction-34", "#### 3/4", "0.75", True),
    Case("gsm-hash-decimal-vs-fraction", "#### 0.5", "1/2", True),
    Case("gsm-hash-mixed-number", "#### 4 2/3", "14/3", True),
    Case("gsm-hash-percent", "#### 50%", "50", True),
    Case("gsm-hash-percent-word", "#### 10 percent", "10", True),
    Case("gsm-hash-unit-word", "#### 72 clips", "72", True),
    Case("gsm-hash-unit-dollars", "#### 12 dollars", "12", True),
    Case("gsm-hash-period", "#### 72.", "72", True),
    Case("gsm-hash-last-wins", "#### 5\nWait, I made an error.\n#### 7", "7", True, "7"),
    Case("gsm-hash-last-wins-wrong", "#### 7\nWait, I made an error.\n#### 5", "7", False, "5"),
    Case("gsm-hash-no-space", "The total is 10 + 5 = 15.\n####15", "15", True),
    Case("gsm-hash-not-500", "#### 5", "500", False),
    Case("gsm-hash-not-5", "#### 500", "5", False),
    Case("gsm-hash-not-0.05", "#### 0.05", "5", False),
    Case("gsm-hash-not-0.5", "#### 0.5", "50", False),
    Case("gsm-hash-zero", "#### 0", "0", True),
    Case("gsm-hash-zero-wrong", "#### 0", "10", False),
    Case("gsm-ref-number-spaces", "#### 72", " 72 ", True),
    # ---------------------------------------------------------------- "The answer is"
    Case("is-dollar-thousands", "So she pays $1,234 in total.\nThe answer is $1,234.", "1234", True),
    Case("is-plain", "The answer is 42.", "42", True, "42"),
    Case("is-colon", "The answer is: 42", "42", True, "42"),
    Case("is-wrong", "The answer is 41.", "42", False, "41"),
    Case("is-decimal-period", "Therefore, the answer is 3.5.", "3.5", True, "3.5"),
    Case("is-unit", "The answer is 42 apples.", "42", True, "42 apples"),
    Case("is-which-clause", "The answer is 5, which is the number of cats.", "5", True, "5"),
    Case("is-latex-frac", "The answer is $\\frac{1}{2}$.", "0.5", True, "\\frac{1}{2}"),
    Case("is-latex-then-words", "The answer is: $\\frac{3}{4}$, as computed.", "0.75", True),
    Case("is-answer-colon", "Answer: 12", "12", True, "12"),
    Case("is-bold-answer-colon", "**Answer:** 12", "12", True, "12"),
    Case("is-bold-final-answer", "Adding up gives 12.\n\n**Final Answer:** 12", "12", True, "12"),
    Case("is-last-wins", "I think the answer is 7. Let me check... no, the answer is 8.", "8", True, "8"),
    Case("is-list", "The answer is 1, 2, and 3.", "1, 2, 3", True),
    Case("is-chain", "The answer is 10 - 3 = 7.", "7", True),
    Case("is-unicode-minus", "The answer is \u22123.", "-3", True),
    Case("is-millions", "The answer is 1,234,567.", "1234567", True),
    Case("is-not-500", "The answer is 5.", "500", False),
    # ---------------------------------------------------------------- Minerva
    Case("minerva-int", "Final Answer: The final answer is $5$. I hope it is correct.", "5", True, "5"),
    Case("minerva-wrong", "Final Answer: The final answer is $4$. I hope it is correct.", "5", False, "4"),
    Case("minerva-frac", "Final Answer: The final answer is $\\frac{3}{4}$. I hope it is correct.", "0.75", True),
    Case("minerva-tuple", "Final Answer: The final answer is $(1,2)$. I hope it is correct.", "(1,2)", True),
    Case("minerva-decimal", "Final Answer: The final answer is $3.5$. I hope it is correct.", "3.5", True, "3.5"),
    Case("minerva-no-dollars", "Final Answer: The final answer is 3.5. I hope it is correct.", "3.5", True, "3.5"),
    Case("minerva-expr", "Final Answer: The final answer is $x^2+2x+1$. I hope it is correct.", "(x+1)^2", True),
    Case("minerva-no-hope", "So the final answer is $\\sqrt{2}$.", "\\sqrt2", True),
    Case("minerva-partial", "Final Answer: The final answer is $1$. I hope it is correct.", "1, 2", False),
    # ---------------------------------------------------------------- MATH boxed: numbers and fractions
    Case("box-frac-vs-decimal", "Thus $\\boxed{\\frac{1}{2}}$.", "0.5", True, "\\frac{1}{2}"),
    Case("box-frac-same", "$\\boxed{\\frac{1}{2}}$", "\\frac{1}{2}", True),
    Case("box-decimal-vs-frac", "$\\boxed{0.5}$", "\\frac12", True),
    Case("box-frac-short", "$\\boxed{\\frac12}$", "\\frac{1}{2}", True),
    Case("box-dfrac", "$\\boxed{\\dfrac{3}{4}}$", "\\frac{3}{4}", True),
    Case("box-tfrac", "$\\boxed{\\tfrac{3}{4}}$", "0.75", True),
    Case("box-frac-inverted", "$\\boxed{\\frac{4}{3}}$", "\\frac{3}{4}", False),
    Case("box-frac-unreduced", "$\\boxed{\\frac{2}{4}}$", "\\frac{1}{2}", True),
    Case("box-neg-frac", "$\\boxed{-\\frac{1}{2}}$", "-0.5", True),
    Case("box-frac-neg-num", "$\\boxed{\\frac{-1}{2}}$", "-\\frac12", True),
    Case("box-leading-dot", "$\\boxed{.5}$", "\\frac{1}{2}", True),
    Case("box-tenth", "$\\boxed{0.1}$", "\\frac{1}{10}", True),
    Case("box-six-places", "$\\boxed{0.333333}$", "\\frac13", True),
    Case("box-three-places", "$\\boxed{0.333}$", "\\frac13", False),
    Case("box-mixed-latex", "$\\boxed{4\\frac{2}{3}}$", "\\frac{14}{3}", True),
    Case("box-latex-thousands", "$\\boxed{1{,}000}$", "1000", True),
    Case("box-escaped-dollar", "$\\boxed{\\$18.90}$", "18.90", True),
    Case("box-power-of-ten", "$\\boxed{10^{10}}$", "10000000000", True),
    Case("box-power", "$\\boxed{2^{10}}$", "1024", True),
    Case("box-sci", "$\\boxed{1.5\\times10^{3}}$", "1500", True),
    Case("box-int", "$\\boxed{6}$", "6", True),
    Case("box-int-wrong", "$\\boxed{7}$", "6", False),
    Case("box-text-number", "$\\boxed{2}$", "\\text{2}", True),
    # ---------------------------------------------------------------- roots, constants
    Case("box-sqrt-frac", "$\\boxed{\\frac{\\sqrt{2}}{2}}$", "\\sqrt{2}/2", True),
    Case("box-sqrt-short", "$\\boxed{\\frac{\\sqrt2}{2}}$", "\\sqrt{2}/2", True),
    Case("box-rationalised", "$\\boxed{\\frac{1}{\\sqrt{2}}}$", "\\frac{\\sqrt2}{2}", True),
    Case("box-sqrt-wrong", "$\\boxed{\\sqrt{2}}$", "\\frac{\\sqrt2}{2}", False),
    Case("box-sqrt-simplified", "$\\boxed{2\\sqrt{3}}$", "\\sqrt{12}", True),
    Case("box-sqrt-simplified-wrong", "$\\boxed{3\\sqrt{2}}$", "\\sqrt{12}", False),
    Case("box-sqrt-50", "$\\boxed{5\\sqrt{2}}$", "\\sqrt{50}", True),
    Case("box-cube-root", "$\\boxed{\\sqrt[3]{2}}$", "2^{1/3}", True),
    Case("box-pi", "$\\boxed{\\pi}$", "\\pi", True),
    Case("box-pi-approx", "$\\boxed{3.14}$", "\\pi", False),
    Case("box-2pi", "$\\boxed{2\\pi}$", "2\\pi", True),
    Case("box-pi-half", "$\\boxed{\\frac{\\pi}{2}}$", "\\pi/2", True),
    Case("box-e-squared", "$\\boxed{e^{2}}$", "e^2", True),
    Case("box-infinity", "$\\boxed{\\infty}$", "\\infty", True),
    Case("box-complex", "$\\boxed{3+2i}$", "3+2i", True),
    Case("box-complex-conj", "$\\boxed{3-2i}$", "3+2i", False),
    Case("box-tiny-factorial", "$\\boxed{\\frac{1}{2004!}}$", "\\frac{1}{2004!}", True),
    Case("box-tiny-factorial-slash", "$\\boxed{1/2004!}$", "\\frac{1}{2004!}", True),
    Case("box-tiny-factorial-wrong", "$\\boxed{\\frac{1}{2004!}}$", "\\frac{1}{2006!}", False),
    Case("box-tiny-factorial-wrong-2", "$\\boxed{\\frac{2}{4008!}}$", "\\frac{1}{2004!}", False),
    # ---------------------------------------------------------------- intervals, tuples, sets
    Case("box-interval", "$\\boxed{[1, 5)}$", "[1,5)", True),
    Case("box-interval-open-wrong", "$\\boxed{(1,5)}$", "[1,5)", False),
    Case("box-interval-inf", "$\\boxed{(-\\infty, 3]}$", "(-\\infty,3]", True),
    Case("box-interval-inf-wrong", "$\\boxed{(-\\infty, 3)}$", "(-\\infty,3]", False),
    Case("box-inequality-as-interval", "$\\boxed{2 < x < 5}$", "(2,5)", True),
    Case("box-ray-as-interval", "$\\boxed{x > 3}$", "(3, \\infty)", True),
    Case("box-ray-wrong-endpoint", "$\\boxed{x \\geq 3}$", "(3, \\infty)", False),
    Case("box-in-interval", "$\\boxed{x \\in [2, 5]}$", "[2,5]", True),
    Case("box-point", "$\\boxed{(2, 3)}$", "(2,3)", True),
    Case("box-point-swapped", "$\\boxed{(3, 2)}$", "(2,3)", False),
    Case("box-triple", "$\\boxed{(1, -2, 3)}$", "(1,-2,3)", True),
    Case("box-set", "$\\boxed{\\{1, 2\\}}$", "\\{1,2\\}", True),
    Case("box-set-order", "$\\boxed{\\{2, 1\\}}$", "\\{1,2\\}", True),
    Case("box-list", "$\\boxed{1, 2}$", "1, 2", True),
    Case("box-list-order", "$\\boxed{2, 1}$", "1,2", True),
    Case("box-list-vs-set", "$\\boxed{1, 2}$", "\\{1,2\\}", True),
    Case("box-find-all-partial", "$\\boxed{1}$", "1, 2", False),
    Case("box-find-all-partial-set", "$\\boxed{1}$", "\\{1,2\\}", False),
    Case("box-find-all-partial-braces", "$\\boxed{1}$", "{1,2}", False),
    Case("box-find-all-extra", "$\\boxed{1, 2, 3}$", "1, 2", False),
    Case("box-plus-minus", "$\\boxed{\\pm 1}$", "-1, 1", True),
    Case("box-plus-minus-set", "$\\boxed{\\{-1, 1\\}}$", "\\pm 1", True),
    Case("box-plus-minus-partial", "$\\boxed{1}$", "\\pm 1", False),
    Case("box-or-solutions", "$\\boxed{x=1 \\text{ or } x=2}$", "1, 2", True),
    Case("box-assignments-tuple", "$\\boxed{a=1, b=2}$", "(1,2)", True),
    Case("box-matrix", "$\\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}$",
         "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", True),
    Case("box-matrix-wrong", "$\\boxed{\\begin{pmatrix} 2 \\\\ 1 \\end{pmatrix}}$",
         "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", False),
    # ---------------------------------------------------------------- expressions, equations
    Case("box-expand", "$\\boxed{x^2+2x+1}$", "(x+1)^2", True),
    Case("box-expand-wrong", "$\\boxed{x^2+2x-1}$", "(x+1)^2", False),
    Case("box-factor", "$\\boxed{x^2-1}$", "(x-1)(x+1)", True),
    Case("box-commute", "$\\boxed{2x+1}$", "1+2x", True),
    Case("box-half-x", "$\\boxed{\\frac{1}{2}x}$", "\\frac{x}{2}", True),
    Case("box-symbolic-frac", "$\\boxed{\\frac{a+b}{2}}$", "\\frac{b+a}{2}", True),
    Case("box-wrong-variable", "$\\boxed{x}$", "y", False),
    Case("box-lambda", "$\\boxed{2\\lambda}$", "\\lambda \\cdot 2", True),
    Case("box-list-not-thousands", "$\\boxed{1, 234}$", "1,234", False),
    Case("box-assignment-vs-value", "$\\boxed{x=5}$", "5", True),
    Case("box-value-vs-assignment", "$\\boxed{5}$", "x=5", True),
    Case("box-line", "$\\boxed{y = 3 + 2x}$", "y=2x+3", True),
    Case("box-line-wrong", "$\\boxed{x = 3 + 2y}$", "y=2x+3", False),
    # ---------------------------------------------------------------- units, degrees, text
    Case("box-degrees", "$\\boxed{90^\\circ}$", "90", True),
    Case("box-degrees-ref", "$\\boxed{90}$", "90^\\circ", True),
    Case("box-degrees-wrong", "$\\boxed{45^\\circ}$", "90", False),
    Case("box-text-unit", "$\\boxed{10\\text{ cm}}$", "10", True),
    Case("box-text-unit-wrong", "$\\boxed{12\\text{ cm}}$", "10", False),
    Case("box-text-name", "$\\boxed{\\text{Evelyn}}$", "\\text{Evelyn}", True),
    Case("box-text-name-plain-ref", "$\\boxed{\\text{Evelyn}}$", "Evelyn", True),
    Case("box-text-name-wrong", "$\\boxed{\\text{Ada}}$", "\\text{Evelyn}", False),
    Case("box-choice", "$\\boxed{\\text{(C)}}$", "\\text{(C)}", True),
    Case("box-choice-wrong", "$\\boxed{\\text{(B)}}$", "\\text{(C)}", False),
    Case("box-day", "$\\boxed{\\text{Monday}}$", "\\text{Monday}", True),
    Case("box-day-wrong", "$\\boxed{\\text{Tuesday}}$", "\\text{Monday}", False),
    Case("box-parity-wrong", "$\\boxed{\\text{odd}}$", "\\text{even}", False),
    Case("box-no-solution", "$\\boxed{\\text{no solution}}$", "\\text{no solution}", True),
    Case("box-ref-boxed", "$\\boxed{5}$", "\\boxed{5}", True),
    Case("box-ref-dollars", "$\\boxed{5}$", "$5$", True),
    Case("box-percent-latex", "$\\boxed{50\\%}$", "50", True),
    # ---------------------------------------------------------------- unicode minus
    Case("box-unicode-minus-frac", "$\\boxed{\u2212\\frac{1}{2}}$", "-0.5", True),
    Case("box-unicode-minus-ref", "$\\boxed{5}$", "\u22125", False),
    Case("box-unicode-minus-both", "$\\boxed{\u22125}$", "\u22125", True),
    # ---------------------------------------------------------------- several boxes
    Case("multi-box-last-wins", "First \\boxed{3}. On reflection: \\boxed{5}", "5", True, "5"),
    Case("multi-box-last-wins-wrong", "First \\boxed{3}. On reflection: \\boxed{5}", "3", False, "5"),
    Case("multi-box-joined-and", "The roots are $\\boxed{1}$ and $\\boxed{2}$.", "1, 2", True, "1, 2"),
    Case("multi-box-joined-assign", "So $x = \\boxed{1}$ and $x = \\boxed{2}$.", "1, 2", True, "1, 2"),
    Case("multi-box-joined-comma", "$\\boxed{1}, \\boxed{2}$", "\\{1,2\\}", True),
    Case("multi-box-restated", "\\boxed{2}\n\nHmm, wait. Recomputing:\n\\boxed{3}", "3", True, "3"),
    Case("multi-box-beats-phrase", "The answer is 4. Actually \\boxed{6}.", "6", True, "6"),
    Case("fbox", "$\\fbox{7}$", "7", True, "7"),
    Case("boxed-space-form", "so the result is \\boxed 5", "5", True, "5"),
    # ---------------------------------------------------------------- malformed LaTeX
    Case("malformed-unclosed-fallback", "Answer \\boxed{5", "5", True, "5"),
    Case("malformed-unclosed-earlier-box", "First \\boxed{3}. Then \\boxed{5", "5", False, "3"),
    Case("malformed-extra-close", "$\\boxed{\\frac{1}{2}}}$", "\\frac12", True, "\\frac{1}{2}"),
    # Issue 16: "the answer is" followed by a box that never closes is no answer (the reply was cut
    # off or garbled); Math-Verify would close the box itself. A bare "\boxed{5" still falls back
    # to the last number, without the format bonus (malformed-unclosed-fallback above).
    Case("malformed-unclosed-after-phrase", "The answer is \\boxed{\\frac{1}{2}", "\\frac12", False, None),
    Case("malformed-unclosed-after-phrase-number", "The answer is \\boxed{42", "42", False, None),
    Case("malformed-unclosed-after-hash", "#### \\boxed{42", "42", False, None),
    Case("malformed-empty-box", "\\boxed{}", "5", False, None),
    Case("malformed-double-brace", "\\boxed{{5}", "5", True),
    Case("malformed-garbage-latex", "$\\boxed{\\frac{1}{}}$", "\\frac12", False),
    Case("malformed-unbalanced-right", "$\\boxed{x^2+}$", "x^2", False),
    # ---------------------------------------------------------------- bold
    Case("bold-number", "Total: 5 + 13 = 18.\nShe has **18** apples.", "18", True, "18"),
    Case("bold-number-wrong", "She has **19** apples.", "18", False, "19"),
    Case("bold-headings-ignored", "**Step 1:** 3 apples.\n**Step 2:** 4 more, so 7 total.", "7", True, "7"),
    Case("bold-latex", "Hence the area is **$\\frac{9}{2}$**.", "4.5", True),
    # ---------------------------------------------------------------- last-number fallback
    Case("fallback-last-number", "So in total she has 18 apples", "18", True, "18"),
    Case("fallback-equation", "5 + 3 = 8", "8", True, "8"),
    Case("fallback-decimal", "It costs 3.50 dollars", "3.5", True, "3.50"),
    Case("fallback-unicode-minus", "x = \u22124", "-4", True),
    Case("fallback-cookies", "2 + 2 = 4. Then 4 * 3 = 12 cookies", "12", True, "12"),
    Case("fallback-fraction", "The result is 3/4", "0.75", True, "3/4"),
    Case("fallback-wrong", "So she has 17 apples", "18", False, "17"),
    Case("fallback-thousands", "In all, 1,234,567 items", "1234567", True),
    # ---------------------------------------------------------------- nothing to grade
    Case("empty", "", "5", False, None),
    Case("whitespace", "   \n\t ", "5", False, None),
    Case("no-number", "I don't know.", "5", False, None),
    Case("empty-reference", "\\boxed{5}", "", False),
    # ---------------------------------------------------------------- injection (never executed)
    Case("inject-import", "__import__('os').system('touch /tmp/stillhouse_pwned_a')", "0", False),
    Case("inject-boxed-import", "\\boxed{__import__('os').system('touch /tmp/stillhouse_pwned_b')}", "0", False),
    Case("inject-eval", "The answer is eval('2+3')", "5", False),
    Case("inject-exec-env", "\\boxed{exec(\"import os; os.environ['STILLHOUSE_PWNED']='1'\")}", "1", False),
    Case("inject-globals", "The answer is globals().update(PWNED=1)", "1", False),
    Case("inject-lambda", "\\boxed{(lambda: __import__('os').system('touch /tmp/x'))()}", "0", False),
    Case("inject-subprocess", "#### __import__('subprocess').call(['touch','/tmp/x'])", "0", False),
    Case("inject-latex-input", "\\boxed{\\input{/etc/passwd}}", "0", False),
    # Issue 16: Math-Verify reads the 1 of these as the whole answer; full-width letters are
    # screened after NFKC normalisation.
    Case("inject-call-colon", "The answer is $(foo: 1)()$", "1", False),
    Case("inject-call-colon-boxed", "\\boxed{(foo: 1)()}", "1", False),
    Case("inject-call-colon-bare", "(foo: 1)()", "1", False, None),
    Case("inject-call-colon-bare-fullwidth", "(\uff4c\uff41\uff4d\uff42\uff44\uff41: 1)()", "1", False, None),
    Case("inject-fullwidth-lambda", "The answer is $(\uff4c\uff41\uff4d\uff42\uff44\uff41: 1)()$", "1", False),
    # ---------------------------------------------------------------- huge and pathological
    Case("huge-power-tower", "\\boxed{10^{10^{10}}}", "5", False),
    Case("huge-power-tower-bare", "#### 10^10^10", "5", False),
    Case("huge-python-tower", "#### 9**9**9**9", "5", False),
    Case("huge-latex-tower", "$\\boxed{9^{9^{9^{9}}}}$", "5", False),
    Case("huge-factorial", "$\\boxed{(10^{10})!}$", "5", False),
    # Issue 16: each of these cost the full time limit before the pre-screen knew them.
    Case("huge-paren-tower", "The answer is $(10)^{(10)^{(10)}}$", "5", False),
    Case("huge-factorial-of-power", "The answer is $10^{9}!$", "5", False),
    Case("huge-binomial", "The answer is $\\binom{10^9}{10^5}$", "5", False),
    Case("huge-gamma", "The answer is $\\Gamma(10^8)$", "5", False),
    Case("small-binomial", "The answer is $\\binom{10}{3}$", "120", True),
    Case("small-factorial-of-power", "The answer is $10^{1}!$", "3628800", True),
    Case("huge-digits-boxed", "\\boxed{" + "9" * 100_000 + "}", "5", False, None),
    Case("huge-digits-hash", "#### " + "9" * 100_000, "5", False, None),
    Case("huge-digits-bare", "1" * 100_000, "5", False, None),
    Case("huge-nested-braces", "\\boxed{" + "{" * 30 + "1" + "}" * 30 + "}", "1", False),
    Case("huge-nested-braces-long", "\\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}", "1", False, None),
    Case("huge-response-answer-at-end", "blah " * 200_000 + "\n#### 5", "5", True, "5"),
    Case("huge-repeated-boxes", "\\boxed{\\boxed{" * 50_000, "5", False),
]

# Cases whose result must carry an error message (refused, too long, timed out, bad reference).
ERROR_CASES = {
    "empty-reference",
    "inject-eval",
    "inject-globals",
    "inject-boxed-import",
    "inject-exec-env",
    "inject-lambda",
    "inject-subprocess",
    "huge-power-tower",
    "huge-power-tower-bare",
    "huge-python-tower",
    "huge-latex-tower",
    "huge-factorial",
    "huge-paren-tower",
    "huge-factorial-of-power",
    "huge-binomial",
    "huge-gamma",
    "inject-call-colon",
    "inject-call-colon-boxed",
    "inject-call-colon-bare",
    "inject-call-colon-bare-fullwidth",
    "inject-fullwidth-lambda",
    "malformed-unclosed-after-phrase",
    "malformed-unclosed-after-phrase-number",
    "malformed-unclosed-after-hash",
    "huge-digits-boxed",
    "huge-digits-hash",
    "huge-digits-bare",
    "huge-nested-braces",
    "huge-nested-braces-long",
}


# ---------------------------------------------------------------- item functions for pool tests
# Top-level so worker processes can unpickle them by reference.


def echo_item(pred: str, ref: str, timeout_s: float) -> tuple[bool, str | None]:
    """Equal strings are correct. "HANG" blocks SIGALRM and sleeps (a hang no signal interrupts);
    "DIE" kills the worker process; "RAISE" raises."""
    if pred == "HANG":
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(600)
    if pred == "DIE":
        os._exit(3)
    if pred == "RAISE":
        raise ValueError("boom")
    return pred == ref, None
