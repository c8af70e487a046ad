"""tiny-tutor's training corpus: seeded arithmetic word problems, their one-line solutions, and the
harder/similar problem-writing conversations, rendered with the default prompts (see tiny_tutor.py
for why the corpus looks the way it does).
"""

from __future__ import annotations

import math
import random

from stillhouse.tasks.config import PromptsConfig

# --------------------------------------------------------------------------- problems

NAMES = (
    ("Ann", "she"), ("Ben", "he"), ("Cara", "she"), ("Dev", "he"), ("Eli", "he"), ("Fay", "she"),
    ("Gus", "he"), ("Hana", "she"), ("Ivan", "he"), ("June", "she"), ("Kai", "he"), ("Lena", "she"),
    ("Milo", "he"), ("Nina", "she"), ("Omar", "he"), ("Pia", "she"), ("Quinn", "he"), ("Rosa", "she"),
    ("Sam", "he"), ("Tara", "she"), ("Uma", "she"), ("Vic", "he"), ("Wes", "he"), ("Zoe", "she"),
    ("Ada", "she"), ("Raj", "he"), ("Lucy", "she"), ("Oscar", "he"), ("Ines", "she"), ("Hugo", "he"),
)
_PRONOUNS = {"he": ("he", "He", "him", "his"), "she": ("she", "She", "her", "her")}
THINGS = (
    "apples", "books", "coins", "pens", "eggs", "cards", "cookies", "marbles", "stamps", "shells",
    "stickers", "pencils", "cupcakes", "toys", "flowers", "rocks", "beads", "candies", "plums",
    "balloons", "buttons", "tickets", "oranges", "crayons", "shirts", "cups", "photos", "muffins",
)
# Places and containers ("5 pens in the box", "3 bags with 4 coins in each bag").
PLACES = ("box", "basket", "jar", "bag", "drawer", "bowl", "room", "garden", "shop", "van")

