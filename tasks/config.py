"""The one typed config of a Stillhouse run.

Validated at the edge (CLI, Prefect run form); everything below it receives plain values. Sub-models
are frozen so a stage cannot mutate the config another stage hashes for caching. Every field has a
description because Prefect renders them as the run form's help text.

The two seed papers' exact hyperparameters could not be read here; each choice is a field with a
documented default so the method can be compared with its baselines on the same data.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# --------------------------------------------------------------------------- problem sources


class ColumnMap(_Section):
    """Which columns of a local file or hub dataset hold the problem record's fields."""

    question: str = Field("question", description="Column holding the problem statement.")
    answer: str = Field(
        "answer",
        description="Column holding the reference answer (GSM8K '... #### 1,234' is normalised).",
    )
    id: str | None = Field(
        None, description="Optional column with an upstream id, kept in the problem's meta."
    )


class SourceConfig(_Section):
    """One place problems come from. Several sources are concatenated into the seed pool."""

    kind: Literal["jsonl", "parquet", "csv", "hf", "gsm_symbolic", "champ", "arithmetic"] = Field(
        ...,
        description="Loader: local jsonl/parquet/csv, a Hugging Face dataset, a packaged set, or "
        "arithmetic (built-in seeded one/two-step word problems, for small teachers).",
    )
    name: str | None = Field(
        None,
        description="Label stored as the problems' `source`; defaults to the kind (and file/dataset name).",
    )
    path: str | None = Field(
        None,
        description="Local file (jsonl/parquet/csv), or for kind=hf a dataset saved with save_to_disk.",
    )
    dataset: str | None = Field(
        None, description="Hugging Face hub dataset id for kind=hf, e.g. 'openai/gsm8k'."
    )
    subset: str | None = Field(None, description="Hub dataset config name, e.g. 'main' for GSM8K.")
    hf_split: str = Field("train", description="Which split of the hub/saved dataset to read.")
    columns: ColumnMap = Field(default_factory=ColumnMap, description="Column mapping.")
    split: Literal["train", "eval"] = Field(
        "train",
        description="Role of this source's problems: 'train' joins the pool, 'eval' is held out. "
        "Ignored by gsm_symbolic and arithmetic, which split by template.",
    )
    limit: int | None = Field(
        None, ge=1, description="Keep at most this many problems (after the seeded shuffle)."
    )
    seed: int = Field(0, description="Seed for shuffling and for instantiating templates.")
    eval_templates: int = Field(
        20,
        ge=0,
        description="gsm_symbolic / arithmetic: how many templates (arithmetic: story templates, "
        "16 in all) are held out for eval. The split is by template, never by instance, so eval "
        "problems never share a template with training ones.",
    )
    instances_per_template: int = Field(
        1, ge=1, description="gsm_symbolic / arithmetic: fresh instances generated from each template."
    )
    max_operand: int = Field(
        10,
        ge=3,
        description="arithmetic: largest operand; step operands and factors are drawn from "
        "2..max_operand, starting amounts from 3..max_operand; subtraction leaves at least 1.",
    )
    operations: list[Literal["add", "sub", "mul"]] = Field(
        default_factory=lambda: ["add", "sub"],
        min_length=1,
        description="arithmetic: operations a problem's steps are drawn from; 'mul' is only ever "
        "the first step ('3 bags with 4 apples in each').",
    )
    steps: int = Field(
        1, ge=1, le=3, description="arithmetic: operations per problem (1 = one-step problems)."
    )
    max_answer_chars: int = Field(
        200, ge=1, description="Rows whose reference answer is longer than this are reported and skipped."
    )
    max_question_chars: int = Field(
        8_000,
        ge=1,
        description="Rows whose question is longer than this are reported and skipped. GSM8K and "
        "MATH questions are under 5,000 characters; a 1 MB question would not fit any model's "
        "context (and the prompt check before sampling would quarantine it anyway).",
    )
    max_number_digits: int = Field(
        100,
        ge=1,
        description="Rows with a number of more digits than this in the question or the answer are "
        "reported and skipped (Python cannot even convert a number of more than 4,300 digits).",
    )

    @model_validator(mode="after")
    def _needs_location(self) -> SourceConfig:
        if self.kind in ("jsonl", "parquet", "csv") and not self.path:
            raise ValueError(f"kind={self.kind} needs `path`")
        if self.kind == "hf" and not (self.path or self.dataset):
            raise ValueError("kind=hf needs `dataset` (hub id) or `path` (saved dataset)")
        if self.kind == "arithmetic" and self.steps > 1 and set(self.operations) == {"mul"}:
            raise ValueError("kind=arithmetic: 'mul' is only a first step; add 'add' or 'sub' for steps > 1")
        return self


# --------------------------------------------------------------------------- models


class ModelConfig(_Section):
    """A model: hub id, local folder, or a prepared packaged name (see `stillhouse models`)."""

    name_or_path: str = Field(
        ...,
        description="Hub id (e.g. 'Qwen/Qwen2.5-7B-Instruct'), a local HF folder, or a prepared name "
        "such as 'smollm2-135m-instruct', 'tiny-tutor' or 'tiny-llama' (built on first use).",
    )
    backend: Literal["hf", "vllm", "openai"] = Field(
        "hf",
        description="hf: transformers in process; vllm: vLLM engine in its own process/venv; "
        "openai: any OpenAI-compatible server.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto = bfloat16 on CUDA, float32 on CPU."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to pin.")
    chat_template: str | None = Field(
        None,
        description="Jinja chat template overriding the tokenizer's; models without one fall back "
        "to plain text prompts.",
    )
    # Remote backends.
    base_url: str | None = Field(
        None, description="openai backend: server URL, e.g. http://127.0.0.1:8000/v1."
    )
    api_key_env: str | None = Field(
        None,
        description="openai backend: name of the environment variable holding the API key "
        "(the key itself is never stored in the config, catalog or logs).",
    )
    max_concurrency: int = Field(32, ge=1, description="openai backend: requests in flight.")
    request_timeout_s: float = Field(
        300.0, gt=0, description="openai backend: seconds one HTTP attempt may take (the whole "
        "generation, replies are not streamed) before it counts as failed and is retried."
    )
    max_retries: int = Field(
        6, ge=0, description="openai backend: retries per call on 429/408/409/5xx, timeouts and "
        "connection errors, then the step fails (received responses stay in the journal)."
    )
    retry_backoff_s: float = Field(
        1.0, gt=0, description="openai backend: first wait before a retry; doubles per retry, capped "
        "at 60 s, jittered. A server's Retry-After header replaces it."
    )
    use_n: bool = Field(
        False,
        description="openai backend: send a problem's samples as one call with n=k (prompt billed "
        "once) instead of one call per sample with its own seed (default: exact per-sample seeds, "
        "reproducible resume, exact per-sample usage).",
    )
    @field_validator("base_url")
    @classmethod
    def _no_credentials_in_url(cls, value: str | None) -> str | None:
        from stillhouse.tasks.redact import check_base_url

        return None if value is None else check_base_url(value)

    # vLLM engine.
    vllm_python: str | None = Field(
        None, description="vllm backend: Python interpreter of the vLLM environment (.venv-vllm)."
    )
    tensor_parallel_size: int = Field(1, ge=1, description="vllm: GPUs per engine.")
    data_parallel_size: int = Field(
        1, ge=1, description="vllm: engines, one per GPU group; prompts are sharded over them."
    )
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="vllm: GPU memory share.")
    max_model_len: int | None = Field(None, ge=16, description="vllm: context length cap.")
    enable_prefix_caching: bool = Field(True, description="vllm: reuse the shared prompt prefix.")
    vllm_engine_args: dict[str, Any] = Field(
        default_factory=dict,
        description="vllm: further keyword arguments for vllm.LLM, passed as given, e.g. "
        "{enforce_eager: true} (skips the torch.compile warm-up, ~1 min per engine start on CPU) "
        "or {max_num_seqs: 512}. Keys that change outputs (quantization, ...) also key the cache.",
    )


