"""Evaluation: HumanEval harness (problems, prompts, sandboxed checking, pass@k)."""
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
from .sandbox import RunResult, SandboxError, run_program

__all__ = [
    "DATA_WHEEL", "MODES", "STOP_SEQUENCES", "HumanEvalDataError", "RunResult", "SandboxError",
    "build_program", "chat_messages", "check", "check_many", "completion_prompt",
    "estimate_pass_at_k", "extract_completion", "load_problems", "pass_at_k", "run_program",
    "select_problems", "summarize", "truncate_at_stop", "wilson_interval",
]
