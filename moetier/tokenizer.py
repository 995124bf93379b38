"""Tokenizer, chat template and stop tokens, read from the checkpoint directory.

tokenizer.json through the `tokenizers` library; the chat template from chat_template.jinja or
tokenizer_config.json, rendered with jinja2 the way HF templates expect (sandboxed, trimmed
blocks, loop controls, tojson, raise_exception); stop tokens from generation_config.json.
"""

import json
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.sandbox
from tokenizers import Tokenizer as HFTokenizer

from moetier.errors import CheckpointError, MoetierError


def _token_text(value) -> str | None:
    """tokenizer_config stores special tokens as strings or as {"content": ...} dicts."""
    return value.get("content") if isinstance(value, dict) else value


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


def _raise_exception(message: str):
    raise MoetierError(f"chat template rejected the messages: {message}")


def _tojson(value, indent=None, ensure_ascii=False, sort_keys=False, separators=None):
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys, separators=separators)


def _compile_template(source: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def read_stop_token_ids(model_dir: Path, model_config: dict, tokenizer: "Tokenizer | None") -> frozenset[int]:
    """eos ids from generation_config.json, else config.json, else the tokenizer's eos token."""
    eos = _read_json(model_dir / "generation_config.json").get("eos_token_id", model_config.get("eos_token_id"))
    if eos is None and tokenizer is not None and "eos_token" in tokenizer.special_tokens:
        eos = tokenizer.hf.token_to_id(tokenizer.special_tokens["eos_token"])
    ids = eos if isinstance(eos, list) else [eos]
    return frozenset(i for i in ids if i is not None)


class Tokenizer:
    @classmethod
    def from_dir(cls, model_dir: Path) -> "Tokenizer | None":
        """None when the directory has no tokenizer.json (e.g. a config-only dummy model)."""
        return cls(model_dir) if (model_dir / "tokenizer.json").is_file() else None

    def __init__(self, model_dir: Path):
        try:
            self.hf = HFTokenizer.from_file(str(model_dir / "tokenizer.json"))
        except Exception as e:
            raise CheckpointError(f"{model_dir / 'tokenizer.json'} could not be read: {e}") from None
        self.config = _read_json(model_dir / "tokenizer_config.json")
        self.special_tokens = {
            key: _token_text(self.config[key])
            for key in ("bos_token", "eos_token", "unk_token", "pad_token")
            if self.config.get(key) is not None
        }
        self.chat_template = self._load_template(model_dir)

    def _load_template(self, model_dir: Path) -> jinja2.Template | None:
        jinja_file = model_dir / "chat_template.jinja"
        source = jinja_file.read_text() if jinja_file.is_file() else self.config.get("chat_template")
        if isinstance(source, list):  # named templates: use "default"
            source = next((t["template"] for t in source if t.get("name") == "default"), None)
        return _compile_template(source) if source else None

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: list[int]) -> str:
        return self.hf.decode(token_ids, skip_special_tokens=True)

    def decode_increment(
        self, token_ids: list[int], prefix_offset: int, read_offset: int, final: bool = False
    ) -> tuple[str, int, int]:
        """Text that token_ids[read_offset:] adds, decoding only a short window (O(1) per token):
        the new tokens are decoded together with the previous chunk, token_ids[prefix_offset:read_offset],
        and what that chunk alone decodes to is cut off. Waits while the text ends in an incomplete
        UTF-8 sequence unless final. Returns (new text, new prefix_offset, new read_offset)."""
        prefix_text = self.decode(token_ids[prefix_offset:read_offset])
        full_text = self.decode(token_ids[prefix_offset:])
        if len(full_text) > len(prefix_text) and (final or not full_text.endswith("\ufffd")):
            return full_text[len(prefix_text) :], read_offset, len(token_ids)
        return "", prefix_offset, read_offset

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self.chat_template is None:
            raise MoetierError("this model has no chat template (chat_template.jinja or tokenizer_config.json)")
        for message in messages:
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise MoetierError("each chat message needs a 'role' and a 'content'")
        return self.chat_template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens
        )

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return self.encode(self.apply_chat_template(messages), add_special_tokens=False)
