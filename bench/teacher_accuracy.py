"""Sample accuracy of a model on a run config's problems, with the config's prompt and sampling.

What a round's sample + verify steps measure as `teacher_accuracy`, without the rest of the round:
the config's sources are loaded (stillhouse.tasks.sources.load_problems), each problem is sampled N times
through HFBackend with the config's prompts (system, few-shot, solve) and sampling parameters
(temperature, top_p, max_new_tokens, stop, seed), and every sample is scored by the verifier.
Use it to choose a problem source and prompt on which a teacher gets a useful share right (group
advantages need groups with mixed rewards).

    python bench/teacher_accuracy.py configs/demo.yaml
    python bench/teacher_accuracy.py configs/demo.yaml --split eval --limit 16 --samples 8
    python bench/teacher_accuracy.py configs/demo.yaml --model tiny-llama --max-new-tokens 32

Besides accuracy it reports how many samples were cut at max_new_tokens, how many gave an explicit
answer format, and how many problems got mixed rewards (0 < correct < N). The last line is
`teacher_accuracy: model=... problems=... samples=... accuracy=...`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stillhouse.tasks.config import load_config  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", help="run config (YAML): problems, prompts, sampling, teacher")
    ap.add_argument("--model", help="model to measure (default: the config's teacher)")
    ap.add_argument("--samples", type=int, help="samples per problem (default: sampling.n)")
    ap.add_argument("--split", choices=["train", "eval", "all"], default="train",
                    help="which problems (train = the round-0 pool)")
    ap.add_argument("--limit", type=int, help="at most this many problems (first ones by id)")
    ap.add_argument("--temperature", type=float, help="override sampling.temperature")
    ap.add_argument("--max-new-tokens", type=int, help="override sampling.max_new_tokens")
    ap.add_argument("--batch-size", type=int, help="override sampling.batch_size")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--device", help="override the model's device (auto, cpu, cuda)")
    ap.add_argument("--dtype", help="override the model's dtype (the demo is measured in float32)")
    ap.add_argument("--show", type=int, default=3, help="print this many samples (wrong ones first)")
    ap.add_argument("--rationale", choices=["cot", "pot"],
                    help="override verifier.rationale; pot without its own prompts in the config gets "
                    "the PoT prompts, and every program runs in the sandbox (its answer is what it prints)")
    ap.add_argument("--dump", help="write every sample (question, reference, text, verdict) to this JSONL file")
    args = ap.parse_args(argv)

    import torch

    from stillhouse.tasks.backends.base import SamplingParams
    from stillhouse.tasks.backends.hf import HFBackend
    from stillhouse.tasks.prompts import solve_requests
    from stillhouse.tasks.sources import load_problems
    from stillhouse.tasks.verify.score import score_samples

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    if args.rationale and args.rationale != cfg.verifier.rationale:
        from stillhouse.tasks.config import parse_config

        data = cfg.model_dump(mode="json")
        data["verifier"]["rationale"] = args.rationale
        if args.rationale == "pot":  # the config's CoT prompts would not ask for a program
            data["prompts"].pop("solve"), data["prompts"].pop("few_shot")
        cfg = parse_config(data, origin=args.config)
    overrides = {k: v for k, v in (("temperature", args.temperature), ("max_new_tokens", args.max_new_tokens),
                                   ("batch_size", args.batch_size)) if v is not None}
    sampling = cfg.sampling.model_copy(update=overrides)
    n = args.samples or sampling.n
    model = cfg.teacher.model_copy(update={k: v for k, v in (
        ("name_or_path", args.model), ("device", args.device), ("dtype", args.dtype)) if v})

    problems = load_problems(list(cfg.problems)).problems
    if args.split != "all":
        problems = [p for p in problems if p.split == args.split]
    problems = sorted(problems, key=lambda p: p.id)[: args.limit]
    if not problems:
        sys.exit(f"no {args.split} problems in {args.config}")

    backend = HFBackend(model.name_or_path, dtype=model.dtype, device=model.device,
                        batch_size=sampling.batch_size, chat_template=model.chat_template,
                        revision=model.revision)
    requests = solve_requests(problems, n, sampling.seed, cfg.prompts)
    params = SamplingParams.from_config(sampling)
    print(f"model={model.name_or_path} problems={len(problems)} samples={len(requests)} "
          f"T={params.temperature} top_p={params.top_p} max_new_tokens={params.max_new_tokens} "
          f"threads={torch.get_num_threads()}", flush=True)
    t0 = time.perf_counter()
    def progress(done: int, total: int) -> None:
        print(f"  {done}/{total} samples, {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)

    completions = backend.sample(requests, params, progress)
    seconds = time.perf_counter() - t0
    reference = {p.id: p.answer for p in problems}
    v = cfg.verifier
    items = [(c.text, reference[c.key]) for c in completions]
    if v.rationale == "pot":
        from stillhouse.tasks.verify.programs import score_programs

        verdicts = score_programs(items, v.model_copy(update={"workers": 0}))
        scores = [x.verdict for x in verdicts]
        failures = Counter((x.program.failure or "ran").split(":")[0].split(" (")[0] for x in verdicts)
        ran = failures.pop("ran", 0)
        print(f"programs: ran cleanly {ran}/{len(verdicts)}; failed {dict(failures.most_common())}; "
              f"isolation level {verdicts[0].program.level if verdicts else '-'}")
    else:
        scores = score_samples(items, last_number_fallback=v.last_number_fallback,
                               timeout_s=v.timeout_s, workers=0)

    correct = sum(s.correct for s in scores)
    cut = sum(c.finish_reason == "length" for c in completions)
    formatted = sum(s.format_ok for s in scores)
    per_problem = Counter()
    for c, s in zip(completions, scores):
        per_problem[c.key] += s.correct
    groups = Counter(per_problem[p.id] for p in problems)  # correct-of-n -> problems
    mixed = sum(count for k, count in groups.items() if 0 < k < n)
    tokens = sum(c.completion_tokens for c in completions)

    if args.dump:
        by_id = {p.id: p for p in problems}
        with open(args.dump, "w") as f:
            for c, sc in zip(completions, scores):
                p = by_id[c.key]
                f.write(json.dumps({"problem_id": p.id, "question": p.question, "reference": p.answer,
                                    "meta": p.meta, "sample_index": c.sample_index, "text": c.text,
                                    "extracted": sc.extracted, "correct": sc.correct,
                                    "finish_reason": c.finish_reason}) + "\n")
    shown = sorted(range(len(scores)), key=lambda i: scores[i].correct)[: args.show]
    for i in shown:
        c, s = completions[i], scores[i]
        print(f"--- {'correct' if s.correct else 'wrong'} (ref {reference[c.key]}, got {s.extracted!r}, "
              f"{c.completion_tokens} tokens, {c.finish_reason})\n{c.text.strip()}")
    print(f"correct-of-{n} per problem: {dict(sorted(groups.items()))}; mixed groups {mixed}/{len(problems)}")
    print(f"cut at max_new_tokens: {cut}/{len(completions)}; explicit answer format: {formatted}/{len(completions)}; "
          f"{tokens} tokens in {seconds:.1f} s ({tokens / max(seconds, 1e-9):.0f} tokens/s)")
    print(f"teacher_accuracy: model={model.name_or_path} problems={len(problems)} samples={len(completions)} "
          f"accuracy={correct / len(completions):.3f}")


if __name__ == "__main__":
    main()
