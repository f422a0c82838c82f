"""chat and generate as a user drives them: one-shot, piped, and a real REPL session (pexpect)."""

from __future__ import annotations

import os
import re
import sys

import pytest

from tests.conftest import REPO, default_sigint, model_path

STATS = re.compile(r"\[(\d+) tokens · ([\d.]+) tok/s · TTFT ([\d.]+) s")


def test_generate_prints_text_and_stats(cli):
    result = cli("--threads", "1", "generate", str(model_path("tiny-qwen3-moe")), "--prompt", "Hello",
                 "--max-tokens", "5", "--dtype", "fp32")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    match = STATS.search(result.stderr)
    assert match and int(match.group(1)) == 5


def test_prompt_longer_than_the_context_is_one_line(cli):
    result = cli("generate", str(model_path("tiny-qwen3-moe")), "--prompt", "word " * 50, "--max-context", "16")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "context holds 16" in result.stderr and "hint:" in result.stderr


def test_bad_sampling_option_is_one_line(cli):
    result = cli("generate", str(model_path("tiny-qwen3-moe")), "--prompt", "x", "--top-p", "0")
    assert result.returncode == 1 and "top_p" in result.stderr and "Traceback" not in result.stderr


def test_chat_reads_a_piped_prompt(cli):
    import subprocess

    result = subprocess.run(
        [sys.executable, "-m", "qwen_runner", "--threads", "1", "chat", str(model_path("tiny-qwen3-moe")),
         "--temperature", "0", "--max-tokens", "4"],
        input="Hi!", capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    assert STATS.search(result.stderr) and result.stdout.strip()


@pytest.mark.slow
def test_repl_session_on_the_demo_model():
    """The main job: France -> Paris, a follow-up, /reset, Ctrl-C mid-answer, /exit."""
    pexpect = pytest.importorskip("pexpect")
    env = {**os.environ, "QWEN_RUNNER_CACHE": str(REPO / ".pytest_cache" / "qwen-runner")}
    child = pexpect.spawn(
        sys.executable, ["-m", "qwen_runner", "chat", str(model_path("demo")), "--temperature", "0",
                         "--max-tokens", "200"],
        cwd=str(REPO), env=env, encoding="utf-8", timeout=180, dimensions=(40, 200), preexec_fn=default_sigint,
    )
    try:
        child.expect_exact(">>> ")
        child.sendline("What is the capital of France?")
        child.expect(STATS)
        assert "Paris" in child.before
        child.expect_exact(">>> ")

        child.sendline("What river flows through that city? Answer in one short sentence.")
        child.expect(STATS)
        assert "Seine" in child.before
        child.expect_exact(">>> ")

        child.sendline("/reset")
        child.expect_exact("[conversation reset]")
        child.expect_exact(">>> ")

        essay = "Write a long, detailed essay about the history of Europe."
        child.sendline(essay)
        child.expect_exact(essay)  # the terminal's echo of the input
        child.expect(r"\w+ \w+ \w+ \w+ \w+")  # the answer is streaming
        child.sendintr()
        child.expect(r"interrupted\]")  # the stats line ends with it: the answer was cut short
        child.expect_exact(">>> ")

        child.sendline("What is the capital of France?")
        child.expect(STATS)
        assert "Paris" in child.before
        child.expect_exact(">>> ")

        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_chat_build_cache_then_loads_the_ready_tier(tmp_path):
    import subprocess

    env = {**os.environ, "QWEN_RUNNER_CACHE": str(tmp_path)}
    args = [sys.executable, "-m", "qwen_runner", "-v", "--threads", "1", "chat", str(model_path("tiny-qwen3-moe")),
            "--temperature", "0", "--max-tokens", "3"]
    first = subprocess.run([*args, "--build-cache"], input="Hi", capture_output=True, text=True, timeout=300,
                           cwd=REPO, env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "(ready tier)" in first.stderr and STATS.search(first.stderr)
    listing = subprocess.run([sys.executable, "-m", "qwen_runner", "cache", "ls"], capture_output=True, text=True,
                             cwd=REPO, env=env)
    assert "tiny-qwen3-moe" in listing.stdout
    second = subprocess.run(args, input="Hi", capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert "(ready tier)" in second.stderr and second.stdout == first.stdout
