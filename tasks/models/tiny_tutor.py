"""`tiny-tutor`: a tiny Llama, briefly trained, so that smoke runs see real signal.

The random `tiny-llama` writes garbage: teacher accuracy is 0, every weight group is degenerate and
synthesis keeps nothing. `tiny-tutor` is the same kind of model (2-layer Llama, head_dim 64, ChatML
template, eos <|im_end|>; hidden size 64, ~0.2M parameters) trained from scratch on CPU for about
40 s on a seeded synthetic corpus rendered with the DEFAULT prompts of PromptsConfig:

- solve prompt + a simple word problem (one step +, -, x with operands mostly 2..10; 20% two
  steps) -> a one-line rationale ending in the boxed answer: "8 + 6 = \\boxed{14}." or
  "3 * 4 = 12. 12 - 5 = \\boxed{7}.";
- harder / similar prompt + a parent problem (one of ours, or a longer GSM8K-like story)
  -> "Problem: <a new two-step (harder) or one-step (similar) word problem>?" with new names and
  numbers: stillhouse.tasks.synthesis.parse.parse_generated_problem accepts it and it is no copy of the parent;
- bare facts ("What is 8 + 6?") that drill the arithmetic.

What it learns is deliberately a smoke-scale skill: it copies the numbers and usually picks the
operation, and gets the arithmetic right about half the time, so at T=0.7 it is right on some
simple problems, wrong on others and split on many (mixed-reward groups), and it mostly agrees with
itself on the problems it writes (synthesis keeps them). On GSM8K-level problems it writes the same
one-line rationale from two of the numbers: right only by luck (~0%).

Three choices make that learnable in ~900 small steps (see the functions for why): whole-number
tokens for 0..199, Fourier-feature embeddings for those tokens, and a language-model loss on the
problem text of solve prompts (question_weight), which teaches it to write problems.

Deterministic given its arguments on one machine kind (seeded corpus and init, one CPU thread);
a second call with the same arguments returns the existing folder (manifest written last, atomic
publish, as for the other prepared names in stillhouse.tasks.models.resolve). torch/transformers/tokenizers are
imported inside the functions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import shutil
import time
from pathlib import Path
from typing import Any

from stillhouse.tasks.config import PromptsConfig

log = logging.getLogger(__name__)

TUTOR_NAME = "tiny-tutor"

# Bump when the corpus, tokenizer or training loop changes: a cached folder with another version
# is rebuilt.
CORPUS_VERSION = 1

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


# --------------------------------------------------------------------------- tokenizer


def _train_tokenizer(texts: list[str], vocab_size: int, max_length: int):
    """Byte-level BPE with tiny-llama's special tokens and ChatML template.

    Digit runs are pre-tokens of their own (no leading space) and "0".."199" are in the training
    text, so a small number is one token wherever it stands ("has 17", "= 17", "{17}"): copying it
    from the question is one attention step. Larger numbers split into pieces.
    """
    from stillhouse.tasks.models.tiny import train_chat_tokenizer

    numbers = " ".join(str(i) for i in range(NUMBER_TOKENS))
    return train_chat_tokenizer(texts + [numbers] * 50, vocab_size, max_length, split_digits=True)


def _fourier_number_embeddings(model, tok) -> None:
    """Give the tokens "0".."199" embeddings made of cos/sin of the value at many periods.

    Why: the rationale's last step maps two numbers to their sum or difference. With random
    embeddings that is a table to memorise, which ~900 steps do not; with these, the sum is a
    product of features of the operands (cos(a+b) = cos a cos b - sin a sin b) that Llama's gated
    MLP computes directly, and neighbouring values get similar codes (slips are off by one, not
    random). The codes stay distinct enough to copy numbers. Other tokens keep the random init,
    and everything is trained.
    """
    import torch

    emb = model.get_input_embeddings().weight
    pairs = emb.shape[1] * 3 // 8  # 3/4 of the dimensions hold the code, the rest stays random
    periods = torch.logspace(math.log10(2.5), math.log10(400.0), pairs)
    with torch.no_grad():
        scale = emb.norm(dim=1).mean() / math.sqrt(pairs)
        for n in range(NUMBER_TOKENS):
            idx = tok.convert_tokens_to_ids(str(n))
            if idx is None or tok.convert_ids_to_tokens(idx) != str(n):
                continue
            angle = 2 * math.pi * n / periods
            emb[idx, : 2 * pairs] = scale * torch.cat([angle.cos(), angle.sin()])


# --------------------------------------------------------------------------- build


def build_tiny_tutor(
    out_dir: str | Path,
    *,
    seed: int = 0,
    steps: int = 900,
    batch_size: int = 32,
    lr: float = 3e-3,
    warmup: int = 20,
    n_solve: int = 5000,
    n_write: int = 800,
    n_drill: int = 3000,
    vocab_size: int = 2048,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 1,
    intermediate_size: int = 128,
    max_position_embeddings: int = 2048,
    max_train_tokens: int = 320,
    question_weight: float = 0.3,
) -> Path:
    """Build (or return the cached) tiny tutor into `out_dir`; see the module docstring.

    A freshly initialised tiny Llama (head_dim 64; number embeddings see
    _fourier_number_embeddings) is fully trained on tutor_conversations(seed): AdamW, linear
    warmup then cosine decay, loss on the assistant reply and its <|im_end|> plus, at
    `question_weight`, on the problem text of solve prompts; length-grouped batches, one CPU
    thread. The manifest (written last) records the spec (with a digest of the default prompts
    the corpus was rendered with, so editing them rebuilds), the loss and the build time; a folder
    whose manifest spec matches is returned as is. Takes ~40-50 s on a free core.
    """
    from stillhouse.tasks.models.publish import publish, read_manifest, tmp_sibling
    from stillhouse.tasks.models.tiny import TINY_SPECIAL_TOKENS

    out_dir = Path(out_dir)
    if hidden_size % num_heads or hidden_size // num_heads != 64:
        raise ValueError(f"head_dim must be 64, got hidden_size={hidden_size} num_heads={num_heads}")
    spec = {
        "kind": TUTOR_NAME, "version": CORPUS_VERSION, "seed": seed, "steps": steps,
        "batch_size": batch_size, "lr": lr, "warmup": warmup, "n_solve": n_solve,
        "n_write": n_write, "n_drill": n_drill, "vocab_size": vocab_size,
        "hidden_size": hidden_size, "num_layers": num_layers, "num_heads": num_heads,
        "intermediate_size": intermediate_size, "max_position_embeddings": max_position_embeddings,
        "max_train_tokens": max_train_tokens, "question_weight": question_weight,
        "prompts": _prompts_digest(PromptsConfig()),
    }
    if (read_manifest(out_dir) or {}).get("spec") == spec:
        return out_dir

    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from stillhouse.tasks.prompts import render_prompt

    t0 = time.perf_counter()
    log.info("building %s into %s", TUTOR_NAME, out_dir)
    pairs = tutor_conversations(seed, n_solve=n_solve, n_write=n_write, n_drill=n_drill)
    # The tokenizer learns from the chat text the model will see (without the template's markers).
    tok = _train_tokenizer(
        [m["content"] for msgs, _, _ in pairs for m in msgs] + [reply for _, reply, _ in pairs],
        vocab_size, max_position_embeddings,
    )
    ids = {t: tok.convert_tokens_to_ids(t) for t in TINY_SPECIAL_TOKENS}
    eos = ids["<|im_end|>"]

    # Prompt and reply are encoded apart, as generation sees them (HFBackend encodes the rendered
    # prompt with add_special_tokens=False, then the model writes the reply and <|im_end|>).
    examples: list[tuple[list[int], list[float]]] = []  # (token ids, loss weight per token)
    for messages, reply, question in pairs:
        rendered = render_prompt(tok, messages)
        enc = tok(rendered, add_special_tokens=False, return_offsets_mapping=True)
        p, pw = enc["input_ids"], [0.0] * len(enc["input_ids"])
        if question is not None and question_weight > 0:
            # The problem statement in a solve prompt is language-modelled too: the tutor learns
            # to write such problems from every solve example, not only from the "Problem:"
            # replies, for a few more vocabulary projections.
            lo = rendered.rfind(question)
            hi = lo + len(question)
            pw = [question_weight if lo <= s and e <= hi else 0.0 for s, e in enc["offset_mapping"]]
        c = tok(reply, add_special_tokens=False)["input_ids"] + [eos]
        if len(p) + len(c) > max_train_tokens:
            cut = len(p) + len(c) - max_train_tokens  # keep the end: the template's tail, the marker
            p, pw = p[cut:], pw[cut:]
        examples.append((p + c, pw + [1.0] * len(c)))

    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        head_dim=hidden_size // num_heads, max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True, bos_token_id=ids["<s>"], eos_token_id=eos, pad_token_id=ids["<pad>"],
    )
    # One thread: for a model this small a second one buys little and costs a lot on a busy
    # machine (OpenMP workers spin on a shared core), and a fixed thread count keeps the float
    # reductions, hence the weights, the same whatever machine size runs the build.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config)
            _fourier_number_embeddings(model, tok)
            losses = _train(model, examples, steps=steps, batch_size=batch_size, lr=lr,
                            warmup=warmup, pad_id=ids["<pad>"], rng=random.Random(seed + 1))
    finally:
        torch.set_num_threads(threads)
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<s>"], eos_token_id=[eos, ids["</s>"]], pad_token_id=ids["<pad>"]
    )
    seconds = time.perf_counter() - t0
    tail = losses[-20:]
    log.info("built %s in %.1f s (loss %.3f -> %.3f)", TUTOR_NAME, seconds, losses[0], sum(tail) / len(tail))

    tmp = tmp_sibling(out_dir)
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        manifest: dict[str, Any] = {
            "name": TUTOR_NAME, "spec": spec, "examples": len(examples),
            "loss_first": round(losses[0], 4), "loss_last": round(sum(tail) / len(tail), 4),
            "build_seconds": round(seconds, 1),
        }
        return publish(tmp, out_dir, manifest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _prompts_digest(prompts: PromptsConfig) -> str:
    text = json.dumps([prompts.system, prompts.solve, prompts.harder, prompts.similar, prompts.few_shot])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _train(model, examples: list[tuple[list[int], list[float]]], *, steps: int, batch_size: int, lr: float,
           warmup: int, pad_id: int, rng: random.Random) -> list[float]:
    """Plain AdamW loop over length-grouped batches; returns the loss per step."""
    import torch

    def batches():
        # Endless seeded epochs: shuffle, cut into chunks of 16 batches, sort each chunk by length
        # (little padding), then shuffle the batches of the chunk.
        while True:
            order = list(range(len(examples)))
            rng.shuffle(order)
            chunk = batch_size * 16
            for start in range(0, len(order), chunk):
                part = sorted(order[start:start + chunk], key=lambda i: len(examples[i][0]))
                group = [part[j:j + batch_size] for j in range(0, len(part), batch_size)]
                rng.shuffle(group)
                yield from group

    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    model.train()
    losses: list[float] = []
    for _, idx in zip(range(steps), batches(), strict=False):
        width = max(len(examples[i][0]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        attn = torch.zeros((len(idx), width), dtype=torch.long)
        weight = torch.zeros((len(idx), width))
        for row, i in enumerate(idx):
            seq, wts = examples[i]
            ids[row, : len(seq)] = torch.tensor(seq)
            attn[row, : len(seq)] = 1
            weight[row, : len(seq)] = torch.tensor(wts)
        # The vocabulary projection only where a loss is taken: the prompt is most of the tokens.
        hidden = model.model(input_ids=ids, attention_mask=attn).last_hidden_state[:, :-1]
        w = weight[:, 1:]
        keep = w > 0
        nll = torch.nn.functional.cross_entropy(model.lm_head(hidden[keep]), ids[:, 1:][keep], reduction="none")
        loss = (nll * w[keep]).sum() / w[keep].sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses
