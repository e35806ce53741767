"""Evaluation: HumanEval harness (problems, prompts, sandboxed checking, pass@k), resumable runs,
sparsity sweeps and their reports."""
from .humaneval import (
    DATA_WHEEL,
    MODES,
    STOP_SEQUENCES,
    HumanEvalDataError,
    build_program,
    chat_messages,
    check,
    check_many,
    completion_prompt,
    estimate_pass_at_k,
    extract_completion,
    load_problems,
    pass_at_k,
    select_problems,
    summarize,
    truncate_at_stop,
    wilson_interval,
)
from .knobs import Point, configure
from .report import write_report
from .run import EvalSettingsError, evaluate
from .sandbox import RunResult, SandboxError, run_program
from .sweep import sweep

__all__ = [
    "DATA_WHEEL",
    "MODES",
    "STOP_SEQUENCES",
    "EvalSettingsError",
    "HumanEvalDataError",
    "Point",
    "RunResult",
    "SandboxError",
    "build_program",
    "chat_messages",
    "check",
    "check_many",
    "completion_prompt",
    "configure",
    "estimate_pass_at_k",
    "evaluate",
    "extract_completion",
    "load_problems",
    "pass_at_k",
    "run_program",
    "select_problems",
    "summarize",
    "sweep",
    "truncate_at_stop",
    "wilson_interval",
    "write_report",
]
