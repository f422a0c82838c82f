"""Multi-turn chat over the generation engine, and the interactive REPL around it.

``ChatSession`` owns the history and one ``PromptCache``: each turn renders the whole
history through the tokenizer's chat template, and the engine prefills only the tokens
after the prefix the cache already holds.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from qwen_runner.errors import ContextOverflowError
from qwen_runner.generate import GenerationEvent, GenerationStats, PromptCache, stream_generate
from qwen_runner.sampling import SamplingParams

log = logging.getLogger(__name__)

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
DIM, RESET = "\033[2m", "\033[0m"
# History trimming keeps room for an answer of this share of the context at least.
ANSWER_RESERVE_FRACTION = 0.25
HELP = """commands:
  /help              this help
  /reset             forget the conversation (keeps the system prompt)
  /stats             statistics of the last answer
  /think, /no_think  turn Qwen3 thinking on or off
  /exit              leave (Ctrl-D too)
input: end a line with \\ to continue it, or wrap several lines in triple quotes (\"\"\").
Ctrl-C stops an answer and returns to the prompt."""


def eos_token_ids(tokenizer, model_dir: Path | None = None) -> list[int]:
    """Every token that ends an answer: the tokenizer's EOS, generation_config's, and <|im_end|>."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    for token in ("<|im_end|>", "<|endoftext|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    if model_dir is not None:
        from qwen_runner.tokenizer import generation_eos_ids

        ids.update(generation_eos_ids(model_dir))
    return sorted(ids)


@dataclass
class ChatSession:
    model: object
    tokenizer: object
    max_context: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int = 1024
    system: str | None = None
    think: bool = False
    eos_ids: list[int] = field(default_factory=list)
    bytes_per_token: int | None = None
    messages: list[dict] = field(default_factory=list)
    last_stats: GenerationStats | None = None

    def __post_init__(self):
        self.prompt_cache = PromptCache(self.model, self.max_context)
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.prompt_cache.reset()
        self.last_stats = None

    def render(self, messages: list[dict]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, enable_thinking=self.think,
        )
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def _fit(self, messages: list[dict]) -> list[int]:
        """Render, dropping the oldest exchanges (never the system prompt or the new message) to fit.

        Rule: the prompt must leave room for min(max_tokens, a quarter of the context) answer tokens.
        """
        budget = self.max_context - min(self.max_tokens, int(self.max_context * ANSWER_RESERVE_FRACTION))
        ids = self.render(messages)
        first = 1 if messages and messages[0]["role"] == "system" else 0
        while len(ids) > budget and len(messages) - first > 1:
            dropped = messages.pop(first)
            log.info("context full: dropped the oldest %s message from the history", dropped["role"])
            ids = self.render(messages)
        if len(ids) >= self.max_context:
            raise ContextOverflowError(
                f"the message needs {len(ids)} tokens with the template but the context holds {self.max_context}",
                "shorten the message or raise --max-context",
            )
        return ids

    def ask(self, text: str) -> Iterator[GenerationEvent]:
        """One turn: yields the answer's events; the history keeps what was actually said."""
        messages = self.messages + [{"role": "user", "content": text}]
        prompt = self._fit(messages)
        answer = []
        for event in stream_generate(
            self.model, self.tokenizer, prompt,
            prompt_cache=self.prompt_cache, max_tokens=self.max_tokens, sampling=self.sampling,
            eos_token_ids=self.eos_ids, bytes_per_token=self.bytes_per_token,
        ):
            answer.append(event.text)
            if event.stats is not None:
                self.last_stats = event.stats
            yield event
        self.messages = messages + [{"role": "assistant", "content": "".join(answer)}]


def format_stats(stats: GenerationStats) -> str:
    parts = [
        f"{stats.generated_tokens} tokens",
        f"{stats.decode_tps:.1f} tok/s",
        f"TTFT {stats.ttft_seconds:.2f} s" if stats.ttft_seconds is not None else "TTFT -",
        f"prefill {stats.prefill_tokens} tok @ {stats.prefill_tps:.0f} tok/s",
    ]
    if stats.reused_tokens:
        parts.append(f"{stats.reused_tokens} reused")
    if stats.gbps:
        parts.append(f"{stats.gbps:.1f} GB/s")
    parts.append(f"peak RSS {stats.peak_rss_bytes / (1 << 30):.2f} GiB")
    if stats.finish_reason not in ("eos", "stop"):
        parts.append(stats.finish_reason)
    return "[" + " · ".join(parts) + "]"


class ThinkingPrinter:
    """Prints streamed text, showing <think>...</think> dimmed, or hiding it."""

    def __init__(self, write: Callable[[str], None], show: bool = True, color: bool = True):
        self.write, self.show, self.color = write, show, color
        self.thinking = False

    def __call__(self, text: str) -> None:
        while text:
            marker = THINK_CLOSE if self.thinking else THINK_OPEN
            before, found, text = text.partition(marker)
            self._emit(before)
            if found:
                self.thinking = not self.thinking
                if self.color and self.show:
                    self.write(DIM if self.thinking else RESET)

    def _emit(self, text: str) -> None:
        if text and (self.show or not self.thinking):
            self.write(text)

    def end(self) -> None:
        if self.thinking and self.color:
            self.write(RESET)
        self.thinking = False


def read_message(prompt: str = ">>> ", more: str = "... ") -> str:
    """One message: a line, lines continued with a trailing backslash, or a triple-quoted block."""
    line = input(prompt)
    if line.lstrip().startswith('"""'):
        lines = [line.lstrip()[3:]]
        while not lines[-1].rstrip().endswith('"""'):
            lines.append(input(more))
        lines[-1] = lines[-1].rstrip()[:-3]
        return "\n".join(lines).strip()
    lines = [line]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        lines.append(input(more))
    return "\n".join(lines)


def _enable_readline(history_file: Path) -> None:
    try:
        import readline
    except ImportError:  # not every Python has it
        return
    history_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        readline.read_history_file(history_file)
    except OSError:
        pass
    import atexit

    def save():
        try:
            readline.write_history_file(history_file)
            os.chmod(history_file, 0o600)
        except OSError:
            pass

    atexit.register(save)


def answer(session: ChatSession, text: str, out=sys.stdout, show_thinking: bool = True,
           color: bool = False, stats_out=None) -> GenerationStats | None:
    """Stream one answer to ``out`` and print the stats line (to ``stats_out``, default ``out``).

    Ctrl-C stops the answer cleanly: the cache stays consistent and the REPL goes on.
    """
    stats_out = stats_out or out
    printer = ThinkingPrinter(lambda s: (out.write(s), out.flush()), show_thinking, color)
    events = session.ask(text)
    stats = None
    try:
        for event in events:
            printer(event.text)
            stats = event.stats or stats
    except KeyboardInterrupt:
        events.close()
        stats = None
    printer.end()
    out.write("\n")
    out.flush()
    line = format_stats(stats) if stats is not None else "[interrupted]"
    stats_out.write((f"{DIM}{line}{RESET}" if color else line) + "\n")
    stats_out.flush()
    return stats


def run_repl(session: ChatSession, banner: str, history_file: Path, show_thinking: bool = True) -> None:
    color = sys.stdout.isatty()
    _enable_readline(history_file)
    print(banner)
    print("Type /help for commands, /exit or Ctrl-D to leave.")
    while True:
        try:
            text = read_message()
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print()
            continue
        command = text.strip()
        if not command:
            continue
        if command in ("/exit", "/quit", "/bye"):
            return
        if command == "/help":
            print(HELP)
        elif command == "/reset":
            session.reset()
            print("[conversation reset]")
        elif command == "/stats":
            print(format_stats(session.last_stats) if session.last_stats else "[no answer yet]")
        elif command in ("/think", "/no_think"):
            session.think = command == "/think"
            print(f"[thinking {'on' if session.think else 'off'}]")
        elif command.startswith("/"):
            print(f"[unknown command {command}; /help lists them]")
        else:
            try:
                answer(session, text, show_thinking=show_thinking, color=color)
            except ContextOverflowError as err:
                print(f"[{err.message}; {err.hint}]")


def start_chat(loaded, *, prompt: str | None, system: str | None, think: bool, show_thinking: bool,
               max_context: int, max_tokens: int, sampling: SamplingParams, history_file: Path,
               threads: int) -> None:
    """`qwen-runner chat`: one-shot when a prompt is given or piped in, else the REPL."""
    session = ChatSession(
        loaded.model, loaded.tokenizer, max_context=max_context, sampling=sampling, max_tokens=max_tokens,
        system=system, think=think, eos_ids=eos_token_ids(loaded.tokenizer, loaded.path),
        bytes_per_token=loaded.bytes_per_token,
    )
    if prompt is None and not sys.stdin.isatty():
        prompt = sys.stdin.read().strip()
    if prompt:
        answer(session, prompt, show_thinking=show_thinking, stats_out=sys.stderr)
        return
    source = "ready tier" if loaded.from_ready else "checkpoint"
    banner = (f"qwen-runner chat · {loaded.path.name} · {loaded.dtype.dtype} · {threads} threads · "
              f"loaded from the {source} in {loaded.load_seconds:.1f} s")
    if not loaded.from_ready:
        banner += (f"\n(start in seconds next time: `qwen-runner build-cache {loaded.path}`, "
                   "or add --build-cache to this command)")
    run_repl(session, banner, history_file, show_thinking)