class SamplingConfig(_Section):
    """How the teacher samples. AdvDistill draws 8 samples per prompt."""

    n: int = Field(8, ge=1, description="Samples per problem (the group size for advantages).")
    temperature: float = Field(0.7, ge=0, description="0 = greedy.")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling mass.")
    max_new_tokens: int = Field(512, ge=1, description="Cap on generated tokens per sample.")
    stop: list[str] = Field(default_factory=list, description="Extra stop strings.")
    batch_size: int = Field(16, ge=1, description="hf backend: sequences per generate call.")
    seed: int = Field(
        0,
        description="Base seed; each (problem, sample index) gets its own seed derived from it, so "
        "a resumed run regenerates exactly the missing samples.",
    )


# --------------------------------------------------------------------------- verify, reward, weigh


class SandboxConfig(_Section):
    """Where program-of-thought rationales run (tasks/sandbox: levels, limits, warm workers)."""

    min_level: int = Field(
        3, ge=1, le=3,
        description="Least isolation PoT accepts; below it PoT refuses, naming what to install. "
        "1 = isolated interpreter, empty environment, rlimits, wall clock, output cap; "
        "2 = + bubblewrap namespaces (no network, own PIDs, read-only stdlib only); "
        "3 = + seccomp filter (no sockets, fork, exec, signals, ptrace, mount).",
    )
    workers: int = Field(2, ge=1, le=64, description="Warm sandboxed worker processes.")
    cpu_seconds: int = Field(5, ge=1, description="CPU seconds per program (RLIMIT_CPU).")
    wall_seconds: float = Field(10.0, gt=0, description="Wall-clock seconds per program; then its process group is killed.")
    memory_mb: int = Field(512, ge=64, description="Address space per program in MiB (RLIMIT_AS).")
    file_size_mb: int = Field(8, ge=1, description="Largest file a program may write, MiB (RLIMIT_FSIZE).")
    open_files: int = Field(64, ge=16, description="Open file descriptors per program (RLIMIT_NOFILE).")
    processes: int = Field(
        64, ge=1, description="RLIMIT_NPROC (not enforced for root: level 3 denies fork instead)."
    )
    output_bytes: int = Field(65536, ge=64, description="Captured stdout per program; more stops it (limit 'output').")
    bwrap: str = Field("bwrap", description="bubblewrap executable (name on PATH or a path).")
    libseccomp: str = Field("libseccomp.so.2", description="libseccomp shared library (soname or path).")


class VerifierConfig(_Section):
    last_number_fallback: bool = Field(
        True,
        description="If no explicit answer format (boxed, ####, 'the answer is') is found, use the "
        "last number in the text. Such answers never earn the format reward.",
    )
    timeout_s: float = Field(5.0, gt=0, description="Time limit per sample; over it = wrong, with an error.")
    workers: int | None = Field(
        None, ge=0, description="Worker processes for scoring; None = all cores, 0 = in process."
    )
    rationale: Literal["cot", "pot"] = Field(
        "cot",
        description="cot: the answer is read from the response text (chain of thought). pot: "
        "program of thought: the response's last ```python block runs in the sandbox and its "
        "printed output is the answer (teacher samples, student evaluation, synthesis votes); "
        "the student learns the program text. With pot and no prompts given, the PoT prompts "
        "(tasks/prompts.py) are used.",
    )
    sandbox: SandboxConfig = Field(
        default_factory=SandboxConfig, description="Where PoT programs run (rationale: pot)."
    )


class RewardConfig(_Section):
    correct: float = Field(1.0, description="Reward for a correct final answer.")
    wrong: float = Field(0.0, description="Reward for a wrong or missing final answer.")
    format: float = Field(
        0.1, description="Added when the answer is given in an explicit format (boxed, ####, ...)."
    )
    format_requires_correct: bool = Field(
        True,
        description="Give the format bonus only to correct answers. Off, a well-formatted wrong "
        "answer outranks the other wrong answers of its group and the advantage turns that bonus "
        "into a push toward it.",
    )


