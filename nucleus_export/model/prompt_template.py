"""The bundle's tokenizer files, from a diffusers NucleusMoEImagePipeline's Qwen3VLProcessor and checked against it.

The pipeline formats a prompt with its `_format_prompt` (processor.apply_chat_template over a system message and the
user's text, add_generation_prompt=True), then calls processor(text=..., padding="longest", pad_to_multiple_of=8,
max_length=max_sequence_length, truncation=True, return_attention_mask=True). The runtime
(nucleus_runtime.tokenizer) redoes that from tokenizer.json (the processor's tokenizer backend) and
prompt_template.json (a PromptTemplate). The template is kept as prefix + prompt + suffix, which only holds if the
chat template inserts the prompt verbatim: PROBE_PROMPTS check it and a template that strips or escapes the text is
refused. Then the runtime tokenizer built from the two files must give the processor's ids and masks on the probes,
one at a time and as one batch, before anything is written: a processor rule the record misses fails the export,
not a deployment.
"""

from __future__ import annotations

import hashlib
import json
import types
from pathlib import Path
from typing import Any

import numpy as np
from nucleus_runtime.atomic import write_atomic
from nucleus_runtime.contract import PROMPT_TEMPLATE_FILE, TOKENIZER_FILE
from nucleus_runtime.tokenizer import PromptTemplate, PromptTokenizer
from tokenizers import Tokenizer

from nucleus_export.errors import NucleusExportError

PAD_TO_MULTIPLE_OF = 8  # the pipeline's encode_prompt
DEFAULT_MAX_SEQUENCE_LENGTH = 1024  # the pipeline's default_max_sequence_length
# Rendered once to find where the prompt goes: a private-use character no chat template treats specially.
SENTINEL = "\ue000nucleus-prompt\ue000"
# Texts a template could mangle: surrounding whitespace, newlines, Jinja- and HTML-looking text, unicode, nothing.
PROBE_PROMPTS = (
    "A cat holding a sign that says hello world",
    "",
    " ",
    "  leading spaces",
    "trailing spaces  ",
    "\n",
    "\nnew\nlines\n",
    "\t tab \t",
    "\r\nwindows line\r\n",
    "{{ braces }} {% if x %}jinja{% endif %} {# comment #} {{",
    "'quotes' \"double\" <b>&amp;</b>",
    "猫 🦊 👩\u200d🚀 e\u0301 مرحبا",
    "<|im_end|> special-token text <|im_start|>",
)


def _jinja_escape(text: str) -> str:
    # Jinja's own `e` filter (its quoting differs from html.escape); markupsafe comes with jinja2, which only chat
    # templates need, so it is imported when a template is being diagnosed.
    import markupsafe

    return str(markupsafe.escape(text))


# Transformations worth naming when a template does not insert the prompt verbatim.
_TRANSFORMS = (
    ("strips", str.strip),
    ("left-strips", str.lstrip),
    ("right-strips", str.rstrip),
    ("HTML-escapes", _jinja_escape),
)
# The processor attributes holding multimodal placeholders (transformers' ProcessorMixin checks these three).
_PLACEHOLDER_ATTRIBUTES = ("image_token", "video_token", "audio_token")
_REPORT = "report it with the processor's tokenizer_config.json: the runtime would tokenize differently."


def default_system_prompt() -> str:
    from diffusers.pipelines.nucleusmoe_image.pipeline_nucleusmoe_image import DEFAULT_SYSTEM_PROMPT

    return DEFAULT_SYSTEM_PROMPT


def format_prompt(processor: Any, prompt: str, system_prompt: str) -> str:
    """The processor's input text for `prompt`, made by the pipeline's own `_format_prompt`."""
    from diffusers.pipelines.nucleusmoe_image.pipeline_nucleusmoe_image import NucleusMoEImagePipeline

    # The method only reads self.processor; calling it (not a copy) keeps the record in step with diffusers.
    return NucleusMoEImagePipeline._format_prompt(types.SimpleNamespace(processor=processor), prompt, system_prompt)


def pipeline_text_kwargs(max_sequence_length: int) -> dict[str, Any]:
    """The keyword arguments of the pipeline's processor call (encode_prompt), with numpy outputs."""
    return {
        "padding": "longest",
        "pad_to_multiple_of": PAD_TO_MULTIPLE_OF,
        "max_length": max_sequence_length,
        "truncation": True,
        "return_attention_mask": True,
        "return_tensors": "np",
    }


def tokenizer_json(processor: Any) -> str:
    """The processor's tokenizer backend as tokenizer.json text, without the padding and truncation state that the
    processor's last call left on it (the runtime applies the template's rules instead)."""
    backend = getattr(processor.tokenizer, "backend_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        raise NucleusExportError(
            f"the processor's tokenizer ({type(processor.tokenizer).__name__}) has no `tokenizers` backend.",
            "load the pipeline's processor with a fast tokenizer (transformers' Qwen2TokenizerFast).",
        )
    copy = Tokenizer.from_str(backend.to_str())
    copy.no_padding()
    copy.no_truncation()
    return copy.to_str()


