"""Prompt tokenization on the deploy side: the token ids and attention mask that diffusers' NucleusMoEImagePipeline
gets from its Qwen3VLProcessor, made from two bundle files with the `tokenizers` library alone.

`tokenizer.json` is the processor's fast-tokenizer backend (normalizer, pre-tokenizer, BPE model, added and special
tokens, post-processor), saved without padding or truncation state; `prompt_template.json` is a PromptTemplate: the
chat template rendered around the prompt as prefix + prompt + suffix, the system prompt in it, and the padding and
truncation rules of the pipeline's processor call. nucleus_export.model.prompt_template writes both, after checking
that this module reproduces the processor on a battery of prompts.

Each prompt is tokenized as the whole rendered string: the normalizer (NFC), the pre-tokenizer and the BPE merges
work across the template boundary (a prompt that starts with a newline merges with the newline ending the prefix),
so the prefix's ids followed by the prompt's ids are not the processor's ids. How many leading ids a prompt does
share with the prefix alone is common_prefix_length(ids, tokenizer.prefix_ids): the only part a cache of the text
encoder's states for the fixed prefix may serve.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from nucleus_runtime.contract import PROMPT_TEMPLATE_FILE
from nucleus_runtime.errors import NucleusError

FORMAT_VERSION = 1

_SIDES = ("right", "left")
_REWRITE = (
    "write the bundle's tokenizer files again from the diffusers pipeline "
    "(nucleus_export.model.prompt_template.write_tokenizer_files)."
)


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
    """prompt_template.json: what the pipeline's processor does to a prompt around tokenizing it."""

    prefix: str  # the rendered chat template before the user's text: system message, user turn opener
    suffix: str  # after it: end of the user turn, assistant turn opener (add_generation_prompt)
    system_prompt: str  # the system message rendered into prefix
    chat_template_sha256: str  # which chat template this record was rendered from
    max_length: int  # truncation length, the pipeline's max_sequence_length
    pad_to_multiple_of: int  # a batch is padded to its longest sequence rounded up to a multiple of this
    padding_side: str  # "right" or "left": where pad ids go
    pad_token: str
    pad_token_id: int
    truncation_side: str  # "right" or "left": which end of an over-long sequence is cut
    add_special_tokens: bool  # whether the tokenizer's post-processor runs (the processor call's default: yes)
    split_special_tokens: bool  # False: special-token text in a prompt ("<|im_end|>") becomes that special id
    # Multimodal placeholders ("<|image_pad|>"): the processor raises on text holding one when no image is passed.
    forbidden_substrings: tuple[str, ...]
    padding: str = "longest"  # the only strategies the pipeline uses, recorded so a reader need not know that
    truncation: str = "longest_first"
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = PROMPT_TEMPLATE_FILE) -> PromptTemplate:
        """Parse and validate a record; any problem is a NucleusError naming `source` and the field."""
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise NucleusError(f"{source} is not JSON ({e}).", _REWRITE) from None
        if not isinstance(raw, dict):
            raise NucleusError(f"{source} holds a JSON {type(raw).__name__}, not an object.", _REWRITE)
        if raw.get("format_version") != FORMAT_VERSION:
            raise NucleusError(
                f"{source} has format_version {raw.get('format_version')!r}; this runtime reads {FORMAT_VERSION}.",
                "use a runtime of the exporter's version, or " + _REWRITE,
            )
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        missing = sorted(fields.keys() - raw.keys())
        unknown = sorted(raw.keys() - fields.keys())
        if missing or unknown:
            raise NucleusError(f"{source} lacks fields {missing} / has unknown fields {unknown}.", _REWRITE)
        for name, kind in fields.items():
            _check_field(source, name, kind, raw[name])
        record = cls(**{**raw, "forbidden_substrings": tuple(raw["forbidden_substrings"])})
        record._check_values(source)
        return record

    def _check_values(self, source: str) -> None:
        rules = [
            (self.padding_side in _SIDES, "padding_side", "'right' or 'left'"),
            (self.truncation_side in _SIDES, "truncation_side", "'right' or 'left'"),
            (self.padding == "longest", "padding", "'longest'"),
            (self.truncation == "longest_first", "truncation", "'longest_first'"),
            (self.max_length >= 1, "max_length", "at least 1"),
            (self.pad_to_multiple_of >= 1, "pad_to_multiple_of", "at least 1"),
        ]
        for ok, name, expected in rules:
            if not ok:
                raise NucleusError(f"{source}: {name} is {getattr(self, name)!r}, expected {expected}.", _REWRITE)


def _check_field(source: str, name: str, kind: str, value: Any) -> None:
    # Annotations are strings here (postponed evaluation); bool is refused where an int is meant.
    ok = {
        "str": isinstance(value, str),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "tuple[str, ...]": isinstance(value, list) and all(isinstance(v, str) for v in value),
    }[kind]
    if not ok:
        raise NucleusError(f"{source}: field {name!r} is {value!r}, expected {kind}.", _REWRITE)