class WeightingConfig(_Section):
    scheme: Literal["group_advantage", "rft", "uniform"] = Field(
        "group_advantage",
        description="group_advantage: (r - mean) / (std + eps) within the problem's N samples "
        "(AdvDistill); rft: weight 1 on correct samples only (rejection-sampling baseline); "
        "uniform: every sample weight 1 (plain distillation baseline).",
    )
    eps: float = Field(1e-6, gt=0, description="Added to the group std.")
    std: Literal["population", "sample", "none"] = Field(
        "population",
        description="Divide the group advantage by the group std (ddof 0 or 1), or not at all "
        "('none': r - mean, as Dr. GRPO argues, so that a group with little spread is not blown up).",
    )
    zero_if_correctness_uniform: bool = Field(
        True,
        description="A group whose samples are all correct or all wrong gets weight 0 even when "
        "the format bonus makes its rewards differ: format alone is no preference signal, and "
        "the std division would blow a 0.1 bonus up to the group's largest weight.",
    )
    negatives: Literal["keep", "clip", "floor"] = Field(
        "clip",
        description="group_advantage: keep negative weights, clip them to 0 (only better-than-"
        "average samples train, weighted by their advantage), or floor them at `floor`. The weight "
        "stored in the round's version is the weight trained on; nothing else floors it. Default "
        "clip, from configs/experiments/advdistill-cpu.yaml (README, Experiments): floor + "
        "unlikelihood collapsed the student (0.042 vs 0.562 untrained), keep + nll and clip were "
        "0.729 and 0.667 (within noise, n=48); clip cannot diverge with longer training.",
    )
    floor: float = Field(-1.0, le=0, description="Lowest weight when negatives='floor'.")


# --------------------------------------------------------------------------- student


class LoraConfig(_Section):
    rank: int = Field(16, ge=1, description="LoRA rank r.")
    alpha: int = Field(32, ge=1, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Module names that get adapters.",
    )


class TrainingConfig(_Section):
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    schedule: Literal["constant", "linear", "cosine"] = Field("cosine", description="LR schedule.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of steps spent warming up.")
    epochs: float = Field(1.0, gt=0, description="Passes over the round's dataset.")
    max_steps: int | None = Field(
        None,
        ge=1,
        description="Train exactly this many optimizer steps, cycling the round's dataset (in "
        "fresh seeded orders) as often as needed; `epochs` is then ignored. Holds the training "
        "budget equal across runs whose datasets differ in size, e.g. experiment arms where "
        "group_advantage drops zero-weight groups and rft drops wrong samples.",
    )
    batch_size: int = Field(8, ge=1, description="Samples per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute each layer's activations in the backward pass instead of keeping "
        "them. SmolLM2-135M, micro-batch 8 x 384 tokens, CPU: peak RSS 8.1 -> 4.2 GB and no slower "
        "(bench/training_memory.py); on GPUs it usually costs 20-30% more compute.",
    )
    max_length: int = Field(1024, ge=16, description="Tokens per sample; longer ones are truncated and counted.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping.")
    loss_normalizer: Literal["samples", "tokens"] = Field(
        "samples",
        description="What an optimizer step's weighted loss is divided by: its number of samples "
        "(sum_i w_i * mean-token-nll_i / n) or its number of completion tokens (sum_i w_i * "
        "sum-token-nll_i / tokens). Neither depends on the weights, so a weight's size always "
        "changes the step's gradient.",
    )
    negative_loss: Literal["nll", "unlikelihood"] = Field(
        "nll",
        description="How negative-weight samples (weighting.negatives keep or floor) are pushed "
        "down: 'nll' -|w| * nll, unbounded below (gradient ascent on the sample's likelihood); "
        "'unlikelihood' |w| * mean_t -log(1 - p_t), bounded below by 0 but steep on tokens the "
        "model is sure of: on every token of a wrong sample, including the ones it shares with right "
        "answers, it pushed the SmolLM2 student to write the prompt's placeholder 'The answer is N.' "
        "instead of any number (advdistill-cpu experiment, README).",
    )
    checkpoint_every: int = Field(50, ge=1, description="Optimizer steps between checkpoints.")
    init: Literal["previous", "base"] = Field(
        "previous", description="Round r starts from round r-1's adapter, or from the base model."
    )
    seed: int = Field(0, description="Seed for LoRA init, dropout and data order.")


class StudentConfig(_Section):
    model: ModelConfig = Field(..., description="The student's base model (<= 1B).")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="Adapter shape.")


# --------------------------------------------------------------------------- feedback