def prompt_template_from_processor(
    processor: Any, system_prompt: str | None = None, max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH
) -> PromptTemplate:
    """The PromptTemplate of `processor` (system_prompt None: the pipeline's default), verified against it."""
    if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) or (
        max_sequence_length < PAD_TO_MULTIPLE_OF or max_sequence_length % PAD_TO_MULTIPLE_OF
    ):
        raise NucleusExportError(
            f"max_sequence_length {max_sequence_length!r} is not a positive multiple of {PAD_TO_MULTIPLE_OF}: the "
            f"processor refuses to truncate to it while padding to a multiple of {PAD_TO_MULTIPLE_OF}.",
            f"pass a multiple of {PAD_TO_MULTIPLE_OF} (the pipeline's default is {DEFAULT_MAX_SEQUENCE_LENGTH}).",
        )
    system_prompt = default_system_prompt() if system_prompt is None else system_prompt
    tokenizer_text = tokenizer_json(processor)
    tokenizer = processor.tokenizer
    if tokenizer.pad_token is None:
        raise NucleusExportError(
            "the processor's tokenizer has no pad token: the pipeline's padded processor call fails.",
            "set tokenizer.pad_token (Qwen3-VL pads with <|endoftext|>).",
        )
    prefix, suffix = _split_template(processor, system_prompt)
    placeholders = [getattr(processor, a, None) for a in _PLACEHOLDER_ATTRIBUTES]
    template = PromptTemplate(
        prefix=prefix,
        suffix=suffix,
        system_prompt=system_prompt,
        chat_template_sha256=_sha256(processor.chat_template),
        max_length=max_sequence_length,
        pad_to_multiple_of=PAD_TO_MULTIPLE_OF,
        padding_side=tokenizer.padding_side,
        pad_token=str(tokenizer.pad_token),
        pad_token_id=int(tokenizer.pad_token_id),
        truncation_side=tokenizer.truncation_side,
        add_special_tokens=True,  # the pipeline's call does not pass add_special_tokens: the tokenizer's default
        split_special_tokens=bool(tokenizer.split_special_tokens),
        forbidden_substrings=tuple(
            p for p in placeholders if p and _processor_refuses(processor, p, system_prompt, max_sequence_length)
        ),
    )
    for placeholder in template.forbidden_substrings:
        if placeholder in prefix + suffix:
            raise NucleusExportError(
                f"the rendered chat template itself holds {placeholder!r}: the processor refuses every prompt.",
                "use a text-only system prompt and chat template.",
            )
    _check_reproduction(processor, template, tokenizer_text)
    return template


def write_tokenizer_files(
    processor: Any,
    out_dir: Path,
    system_prompt: str | None = None,
    max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
) -> list[str]:
    """Write tokenizer.json and prompt_template.json into `out_dir` (a bundle folder); returns their names."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise NucleusExportError(f"{out_dir} is not a folder.", "pass the bundle folder the files go into.")
    template = prompt_template_from_processor(processor, system_prompt, max_sequence_length)
    write_atomic(out_dir / TOKENIZER_FILE, tokenizer_json(processor))
    write_atomic(out_dir / PROMPT_TEMPLATE_FILE, template.to_json())
    return [TOKENIZER_FILE, PROMPT_TEMPLATE_FILE]


def _split_template(processor: Any, system_prompt: str) -> tuple[str, str]:
    rendered = format_prompt(processor, SENTINEL, system_prompt)
    if rendered.count(SENTINEL) != 1:
        raise NucleusExportError(
            f"the processor's chat template renders the prompt {rendered.count(SENTINEL)} times, not once.",
            "use a chat template that writes the user's text once (Qwen3-VL's does).",
        )
    prefix, suffix = rendered.split(SENTINEL)
    for probe in PROBE_PROMPTS:
        rendered = format_prompt(processor, probe, system_prompt)
        if rendered == prefix + probe + suffix:
            continue
        framed = rendered.startswith(prefix) and rendered.endswith(suffix) and len(rendered) >= len(prefix + suffix)
        inner = rendered[len(prefix) : len(rendered) - len(suffix)] if framed else rendered
        how = next((name for name, transform in _TRANSFORMS if framed and transform(probe) == inner), "changes")
        raise NucleusExportError(
            f"the processor's chat template {how} the prompt: {probe!r} renders as {inner!r}, so the bundle cannot "
            "record it as prefix + prompt + suffix.",
            "give the processor a chat template that inserts the user's text as is (no trim or escape filter).",
        )
    return prefix, suffix


def _processor_refuses(processor: Any, placeholder: str, system_prompt: str, max_sequence_length: int) -> bool:
    text = format_prompt(processor, placeholder, system_prompt)
    try:
        processor(text=[text], **pipeline_text_kwargs(max_sequence_length))
    except ValueError:
        return True
    return False


def _check_reproduction(processor: Any, template: PromptTemplate, tokenizer_text: str) -> None:
    runtime = PromptTokenizer(Tokenizer.from_str(tokenizer_text), template)
    # Over max_length tokens with any tokenizer (at least one per word), so truncation is exercised too.
    probes = [*PROBE_PROMPTS, "word " * template.max_length]
    for batch in [[p] for p in probes] + [probes]:
        texts = [format_prompt(processor, p, template.system_prompt) for p in batch]
        expected = processor(text=texts, **pipeline_text_kwargs(template.max_length))
        ids, mask = runtime.encode(batch)
        if not (np.array_equal(expected["input_ids"], ids) and np.array_equal(expected["attention_mask"], mask)):
            raise NucleusExportError(
                f"the bundle's tokenizer files do not reproduce the processor's ids or mask for "
                f"{[p[:40] for p in batch]!r:.200}.",
                _REPORT,
            )


def _sha256(chat_template: Any) -> str:
    # A processor holds one template (str) or named ones (dict); either is hashed as written.
    text = chat_template if isinstance(chat_template, str) else json.dumps(chat_template, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()