# Problems are built from sentence parts, so that the tutor learns "copy the numbers in the order
# they appear, pick the operation from the verbs" rather than a handful of fixed templates.
# Fields: {A} {B} names, {he} {He} {him} {his} A's pronouns, {t} things, {p} a place, {n} the number.
_START_PERSON = (
    "{A} has {n} {t}.", "{A} had {n} {t}.", "{A} owns {n} {t}.", "{A} collected {n} {t}.",
    "{A} starts the day with {n} {t}.", "{A} keeps {n} {t} in a {p}.", "{A} bought {n} {t}.",
    "{A} made {n} {t}.", "{A} found {n} {t}.", "At first {A} has {n} {t}.",
    "{A} is given {n} {t}.", "{A} saved {n} {t}.",
)
_START_PLACE = (
    "There are {n} {t} in the {p}.", "The {p} has {n} {t}.", "A {p} holds {n} {t}.",
    "There were {n} {t} in a {p}.", "{A} sees {n} {t} in the {p}.",
)
_ADD_PERSON = (
    "{He} buys {n} more {t}.", "{He} gets {n} more {t}.", "{He} finds {n} more {t}.",
    "Then {he} wins {n} more {t}.", "{B} gives {him} {n} more {t}.", "{He} picks {n} more {t}.",
    "{He} receives {n} {t} from {B}.", "{B} gives {A} {n} {t}.", "Later {he} makes {n} more {t}.",
    "{He} adds {n} {t} to {his} collection.", "{His} friend gives {him} {n} more {t}.",
    "The next day {he} gets {n} more.",
)
_ADD_PLACE = (
    "{A} puts {n} more {t} in the {p}.", "Then {n} more {t} are added.", "{n} more {t} arrive.",
    "{A} adds {n} {t} to the {p}.", "Later {n} more {t} are put in the {p}.",
    "Then {n} more {t} come in.", "{B} brings {n} more {t}.", "After that {n} more {t} join them.",
)
_SUB_PERSON = (
    "{He} eats {n} of the {t}.", "{He} gives {n} {t} to {B}.", "{He} loses {n} {t}.",
    "{He} sells {n} {t}.", "{He} uses {n} of them.", "{He} gives away {n} {t}.",
    "Then {he} drops {n} {t}.", "{He} lends {n} {t} to {B}.", "{B} takes {n} {t} from {him}.",
    "{He} breaks {n} of the {t}.", "{He} gives {n} of them to {his} friend.",
    "The next day {he} uses {n} {t}.",
)
_SUB_PLACE = (
    "{A} takes {n} {t} out of the {p}.", "{A} removes {n} {t}.", "Then {n} {t} are taken away.",
    "{n} of the {t} are sold.", "{A} takes away {n} {t}.", "Later {n} {t} are moved to another {p}.",
    "Then {n} {t} go away.", "{n} of them are lost.", "{B} takes {n} {t} home.",
)
_Q_PERSON = (
    "How many {t} does {A} have now?", "How many {t} does {he} have left?",
    "How many {t} does {A} have in the end?", "How many {t} does {A} still have?",
    "How many {t} does {he} have now?",
)
_Q_PLACE = (
    "How many {t} are in the {p} now?", "How many {t} are left in the {p}?",
    "How many {t} are there now?", "How many {t} are in the {p} in the end?",
)
# Whole one-step problems with two people or a product; numbers in order of appearance.
_PAIR = (
    ("+", "{A} has {a} {t} and {B} has {b} {t}. How many {t} do they have together?"),
    ("+", "{A} has {a} {t}. {B} has {b} {t}. How many {t} do they have in all?"),
    ("+", "{A} picked {a} {t} on Monday and {b} {t} on Tuesday. How many {t} did {he} pick in total?"),
    ("+", "{A} has {a} {t}. {B} has {b} more {t} than {A}. How many {t} does {B} have?"),
    ("-", "{A} has {a} {t}. {B} has {b} fewer {t} than {A}. How many {t} does {B} have?"),
    ("-", "{A} has {a} {t} and {B} has {b} {t}. How many more {t} does {A} have than {B}?"),
    ("*", "{A} has {a} bags with {b} {t} in each bag. How many {t} does {A} have?"),
    ("*", "{A} buys {a} packs of {t}. Each pack has {b} {t}. How many {t} does {he} buy?"),
    ("*", "{A} has {a} {t}. {B} has {b} times as many {t} as {A}. How many {t} does {B} have?"),
    ("*", "There are {a} rows of {t} with {b} {t} in each row. How many {t} are there?"),
    ("*", "There are {a} {p}s with {b} {t} in each {p}. How many {t} are there in all?"),
)
_GROUPS_START = (
    "{A} has {a} bags with {b} {t} in each bag.", "{A} buys {a} packs of {t} with {b} {t} in each pack.",
    "There are {a} {p}s with {b} {t} in each {p}.",
)

# Operands: 2..SMALL_TOP most of the time (the range of simple word problems and of the
# `arithmetic` source's default max_operand), up to BIG_TOP sometimes so larger numbers are not new.
SMALL_TOP, BIG_TOP, BIG_SHARE = 10, 30, 0.15
# Numbers with a token (and a structured embedding) of their own.
NUMBER_TOKENS = 200


def _operand(rng: random.Random, small: bool = False) -> int:
    return rng.randint(2, BIG_TOP if not small and rng.random() < BIG_SHARE else SMALL_TOP)