class EvalConfig(_Section):
    max_new_tokens: int = Field(512, ge=1, description="Generation cap for the student.")
    batch_size: int = Field(16, ge=1, description="Sequences per generate call.")
    pool_k: int = Field(
        4, ge=0, description="Samples per training-pool problem for the student's pass rate. "
        "0 = no pass rates and so no easy/hard split: only for runs without synthesis (one round, "
        "or synthesis disabled), where the split feeds nothing; saves the pool's generation."
    )
    pool_temperature: float = Field(0.7, ge=0, description="Temperature of the pass-rate samples.")
    pool_top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling mass of the pass-rate samples.")
    max_eval_problems: int | None = Field(
        None, ge=1, description="Cap on eval problems per round (None = all)."
    )


class SplitConfig(_Section):
    easy_threshold: float = Field(
        0.75, ge=0, le=1, description="Pass rate >= this makes a problem easy (FDD)."
    )
    hard_threshold: float = Field(
        0.25, ge=0, le=1, description="Pass rate <= this makes a problem hard (FDD)."
    )

    @model_validator(mode="after")
    def _ordered(self) -> SplitConfig:
        if self.hard_threshold >= self.easy_threshold:
            raise ValueError("hard_threshold must be below easy_threshold")
        return self


class SynthesisConfig(_Section):
    enabled: bool = Field(True, description="Write new problems for the next round.")
    max_per_round: int | None = Field(
        None, ge=0, description="Cap on new problems kept per round (None = no cap)."
    )
    reference_samples: int = Field(
        8, ge=1, description="Teacher samples per new problem used to vote its reference answer."
    )
    agreement_threshold: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Share of the teacher's samples that must agree on the majority answer for "
        "a new problem to be kept.",
    )
    temperature: float = Field(0.8, ge=0, description="Temperature when writing problems.")
    max_new_tokens: int = Field(256, ge=1, description="Cap on a written problem's tokens.")
    min_question_chars: int = Field(20, ge=1, description="Shorter outputs are rejected.")
    max_question_chars: int = Field(1200, ge=1, description="Longer outputs are rejected.")
    dedup_ngram: int = Field(3, ge=1, description="Word n-gram size for near-duplicate checks.")
    dedup_threshold: float = Field(
        0.7, gt=0, le=1, description="Jaccard n-gram overlap at or above which a problem is a duplicate."
    )
    contamination_ngram: int = Field(
        8, ge=1, description="A shared word n-gram of this size with an eval problem rejects it."
    )


class PromptsConfig(_Section):
    """Templates use str.format fields; {question} and {problem} are filled in."""

    system: str | None = Field(
        None, description="System message for every prompt (None = the model's default)."
    )
    solve: str = Field(
        "Solve the following math problem. Reason step by step, then give the final answer "
        "in \\boxed{{}}.\n\n{question}",
        description="User message asking for a solution. Field: {question}.",
    )
    few_shot: list[tuple[str, str]] = Field(
        default_factory=list,
        description="(question, solution) pairs shown as earlier chat turns before the problem.",
    )
    harder: str = Field(
        "Here is a math word problem:\n\n{problem}\n\nWrite a new, harder version of this problem "
        "that needs one or two more reasoning steps and has a single numerical answer. "
        "Reply with the new problem only, starting with 'Problem:'.",
        description="User message asking for a harder variant of an easy problem. Field: {problem}.",
    )
    similar: str = Field(
        "Here is a math word problem:\n\n{problem}\n\nWrite a new problem of similar difficulty "
        "that uses the same kind of reasoning but different numbers and a different story, with "
        "a single numerical answer. Reply with the new problem only, starting with 'Problem:'.",
        description="User message asking for a similar new problem for a hard one. Field: {problem}.",
    )


# --------------------------------------------------------------------------- the run