def common_prefix_length(ids: Sequence[int], prefix_ids: Sequence[int]) -> int:
    """How many leading ids of `ids` (one prompt, unpadded) equal `prefix_ids` (the template prefix alone).

    Shorter than len(prefix_ids) when the prompt's first characters merged into the prefix's last tokens."""
    n = 0
    for a, b in zip(ids, prefix_ids):
        if a != b:
            break
        n += 1
    return n


class PromptTokenizer:
    """Token ids and attention masks of prompts, identical to what the pipeline's processor call returns."""

    def __init__(self, tokenizer: Tokenizer, template: PromptTemplate):
        """Takes `tokenizer` over: its truncation, padding and special-token settings are set from `template`."""
        if tokenizer.token_to_id(template.pad_token) != template.pad_token_id:
            raise NucleusError(
                f"the tokenizer gives pad token {template.pad_token!r} id {tokenizer.token_to_id(template.pad_token)},"
                f" the prompt template records {template.pad_token_id}: the two files do not belong together.",
                _REWRITE,
            )
        # Padding is done here (pad) so that prompts encoded one at a time can be batched the processor's way.
        tokenizer.no_padding()
        tokenizer.enable_truncation(
            template.max_length, stride=0, strategy=template.truncation, direction=template.truncation_side
        )
        tokenizer.encode_special_tokens = template.split_special_tokens
        self._tokenizer = tokenizer
        self.template = template
        self.prefix_ids: list[int] = self._tokenizer.encode(
            template.prefix, add_special_tokens=template.add_special_tokens
        ).ids

    @classmethod
    def from_files(cls, tokenizer_json: str | Path, template_json: str | Path) -> PromptTokenizer:
        template = PromptTemplate.from_json(_read(Path(template_json), "prompt template"), str(template_json))
        try:
            tokenizer = Tokenizer.from_str(_read(Path(tokenizer_json), "tokenizer"))
        except Exception as e:  # the Rust parser's errors are plain Exceptions
            reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            raise NucleusError(f"tokenizer file {tokenizer_json} is not a tokenizers tokenizer.json ({reason}).",
                               _REWRITE) from None
        return cls(tokenizer, template)

    def format(self, prompt: str) -> str:
        """The processor's input text for `prompt`: the chat template rendered around it."""
        return self.template.prefix + prompt + self.template.suffix

    def encode_one(self, prompt: str) -> list[int]:
        """Unpadded ids of one prompt, truncated as the processor truncates."""
        return self._encode([prompt])[0]

    def encode(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """input_ids and attention_mask, int64 [B, T], of `prompts` as one padded batch."""
        return self.pad(self._encode(prompts))

    def pad(self, sequences: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """The processor's batch padding of unpadded id lists: to the longest, rounded up to pad_to_multiple_of."""
        if len(sequences) == 0:
            raise NucleusError("no sequences to pad.", "pass at least one list of token ids.")
        multiple = self.template.pad_to_multiple_of
        length = -(-max(len(s) for s in sequences) // multiple) * multiple
        ids = np.full((len(sequences), length), self.template.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(sequences), length), dtype=np.int64)
        for row, seq in enumerate(sequences):
            start = 0 if self.template.padding_side == "right" else length - len(seq)
            ids[row, start : start + len(seq)] = seq
            mask[row, start : start + len(seq)] = 1
        return ids, mask

    def _encode(self, prompts: Sequence[str]) -> list[list[int]]:
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise NucleusError(
                f"prompts must be a list of str, got a {type(prompts).__name__}.",
                "pass a list, e.g. encode([prompt]).",
            )
        if len(prompts) == 0:
            raise NucleusError("no prompts to encode.", "pass at least one prompt.")
        texts = []
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise NucleusError(f"prompt {i} is a {type(prompt).__name__}, not a str.", "pass prompts as text.")
            text = self.format(prompt)
            for placeholder in self.template.forbidden_substrings:
                if placeholder in text:
                    raise NucleusError(
                        f"prompt {i} contains {placeholder!r}, a multimodal placeholder the processor refuses "
                        "in text-only input.",
                        f"remove {placeholder!r} from the prompt.",
                    )
            texts.append(text)
        encodings = self._tokenizer.encode_batch(texts, add_special_tokens=self.template.add_special_tokens)
        return [e.ids for e in encodings]


def _read(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NucleusError(f"{what} file {path} not found.", _REWRITE) from None
    except (OSError, UnicodeDecodeError) as e:
        raise NucleusError(f"{what} file {path} cannot be read ({e}).", _REWRITE) from None