def _apply(op: str, a: int, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def _fields(rng: random.Random) -> dict[str, str]:
    (a_name, pronoun), (b_name, _) = rng.sample(NAMES, 2)
    he, He, him, his = _PRONOUNS[pronoun]
    return {"A": a_name, "B": b_name, "he": he, "He": He, "him": him, "his": his, "His": his.title(),
            "t": rng.choice(THINGS), "p": rng.choice(PLACES)}


def _chain(rng: random.Random, steps: int) -> tuple[str, list[tuple[str, int, int, int]]]:
    """A start sentence, `steps` add/sub sentences (or a product first), a question.

    Returns (question, [(op, left, right, result), ...]) in the order they are computed.
    """
    f = _fields(rng)
    person = rng.random() < 0.6
    work: list[tuple[str, int, int, int]] = []
    if steps > 1 and rng.random() < 0.3:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        sentences = [rng.choice(_GROUPS_START).format(a=a, b=b, **f)]
        value = a * b
        work.append(("*", a, b, value))
        person = not sentences[0].startswith("There")
        steps -= 1
    else:
        value = rng.randint(3, BIG_TOP if rng.random() < BIG_SHARE else SMALL_TOP)
        sentences = [rng.choice(_START_PERSON if person else _START_PLACE).format(n=value, **f)]
    for _ in range(steps):
        op = "-" if value > 2 and rng.random() < 0.45 else "+"
        n = rng.randint(2, value - 1) if op == "-" else _operand(rng, small=len(work) > 0)
        pool = (_ADD_PERSON if op == "+" else _SUB_PERSON) if person else (_ADD_PLACE if op == "+" else _SUB_PLACE)
        sentences.append(rng.choice(pool).format(n=n, **f))
        work.append((op, value, n, _apply(op, value, n)))
        value = work[-1][3]
    sentences.append(rng.choice(_Q_PERSON if person else _Q_PLACE).format(**f))
    text = " ".join(sentences)
    return text[0].upper() + text[1:], work


def _rationale(work: list[tuple[str, int, int, int]]) -> str:
    return " ".join(f"{left} {op} {right} = {res}." for op, left, right, res in work)


def one_step_problem(rng: random.Random) -> tuple[str, str, int]:
    """(question, rationale, answer) for a random one-step problem."""
    if rng.random() < 0.35:
        op, template = rng.choice(_PAIR)
        if op == "*":
            a, b = rng.randint(2, 9), rng.randint(2, 9)
        else:
            a, b = _operand(rng), _operand(rng)
            if op == "-":
                a, b = max(a, b) + 1, min(a, b)
        work = [(op, a, b, _apply(op, a, b))]
        question = template.format(a=a, b=b, **_fields(rng))
    else:
        question, work = _chain(rng, 1)
    return question, _rationale(work), work[-1][3]


def two_step_problem(rng: random.Random) -> tuple[str, str, int]:
    """(question, rationale, answer) for a random two-step problem (small numbers)."""
    question, work = _chain(rng, 2)
    return question, _rationale(work), work[-1][3]


# Sentences for longer, GSM8K-like parents in the write-a-problem prompts: the tutor must cope with
# long stories in the prompt, yet still answer with one of its own short problems.
_STORY = (
    "{A} is saving money for a new bike that costs ${a}.",
    "Every week {A} earns ${b} by walking dogs for {B}.",
    "{A} works at a bakery and sells {a} {t} each morning.",
    "On Saturday, {B} sold {b} boxes of {t} and {c} fewer boxes on Sunday.",
    "Each of the {a} students in the class brings {b} {t} to school.",
    "A farmer has {a} rows of trees with {b} trees in each row.",
    "It takes {A} {b} minutes to walk {c} miles.",
    "Half of the {t} are red and one third of the rest are blue.",
    "{B} spends {c}% of the money on food and saves the rest.",
    "The store sells {t} for ${b} each, or {c} for ${a}.",
    "A train travels {a} miles in {b} hours.",
    "{A} reads {b} pages of a {a}-page book every day.",
)
_STORY_QUESTIONS = (
    "How many weeks will it take {A} to buy the bike?",
    "How much money does {A} earn in {c} weeks?",
    "How many {t} are left at the end of the day?",
    "How many trees does the farmer have in all?",
    "How long will it take {A} to finish the book?",
    "What is the total cost of all the {t}?",
)
# Other ways of asking for a solution, so the default template is not the only one it knows (the
# reply is the boxed one-liner whatever the prompt asks: the verifier reads it either way). These
# strings shape the corpus: three seeds each measured better with them than with a variant.
_ALT_SOLVE = (
    "Solve the following math problem step by step.\n\n{question}",
    "{question}",
    "Question: {question}\nGive the final answer after ####.",
)


def _story_problem(rng: random.Random) -> str:
    nums = {"a": rng.randint(20, 400), "b": rng.randint(2, 30), "c": rng.randint(2, 12)}
    sentences = rng.sample(_STORY, rng.randint(2, 5)) + [rng.choice(_STORY_QUESTIONS)]
    return " ".join(sentences).format(**nums, **_fields(rng))


# --------------------------------------------------------------------------- the corpus


def _solution(rationale: str, answer: int) -> str:
    """'8 + 6 = \\boxed{14}.' / '9 * 7 = 63. 63 - 5 = \\boxed{58}.': the result is written once, in
    the box, so no step copies a number it just wrote (a copy a tiny model gets wrong often)."""
    return f"{rationale[: rationale.rfind('=')]}= \\boxed{{{answer}}}."


# (chat messages, assistant reply, problem text inside the prompt that is language-modelled too)
Pair = tuple[tuple[dict[str, str], ...], str, str | None]


def tutor_conversations(seed: int, n_solve: int = 5000, n_write: int = 800, n_drill: int = 3000,
                        prompts: PromptsConfig | None = None) -> list[Pair]:
    """The seeded training corpus: (messages, assistant reply) pairs.

    - n_solve word problems (one step, 20% two steps) with the default solve template (85%) or
      another phrasing -> '<a> <op> <b> = \\boxed{<answer>}.';
    - n_write harder / similar prompts whose parent is one of our problems or a longer story ->
      'Problem: <a new two-step (harder) or one-step (similar) problem>', checked to pass
      stillhouse.tasks.synthesis.parse.parse_generated_problem against its parent;
    - n_drill bare facts ('What is 8 + 6?'): a few tokens each, they drill the arithmetic in the
      very context the rationale uses it ('8 + 6 = \\boxed{').
    """
    from stillhouse.tasks.config import SynthesisConfig
    from stillhouse.tasks.prompts import harder_messages, similar_messages, solve_messages
    from stillhouse.tasks.synthesis.parse import parse_generated_problem

    prompts = prompts or PromptsConfig()
    alt = [prompts.model_copy(update={"solve": s}) for s in _ALT_SOLVE]
    synth = SynthesisConfig()
    rng = random.Random(seed)
    out: list[Pair] = []
    for _ in range(n_solve):
        q, rationale, ans = two_step_problem(rng) if rng.random() < 0.2 else one_step_problem(rng)
        cfg = prompts if rng.random() < 0.85 else rng.choice(alt)
        out.append((solve_messages(q, cfg), _solution(rationale, ans), q))
    while len(out) < n_solve + n_write:
        harder = rng.random() < 0.5
        r = rng.random()
        parent = _story_problem(rng) if r < 0.3 else (two_step_problem(rng) if r < 0.45 else one_step_problem(rng))[0]
        child = (two_step_problem(rng) if harder else one_step_problem(rng))[0]
        if parse_generated_problem(child, parent, synth)[0] is None:
            continue  # never teach a reply that synthesis would reject
        messages = harder_messages(parent, prompts) if harder else similar_messages(parent, prompts)
        out.append((messages, f"Problem: {child}", None))
    for _ in range(n_drill):
        op = rng.choice("++--*")
        a, b = (rng.randint(2, 9), rng.randint(2, 9)) if op == "*" else (_operand(rng), _operand(rng))
        if op == "-":
            a, b = max(a, b) + 1, min(a, b)
        ans = _apply(op, a, b)
        q = rng.choice(("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "{a} {op} {b} = ?")).format(a=a, op=op, b=b)
        out.append((({"role": "user", "content": q},), _solution(f"{a} {op} {b} = {ans}.", ans), None))
    return out