class CatalogConfig(_Section):
    """Where the run's DuckLake catalog lives. Default: a local DuckLake in <workdir>/catalog."""

    uri: str | None = Field(
        None,
        description="DuckLake metadata catalog, e.g. 'postgres:dbname=lake host=pg user=stillhouse' "
        "(no password: use PGPASSWORD or ~/.pgpass) for a catalog shared across machines; "
        "None = <workdir>/catalog/metadata.ducklake.",
    )
    data_path: str | None = Field(
        None,
        description="Where the catalog's Parquet files go: a folder (a shared file system for a "
        "multi-machine run) or an object store, 's3://bucket/runs/<run>/' on AWS or any "
        "S3-compatible server. S3 credentials and server come from the environment of every "
        "process of the run: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (AWS_SESSION_TOKEN), "
        "AWS_REGION, and AWS_ENDPOINT_URL_S3 (or AWS_ENDPOINT_URL, e.g. http://minio:9000) for a "
        "non-AWS server; see docs/deployment.md. None = <workdir>/catalog/data/.",
    )

    @field_validator("data_path")
    @classmethod
    def _data_path_supported(cls, value: str | None) -> str | None:
        # Imported here: the storage package pulls in duckdb and pyarrow, which a config alone
        # (the vLLM venv's side, small tools) does not need.
        from stillhouse.storage.object_store import check_data_path

        return None if value is None else check_data_path(value)


class CostConfig(_Section):
    """The run's cost ledger (rounds/ledger.json) and an optional budget on the teacher's use.

    Teacher tokens (prompt + completion) are what a served teacher bills; the budget stops the run
    cleanly before a teacher step that would go past it (sampling: estimated from the tokens per
    request of the run's earlier sampling, else from max_new_tokens), and the run resumes where it
    stopped once the budget is raised."""

    input_price_per_million: float = Field(
        0.0, ge=0, description="Price of one million teacher prompt tokens (e.g. an OpenAI-compatible "
        "API's list price, in any currency); 0 = not priced.",
    )
    output_price_per_million: float = Field(
        0.0, ge=0, description="Price of one million teacher completion tokens; 0 = not priced.",
    )
    max_teacher_tokens: int | None = Field(
        None, ge=1, description="Budget: teacher tokens (prompt + completion) over the whole run; "
        "None = no token budget.",
    )
    max_cost: float | None = Field(
        None, gt=0, description="Budget: teacher cost over the whole run, in the prices' currency "
        "(needs a price); None = no money budget.",
    )

    @model_validator(mode="after")
    def _priced_if_money_budget(self) -> CostConfig:
        if self.max_cost is not None and not (self.input_price_per_million or self.output_price_per_million):
            raise ValueError("max_cost needs input_price_per_million or output_price_per_million")
        return self


