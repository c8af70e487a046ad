"""A smoke-size program-of-thought run end to end: 2 rounds against a real Prefect server.

The teacher is scripted (an OpenAI-compatible server on loopback) because this test is about the
sandbox in the pipeline, not about a model: it writes programs that add or subtract the problem's
two numbers (so some are right and some wrong), and now and then a hostile one (a fork bomb, an
endless loop, a socket to the test's own server, a read of the parent's API key). The student is
tiny-tutor (a real tiny model) whose programs are run in the same sandbox at evaluation.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from stillhouse.storage.catalog import Catalog
from stillhouse.tasks.config import parse_config
from stillhouse.tasks.sandbox.isolation import detect

pytestmark = [pytest.mark.integration, pytest.mark.server]

SECRET = "sk-pot-run-secret-42"

HOSTILE = [
    "import os\nwhile True:\n    os.fork()",
    "while True:\n    pass",
    "import os\nprint(os.environ.get('STILLHOUSE_POT_KEY', 'none'))",
]


def _h(*parts) -> int:
    return int(hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:12], 16)


def scripted_reply(content: str, seed: int) -> str:
    """A program for a solve prompt, a new problem for a synthesis prompt."""
    if "Write a new" in content or "harder version" in content:
        a, b = 3 + _h(seed, "a") % 20, 2 + _h(seed, "b") % 9
        return (f"Problem: Zed the gardener picks {a} ripe tomatoes in the morning and then "
                f"{b} more after lunch. How many tomatoes did Zed pick?")
    question = content.split("\n\n")[0]
    nums = [int(n) for n in re.findall(r"\d+", question)][:2] or [1, 1]
    roll = _h(seed, question) % 10
    if roll == 0:
        return "```python\n" + HOSTILE[_h(seed) % len(HOSTILE)] + "\n```"
    op = "+" if roll < 6 else "-"
    return f"Let me compute.\n```python\nx = {nums[0]}\ny = {nums[-1]}\nprint(x {op} y)\n```"


class ScriptedTeacher:
    def __init__(self):
        self.requests = 0
        teacher = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                teacher.requests += 1
                text = scripted_reply(req["messages"][-1]["content"], req.get("seed", 0))
                body = json.dumps({"id": "x", "object": "chat.completion", "model": req["model"],
                                   "choices": [{"index": 0, "finish_reason": "stop",
                                                "message": {"role": "assistant", "content": text}}],
                                   "usage": {"prompt_tokens": 10, "completion_tokens": len(text.split()),
                                             "total_tokens": 10 + len(text.split())}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        class Server(ThreadingHTTPServer):
            request_queue_size = 128  # the client opens many connections at once
            daemon_threads = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def pot_run(models_dir, tmp_path_factory):
    level = detect().level
    if level < 2:
        pytest.skip(f"PoT needs the sandbox; this machine offers level {level}")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ["STILLHOUSE_POT_KEY"] = SECRET
    from prefect.testing.utilities import prefect_test_harness

    from stillhouse.flows.distill import run

    workdir = tmp_path_factory.mktemp("pot") / "run"
    with ScriptedTeacher() as teacher, prefect_test_harness(server_startup_timeout=120):
        cfg = parse_config({
            "run_name": "pot-smoke", "workdir": str(workdir), "rounds": 2,
            "problems": [{"kind": "arithmetic", "steps": 1, "operations": ["add", "sub"],
                          "max_operand": 10, "eval_templates": 4, "seed": 0}],
            "teacher": {"name_or_path": "scripted", "backend": "openai", "base_url": teacher.base_url,
                        "max_concurrency": 8, "max_retries": 3, "retry_backoff_s": 0.2},
            "student": {"model": {"name_or_path": "tiny-tutor"},
                        "lora": {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
            "verifier": {"rationale": "pot", "sandbox": {"min_level": level, "cpu_seconds": 1,
                                                         "wall_seconds": 3}},
            "sampling": {"n": 4, "max_new_tokens": 48},
            "training": {"batch_size": 8, "max_length": 256},
            "evaluation": {"max_new_tokens": 32, "pool_k": 2},
            "synthesis": {"reference_samples": 4, "agreement_threshold": 0.5},
        })
        history = run(cfg)
    os.environ.pop("STILLHOUSE_POT_KEY", None)
    return cfg, history, teacher


def test_pot_run_completes_two_rounds_through_the_sandbox(pot_run):
    cfg, history, teacher = pot_run
    assert [m["round"] for m in history] == [0, 1] and teacher.requests > 0
    with Catalog(cfg.workdir, read_only=True) as cat:
        samples = cat.read("samples", round=0).to_pylist()
    assert samples
    for s in samples:
        # The student learns the program text; the verdict comes from what it printed.
        prog = re.search(r"```python\n(.*?)```", s["response"], re.DOTALL).group(1)
        if "print(x + y)" in prog or "print(x - y)" in prog:
            x, y = (int(v) for v in re.findall(r"= (\d+)", prog))
            printed = x + y if "+" in prog else x - y
            assert s["extracted"] == str(printed) and s["error"] is None
        else:  # the hostile ones: contained, recorded as wrong with the reason
            assert s["correct"] is False
            assert SECRET not in (s["extracted"] or "") and SECRET not in (s["error"] or "")
            if "fork" in prog or "while True" in prog:
                assert s["error"].startswith("program: ")
    right = [s["correct"] for s in samples]
    assert 0 < sum(right) < len(right)  # mixed rewards: weights carry signal
    assert history[0]["teacher_accuracy"] == pytest.approx(sum(right) / len(right))


def test_pot_synthesis_takes_references_from_executed_programs(pot_run):
    cfg, history, _ = pot_run
    with Catalog(cfg.workdir, read_only=True) as cat:
        new = [p for p in cat.read("problems").to_pylist() if p["operation"] != "seed"]
        records = cat.synthesis_records(0).to_pylist()
    assert len(records) == history[0]["synth_generated"] > 0
    assert len(new) == history[0]["synth_kept"] > 0  # the scripted programs agree often enough
    for p in new:  # "picks a ... then b more": the answer the agreeing programs printed
        a, b = (int(v) for v in re.findall(r"\d+", p["question"])[:2])
        assert p["answer"] in (str(a + b), str(a - b))
