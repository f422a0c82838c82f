"""The Qwen tokenizer without transformers: ``tokenizers`` reads tokenizer.json, jinja2 renders the chat template.

Why: importing transformers and ``AutoTokenizer.from_pretrained`` cost ~2 s of every start, more than
mapping the ready tier's weights. For the Qwen tokenizers we run (``Qwen2Tokenizer``: byte-level BPE, no
BOS, special tokens in tokenizer.json) transformers' fast tokenizer *is* the ``tokenizers.Tokenizer`` of
tokenizer.json, and ``apply_chat_template`` is a jinja2 render with a fixed environment. This module
reproduces both (tests/test_tokenizer.py compares ids and rendered text with AutoTokenizer). Anything
else (another tokenizer class, added tokens that disagree with tokenizer.json) goes to transformers.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from qwen_runner.errors import CheckpointError

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG_FILE = "generation_config.json"
# Tokenizer classes whose transformers implementation adds nothing to tokenizer.json's pipeline.
SUPPORTED_CLASSES = ("Qwen2Tokenizer", "Qwen2TokenizerFast")
# transformers' SPECIAL_TOKENS_ATTRIBUTES: passed to the chat template as variables when set.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Names a message's reasoning may come under; templates read the first (transformers aliases them).
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json spells it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class QwenTokenizer:
    """The subset of transformers' tokenizer API the runtime uses, on ``tokenizers`` alone."""

    def __init__(self, backend, config: dict, chat_template: str | dict | None, path: Path | None = None):
        self._tk = backend
        self.path = path
        self.chat_template = chat_template
        self.special_tokens_map = {
            name: text for name in SPECIAL_TOKEN_NAMES if (text := _token_text(config.get(name))) is not None
        }

    @classmethod
    def from_dir(cls, path: str | Path) -> QwenTokenizer:
        """Load from a checkpoint directory; CheckpointError if the files are missing or unreadable."""
        from tokenizers import Tokenizer

        path = Path(path)
        config = _read_json(path / TOKENIZER_CONFIG_FILE)
        try:
            backend = Tokenizer.from_file(str(path / TOKENIZER_FILE))
        except Exception as err:  # noqa: BLE001 - tokenizers raises its own exception type for bad files
            raise CheckpointError(f"cannot load {path / TOKENIZER_FILE}: {err}") from None
        return cls(backend, config, _chat_template(path, config), path)

    # ----------------------------------------------------------------------------------- token ids

    def __getattr__(self, name: str):
        # bos_token_id, eos_token_id, pad_token_id, unk_token_id, ...: None when the token is not set.
        if name.endswith("_token_id") and name[: -len("_id")] in SPECIAL_TOKEN_NAMES:
            text = self.special_tokens_map.get(name[: -len("_id")])
            return None if text is None else self._tk.token_to_id(text)
        if name in SPECIAL_TOKEN_NAMES:
            return self.special_tokens_map.get(name)
        raise AttributeError(name)

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]):
        """Like transformers: an unknown token gives the unk id (None for Qwen, which has no unk)."""
        if isinstance(tokens, str):
            found = self._tk.token_to_id(tokens)
            return self.unk_token_id if found is None else found
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def __len__(self) -> int:
        return self._tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tk.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": self.encode(text, add_special_tokens=add_special_tokens)}

    def decode(self, ids: Sequence[int] | int, skip_special_tokens: bool = False) -> str:
        ids = [ids] if isinstance(ids, int) else [int(i) for i in ids]
        return self._tk.decode(ids, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------------------- chat template

    def apply_chat_template(self, conversation: list[dict], add_generation_prompt: bool = False,
                            tokenize: bool = True, return_dict: bool = True, tools: list[dict] | None = None,
                            documents: list[dict] | None = None, **kwargs):
        """transformers' apply_chat_template for one conversation: the rendered text, or its ids
        (``{"input_ids": [...]}`` with ``return_dict``, as transformers returns)."""
        if not conversation:
            raise ValueError("Cannot apply chat template to an empty conversation. Provide at least one message.")
        messages = [_aliased({k: v for k, v in m.items() if v is not None}) for m in conversation]
        template = self._template(tools)
        text = template.render(messages=messages, tools=tools, documents=documents,
                               add_generation_prompt=add_generation_prompt, **{**self.special_tokens_map, **kwargs})
        if not tokenize:
            return text
        ids = self.encode(text, add_special_tokens=False)
        return {"input_ids": ids} if return_dict else ids

    def _template(self, tools):
        template = self.chat_template
        if isinstance(template, dict):
            name = "tool_use" if tools is not None and "tool_use" in template else "default"
            if name not in template:
                raise CheckpointError(f"the tokenizer has several chat templates and no default: {sorted(template)}")
            template = template[name]
        if template is None:
            raise CheckpointError(f"no chat template in {self.path}", "use `generate` (raw completion) for this model")
        return _compiled(template)


# ----------------------------------------------------------------------------------------- loading


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from None
    return data if isinstance(data, dict) else {}


def _chat_template(path: Path, config: dict) -> str | dict | None:
    """chat_template.jinja (transformers >= 4.43 saves it there) wins over tokenizer_config's field,
    which is a string or a list of ``{"name", "template"}``."""
    file = path / CHAT_TEMPLATE_FILE
    if file.is_file():
        return file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        return {t["name"]: t["template"] for t in template if isinstance(t, dict) and "name" in t}
    return template


def _aliased(message: dict) -> dict:
    """transformers fills ``reasoning_content`` (and ``thinking``) from whichever reasoning name is set."""
    reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
    return message if reasoning is None else {"thinking": reasoning, **message, "reasoning_content": reasoning}


_COMPILED: dict[str, object] = {}


def _compiled(template: str):
    """The template compiled in transformers' environment (sandboxed, trim/lstrip blocks, its globals)."""
    hit = _COMPILED.get(template)
    if hit is None:
        hit = _COMPILED[template] = _environment().from_string(template)
    return hit


def _environment():
    import jinja2
    from datetime import datetime
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """``{% generation %}...{% endgeneration %}`` marks assistant text for masks; rendering keeps the body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Not jinja's own tojson, which escapes HTML characters (transformers overrides it the same way).
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       dict=TemplateDict(), namespace=TemplateNamespace)
    return env


def supported_reason(path: Path) -> str | None:
    """Why this checkpoint's tokenizer needs transformers (None: the lean tokenizer reproduces it)."""
    config = _read_json(path / TOKENIZER_CONFIG_FILE)
    cls = config.get("tokenizer_class")
    if cls not in SUPPORTED_CLASSES:
        return f"tokenizer_class {cls!r}"
    if not (path / TOKENIZER_FILE).is_file():
        return f"no {TOKENIZER_FILE}"
    return None


def _added_tokens_agree(tokenizer: QwenTokenizer, config: dict) -> str | None:
    """transformers adds tokenizer_config's added tokens; ours only knows tokenizer.json's: they must match."""
    for token_id, entry in (config.get("added_tokens_decoder") or {}).items():
        text = _token_text(entry)
        if text is not None and tokenizer._tk.token_to_id(text) != int(token_id):
            return f"added token {text!r} ({token_id}) is not in {TOKENIZER_FILE}"
    for name, text in tokenizer.special_tokens_map.items():
        if tokenizer._tk.token_to_id(text) is None:
            return f"{name} {text!r} is not in {TOKENIZER_FILE}"
    return None


def load_tokenizer(path: str | Path):
    """The checkpoint's tokenizer: the lean one when it reproduces transformers', else AutoTokenizer."""
    path = Path(path)
    reason = supported_reason(path)
    if reason is None:
        tokenizer = QwenTokenizer.from_dir(path)
        reason = _added_tokens_agree(tokenizer, _read_json(path / TOKENIZER_CONFIG_FILE))
        if reason is None:
            return tokenizer
    log.info("tokenizer of %s loaded through transformers (%s)", path.name, reason)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot load the tokenizer from {path}: {err}") from err


def generation_eos_ids(path: Path) -> list[int]:
    """generation_config.json's eos_token_id (an int or a list), read without transformers."""
    eos = _read_json(path / GENERATION_CONFIG_FILE).get("eos_token_id")
    if isinstance(eos, int):
        return [eos]
    return [e for e in eos if isinstance(e, int)] if isinstance(eos, list) else []