class ExecutionConfig(_Section):
    """Where a round's model work runs. Default: in the round's own process, as a single machine does.

    With `work_pool` set, the teacher/student generations of sample, evaluate and synthesize fan out:
    each shard of a generation call (the unit the run's cache already resumes by) becomes a flow run
    of `shard_deployment` on that pool, picked up by whichever worker is free; the round waits,
    resubmits lost or crashed shards and reads the merged call from the run's cache, so the result
    is the in-process one. The LoRA training becomes one flow run of `train_deployment`, watched and
    resubmitted the same way. The run's workdir (and cache_dir) must be on storage every worker sees.
    """

    work_pool: str | None = Field(
        None,
        description="Prefect work pool of the GPU workers (e.g. 'gpu'); None = everything runs in the "
        "round's process. The shard deployment must be on this pool (checked before the first shard).",
    )
    shard_deployment: str = Field(
        "stillhouse-shard/gpu-shard",
        description="'<flow name>/<deployment name>' of the shard flow (stillhouse.flows.shards:run_shard), "
        "deployed on `work_pool` (deployment/prefect.yaml, deployment 'gpu-shard').",
    )
    shard_size: int | None = Field(
        None,
        ge=1,
        description="Requests per shard (one flow run, one cached Parquet part); None = the backend's "
        "cache shard (hf: 4 x batch size, vllm: >= 1024, openai: >= 4 x max_concurrency). It is part "
        "of the cache key of a generation call, in process too: keep it when moving a run between "
        "in-process and pool execution, or the finished parts are not found.",
    )
    train_deployment: str = Field(
        "stillhouse-train/gpu-train",
        description="'<flow name>/<deployment name>' of the training flow (stillhouse.flows.shards:run_train), "
        "deployed on `work_pool` (deployment/prefect.yaml, deployment 'gpu-train'); used when 'train' is in "
        "`steps`.",
    )
    steps: list[Literal["sample", "train", "evaluate", "synthesize"]] = Field(
        default_factory=lambda: ["sample", "train", "evaluate", "synthesize"],
        description="Which GPU steps run on the pool when work_pool is set: sample, evaluate and "
        "synthesize as one flow run per shard, train as one flow run of `train_deployment` (the "
        "adapter written into the run's workdir); the others run in the round's process.",
    )
    max_resubmits: int = Field(
        2, ge=0,
        description="Times one shard is resubmitted after its flow run crashed, failed, was cancelled or "
        "went silent (lost worker), before the step fails with each attempt's reason.",
    )
    heartbeat_s: float = Field(
        5.0, gt=0, description="A running shard touches its heartbeat file in the run's cache this often."
    )
    lost_after_s: float = Field(
        60.0, gt=0,
        description="A shard whose flow run is Running but whose heartbeat has not moved for this long "
        "(measured on the round's clock, so worker clocks need not agree) is lost: its flow run is "
        "marked Crashed and the shard resubmitted. A worker killed with -9 leaves its run Running "
        "forever; this is how the round notices.",
    )
    start_timeout_s: float = Field(
        300.0, gt=0,
        description="A shard whose flow run a worker has taken (Pending or Running) but that has not "
        "written its first heartbeat after this long is lost too. Starting a flow-run process (pull "
        "steps, imports) took 20-30 s on a loaded 2-core machine, so this is looser than lost_after_s.",
    )
    poll_s: float = Field(2.0, gt=0, description="Seconds between the round's looks at its shards.")

    @model_validator(mode="after")
    def _heartbeat_below_lost(self) -> ExecutionConfig:
        if self.heartbeat_s * 2 > self.lost_after_s:
            raise ValueError(f"heartbeat_s ({self.heartbeat_s}) must be at most half of lost_after_s "
                             f"({self.lost_after_s}), or a slow heartbeat reads as a lost shard")
        for name in ("shard_deployment", "train_deployment"):
            value = getattr(self, name)
            if "/" not in value.strip("/"):
                raise ValueError(f"{name} {value!r}: expected '<flow name>/<deployment name>'")
        return self


# A bound, not a target: each round adds a catalog version and a trained adapter, so a number past
# this is a typo (or `--rounds 100000000000000000000`), not a plan.
MAX_ROUNDS = 1000


