"""The run's cost ledger and its budget: what each round's model steps cost, and a stop before a
teacher step that would go past the budget.

One entry per round and model step (`rounds/ledger.json`, keyed "<round>/<step>"): who did the work
(teacher, student, trainer), the step's output key, tokens in and out (or trained), model seconds,
and the teacher's cost from the config's per-million-token prices. An entry describes the
invocation that *made* the output: a rerun that finds the output complete keeps the entry as it is
(its own model seconds are 0 and say nothing about the work), so the ledger of a resumed run adds
up to what the run cost, counted once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stillhouse.storage import parquet_io
from stillhouse.tasks.config import CostConfig, RunConfig

LEDGER_FILE = Path("rounds") / "ledger.json"

# Which model does a step's work; the teacher's tokens are the ones a served teacher bills.
ROLES = {"sample": "teacher", "synthesize": "teacher", "evaluate-base": "student", "evaluate": "student",
         "train": "trainer"}


class BudgetExhausted(RuntimeError):
    """The next teacher step would go past the run's budget. Nothing is lost: rerun with a larger
    `cost.max_teacher_tokens` / `cost.max_cost` and the run continues where it stopped."""


def ledger_path(workdir: str | Path) -> Path:
    return Path(workdir) / LEDGER_FILE


def read_ledger(workdir: str | Path) -> dict[str, dict[str, Any]]:
    import json

    path = ledger_path(workdir)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text("utf-8"))
    except ValueError as err:
        raise ValueError(f"cost ledger {path} is not valid JSON ({err}); delete it to start the "
                         "ledger anew (the run's outputs are not affected)") from None
    return data if isinstance(data, dict) else {}


def teacher_cost(prompt_tokens: int, completion_tokens: int, prices: CostConfig) -> float:
    return (prompt_tokens * prices.input_price_per_million
            + completion_tokens * prices.output_price_per_million) / 1e6


def record_step(cfg: RunConfig, round: int | None, step: str, key: str, computed: bool,
                metrics: dict[str, Any]) -> dict[str, Any]:
    """Write the step's entry (round None: the once-per-run base evaluation); returns the entry
    now in the ledger. An output found complete keeps the entry of the invocation that made it."""
    ledger = read_ledger(cfg.workdir)
    name = f"{'base' if round is None else round}/{step}"
    old = ledger.get(name)
    if not computed and old is not None and old.get("key") == key:
        return old
    role = ROLES[step]
    prompt, completion = int(metrics.get("prompt_tokens") or 0), int(metrics.get("completion_tokens") or 0)
    entry = {
        "round": round, "step": step, "role": role, "key": key, "computed": computed,
        "prompt_tokens": prompt, "completion_tokens": completion,
        "train_tokens": int(metrics.get("train_tokens") or 0),
        "requests": int(metrics.get("requests") or 0),
        "model_seconds": float(metrics.get("model_seconds") or 0.0),
        "cost": teacher_cost(prompt, completion, cfg.cost) if role == "teacher" else 0.0,
    }
    ledger[name] = entry
    parquet_io.write_json_atomic(ledger, ledger_path(cfg.workdir))
    return entry


def round_costs(ledger: dict[str, dict[str, Any]], round: int | None) -> dict[str, Any]:
    """A round's totals: teacher and student tokens, trained tokens, model seconds, cost."""
    rows = [e for e in ledger.values() if e.get("round") == round]
    teacher = [e for e in rows if e["role"] == "teacher"]
    student = [e for e in rows if e["role"] == "student"]
    return {
        "teacher_tokens_in": sum(e["prompt_tokens"] for e in teacher),
        "teacher_tokens_out": sum(e["completion_tokens"] for e in teacher),
        "student_tokens_in": sum(e["prompt_tokens"] for e in student),
        "student_tokens_out": sum(e["completion_tokens"] for e in student),
        "train_tokens": sum(e["train_tokens"] for e in rows),
        "ledger_model_seconds": sum(e["model_seconds"] for e in rows),
        "cost": sum(e["cost"] for e in rows),
    }


def spent(ledger: dict[str, dict[str, Any]]) -> tuple[int, float]:
    """Teacher tokens (prompt + completion) and cost over the whole run so far."""
    teacher = [e for e in ledger.values() if e["role"] == "teacher"]
    return sum(e["prompt_tokens"] + e["completion_tokens"] for e in teacher), sum(e["cost"] for e in teacher)


def estimate_teacher(ledger: dict[str, dict[str, Any]], requests: int, max_new_tokens: int,
                     prices: CostConfig) -> tuple[int, float, str]:
    """Tokens and cost `requests` more teacher samples will take: at the run's measured tokens per
    sampling request when it has sampled before, else max_new_tokens each (an upper bound on the
    completion; the prompt is not counted then). Returns (tokens, cost, how it was estimated)."""
    done = [e for e in ledger.values() if e["step"] == "sample" and e["requests"]]
    n = sum(e["requests"] for e in done)
    if n:
        prompt = sum(e["prompt_tokens"] for e in done) / n * requests
        completion = sum(e["completion_tokens"] for e in done) / n * requests
        how = f"at the {(prompt + completion) / requests:.0f} tokens per request measured so far"
    else:
        prompt, completion = 0.0, float(max_new_tokens * requests)
        how = f"at most {max_new_tokens} completion tokens per request (max_new_tokens; nothing measured yet)"
    return int(prompt + completion), teacher_cost(int(prompt), int(completion), prices), how


def check_budget(cfg: RunConfig, what: str, requests: int | None = None) -> None:
    """Raise BudgetExhausted if the teacher step `what` would take the run past its budget:
    `requests` samples still to generate are estimated (0: nothing to generate, never stops);
    None (a step whose request count is not known beforehand) stops once the budget is spent."""
    budget = cfg.cost
    if (budget.max_teacher_tokens is None and budget.max_cost is None) or requests == 0:
        return
    ledger = read_ledger(cfg.workdir)
    tokens, cost = spent(ledger)
    more_tokens, more_cost, how = (0, 0.0, "")
    if requests:
        more_tokens, more_cost, how = estimate_teacher(ledger, requests, cfg.sampling.max_new_tokens, budget)
    over = []
    if budget.max_teacher_tokens is not None and (
            tokens + more_tokens > budget.max_teacher_tokens or (requests is None and tokens >= budget.max_teacher_tokens)):
        over.append(f"cost.max_teacher_tokens = {budget.max_teacher_tokens}: {tokens} teacher tokens spent"
                    + (f" + about {more_tokens} for {requests} requests ({how})" if requests else ""))
    if budget.max_cost is not None and (
            cost + more_cost > budget.max_cost or (requests is None and cost >= budget.max_cost)):
        over.append(f"cost.max_cost = {budget.max_cost:g}: {cost:.4f} spent"
                    + (f" + about {more_cost:.4f} for {requests} requests ({how})" if requests else ""))
    if over:
        raise BudgetExhausted(
            f"budget reached before {what}: " + "; ".join(over)
            + ". Finished work is kept: raise the budget in the config and rerun the same command to continue."
        )