class RunConfig(_Section):
    """Everything a multi-round distillation run needs."""

    run_name: str = Field(
        "stillhouse",
        min_length=1,
        max_length=100,
        description="Name shown in Prefect flow runs, artifacts and reports. Any letters (\"Präzision\" "
        "is fine: artifact keys are derived from it as lowercase ASCII with a hash suffix); not "
        "/ % & < > (Prefect refuses them in deployment names) nor control characters.",
    )
    workdir: str = Field(
        "runs/stillhouse", description="Run directory: catalog, Parquet intermediates, adapters."
    )
    rounds: int = Field(
        3, ge=1, le=MAX_ROUNDS, description=f"Number of rounds (round 0 = seed problems), at most {MAX_ROUNDS}."
    )
    cache_dir: str | None = Field(
        None,
        description="Folder of the content-addressed step outputs (teacher and student generations, "
        "verified and weighted samples, evaluations); None = <workdir>/cache. Runs may share one: "
        "every entry is keyed by everything that shaped it, so a run finds the work another run "
        "already did with identical inputs (`stillhouse experiment` gives its arms one cache, "
        "so the teacher samples once per seed, not once per arm). Not for runs writing at the "
        "same time.",
    )
    problems: list[SourceConfig] = Field(
        ..., min_length=1, description="Where the seed pool and the eval sets come from."
    )
    teacher: ModelConfig = Field(..., description="The teacher that writes rationales and problems.")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="Teacher sampling.")
    verifier: VerifierConfig = Field(default_factory=VerifierConfig, description="Answer checking.")
    rewards: RewardConfig = Field(default_factory=RewardConfig, description="Reward values.")
    weighting: WeightingConfig = Field(default_factory=WeightingConfig, description="Loss weights.")
    student: StudentConfig = Field(..., description="Student base model and LoRA shape.")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="LoRA training.")
    evaluation: EvalConfig = Field(default_factory=EvalConfig, description="Student evaluation.")
    split: SplitConfig = Field(default_factory=SplitConfig, description="Easy/hard thresholds.")
    synthesis: SynthesisConfig = Field(default_factory=SynthesisConfig, description="New problems.")
    prompts: PromptsConfig = Field(default_factory=PromptsConfig, description="Prompt templates.")
    catalog: CatalogConfig = Field(
        default_factory=CatalogConfig, description="Where the versioned datasets (DuckLake) live."
    )
    cost: CostConfig = Field(
        default_factory=CostConfig, description="Teacher token prices and an optional run budget."
    )
    execution: ExecutionConfig = Field(
        default_factory=ExecutionConfig,
        description="In process (default) or fanned out as shard flow runs over a GPU work pool.",
    )

    @model_validator(mode="before")
    @classmethod
    def _pot_prompts(cls, data: Any) -> Any:
        # A pot run whose config names no solve prompt would ask for \boxed{} text and then try to
        # run that text as a program: give it the PoT prompts (explicit ones always win).
        if not isinstance(data, dict) or not isinstance(data.get("verifier"), dict):
            return data
        if data["verifier"].get("rationale") != "pot":
            return data
        from stillhouse.tasks.prompts import POT_FEW_SHOT, POT_SOLVE

        prompts = dict(data.get("prompts") or {})
        prompts.setdefault("solve", POT_SOLVE)
        prompts.setdefault("few_shot", [list(pair) for pair in POT_FEW_SHOT])
        return {**data, "prompts": prompts}

    @field_validator("run_name")
    @classmethod
    def _run_name_usable_by_prefect(cls, value: str) -> str:
        # Checked here, before any model work: Prefect would refuse it only at its first use.
        bad = sorted({c for c in value if c in "/%&<>" or unicodedata.category(c).startswith("C")})
        if bad or not value.strip():
            shown = ", ".join(repr(c) for c in bad) or "only whitespace"
            raise ValueError(f"run_name {value!r} cannot be used as a Prefect name ({shown})")
        return value

    @field_validator("workdir", "cache_dir")
    @classmethod
    def _on_a_file_system(cls, value: str | None, info: ValidationInfo) -> str | None:
        # The workdir and the cache are read and written with local paths throughout (atomic
        # renames, file locks, Parquet intermediates): an object-store URL would become a folder
        # named "s3:" in the current directory. Only catalog.data_path can be an object store.
        if value is not None and "://" in value:
            raise ValueError(
                f"{info.field_name} {value!r} must be a file-system path: for a run over several "
                "machines, a shared file system (NFS, CephFS, Lustre, ...) mounted at the same path "
                "everywhere; an object store is supported for the catalog's data only "
                "(catalog.data_path: s3://...)"
            )
        return value

    @model_validator(mode="after")
    def _split_feeds_synthesis(self) -> RunConfig:
        if self.evaluation.pool_k == 0 and self.synthesis.enabled and self.rounds > 1:
            raise ValueError("evaluation.pool_k: 0 gives no easy/hard split, which synthesis needs; "
                             "set synthesis.enabled: false or pool_k >= 1")
        return self

    def section_dict(self, *names: str) -> dict[str, Any]:
        """The JSON form of the named sections: what a cached step's key is built from."""
        return {name: self.model_dump(mode="json")[name] for name in names}


class ConfigError(ValueError):
    """A config that failed validation; the message names each field's path and the reason."""


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = [f"invalid config {origin}:"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        lines.append(f"  {path}: {e['msg']}")
    return "\n".join(lines)


def parse_config(data: dict[str, Any], origin: str = "<dict>") -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, origin)) from None


def load_config(path: str | Path, **overrides: Any) -> RunConfig:
    """Load a YAML run config; top-level `overrides` (e.g. workdir, rounds) win over the file."""
    from stillhouse.tasks.bounded_yaml import YamlFileError, load_yaml_file

    path = Path(path)
    try:
        # Bounded: size, alias expansion, nesting, duplicate keys, UTF-8; the file named in each error.
        data = load_yaml_file(path)
    except YamlFileError as err:
        raise ConfigError(str(err)) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping at the top level")
    data.update({k: v for k, v in overrides.items() if v is not None})
    return parse_config(data, origin=str(path))
