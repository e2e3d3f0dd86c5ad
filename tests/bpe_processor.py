"""An offline Qwen3VLProcessor around a realistic tokenizer, for tests that must see what real Qwen text does to ids.

tests/toy_pipeline.py's character-level tokenizer cannot show what matters for a runtime re-implementing the
processor's text path: byte-level BPE merges, Qwen2's pre-tokenizer splitting whitespace runs and newlines, NFC
normalization, added tokens matched before the model sees the text. This fixture has all of them:

- a byte-level BPE trained here with `tokenizers` on CORPUS (a small multilingual sample written for this file), with
  the normalizer, pre-tokenizer and decoder taken from a fresh transformers `Qwen2Tokenizer`, so the pipeline is the
  one transformers builds for Qwen checkpoints (its Split regex + ByteLevel, NFC) and cannot drift from it;
- Qwen's special tokens as special added tokens after the BPE vocabulary (as in Qwen's tokenizer.json): <|endoftext|>
  pads, <|im_end|> ends, vision tokens included; Qwen3's non-special added tokens (<think>, <tool_call>, ...) too;
- wrapped in transformers' Qwen2TokenizerFast (in transformers 5 the same class as Qwen2Tokenizer) and the real
  Qwen3VLProcessor with QWEN3_VL_INSTRUCT_CHAT_TEMPLATE.

QWEN3_VL_INSTRUCT_CHAT_TEMPLATE is the `chat_template` shipped with Qwen/Qwen3-VL-8B-Instruct (Apache-2.0, the Qwen
team), as public copies give it: one states it is byte-identical to that repository's, another one matches it, and
the head matches Qwen3-VL-30B-A3B-Instruct's processor_config on Hub mirrors. sha256 of the text:
3636d0f0bd6bef02654cdffdc447b79cb2cef8ab02cc75267345946291a489e4.
"""

from __future__ import annotations

import functools
import importlib
import json
from typing import Any

from toy_pipeline import allow_processor_without_torchvision

QWEN3_VL_INSTRUCT_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' }}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and message.content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
]
# Qwen3 tokenizers add these as non-special added tokens: matched whole in the text, yet plain text to the model.
ADDED_TOKENS = ["<tool_call>", "</tool_call>", "<think>", "</think>"]
VOCAB_SIZE = 1200

CORPUS = [
    "A red fox jumps over the lazy dog on the left; a blue bird sits on the right.",
    "Three green apples and two yellow bananas on a wooden table, photographed from above.",
    "A cinematic portrait of an astronaut in a sunflower field at golden hour, 35mm film grain.",
    "The quick brown fox doesn't care what you're thinking, they'll say it's fine.",
    "Une rue pavée de Montmartre sous la pluie, des parapluies rouges et un café illuminé.",
    "Ein gemütliches Holzhaus im verschneiten Wald, Rauch steigt aus dem Schornstein.",
    "Un perro pequeño con un sombrero de paja, acuarela, colores cálidos, niños jugando.",
    "Uma praia tropical ao entardecer, coqueiros e ondas suaves, pintura a óleo.",
    "Красная площадь зимой, снег падает на купола собора, ночная съёмка.",
    "一只橘色的猫坐在窗台上，窗外是下雨的城市夜景，霓虹灯倒影。",
    "中国山水画，远山近水，一叶扁舟，留白意境。",
    "桜の木の下で本を読む少女、柔らかい春の光、水彩画風。",
    "東京の夜の街並み、ネオンサイン、雨上がりの路面に映る光。",
    "푸른 바다 위의 하얀 등대, 맑은 하늘과 갈매기, 사진처럼 사실적인.",
    "قطة صغيرة تنام على وسادة حمراء بجانب النافذة في الصباح.",
    "ילד מחזיק בלון כחול בפארק ביום שמש, צבעים עזים.",
    "हिमालय की बर्फीली चोटियाँ सूर्योदय के समय, सुनहरी रोशनी।",
    "Bir fincan Türk kahvesi ve lokum, bakır tepside, sıcak ışık.",
    "Ελαιώνας στην Κρήτη με το Αιγαίο στο βάθος, καλοκαίρι.",
    "Một bát phở nóng hổi với rau thơm và chanh, ánh sáng ban mai.",
    "Emoji: 🦊🌻🚀 👩‍🚀 👨‍👩‍👧 🏳️‍🌈 ❤️ 👍🏽 — faces and flags.",
    "Numbers 0123456789, 3.14159, 2026-12-03, 1,000,000 and 42%.",
    "Code: def f(x): return {'a': [1, 2, 3]}  # braces {{ and }} and {% tags %}",
    "Whitespace:  two spaces,\ttab,\nnew line,\n\n  indented line,   trailing   ",
    "# Title\n\nA paragraph.\n\n\n- item one\n- item two\n\n    code block\n        nested\n\n\tTabbed\n\t\tTwice\n",
    "def main():\n    for i in range(3):\n        print(i)\n\n\nif __name__ == '__main__':\n    main()\n",
    "Combining marks: e\u0301 a\u0300 n\u0303 o\u0308, precomposed: é à ñ ö.",
    "You are an image generation assistant. Follow the user's prompt literally.",
    "Pay careful attention to spatial layout: objects described as on the left must appear on the left.",
    "Match exact object counts and assign colors to the correct objects.",
]


@functools.lru_cache(maxsize=1)
def trained_bpe() -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    """(vocab, merges) of the byte-level BPE trained on CORPUS (deterministic; trained once per process)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    qwen = Qwen2Tokenizer().backend_tokenizer
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = qwen.normalizer
    tokenizer.pre_tokenizer = qwen.pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    model = json.loads(tokenizer.to_str())["model"]
    return tuple(model["vocab"].items()), tuple(tuple(pair) for pair in model["merges"])


def bpe_tokenizer(padding_side: str = "right") -> Any:
    """transformers' Qwen2TokenizerFast around the trained BPE, with Qwen's special and added tokens."""
    from tokenizers import AddedToken
    from transformers import Qwen2TokenizerFast

    vocab, merges = trained_bpe()
    # Qwen's ids: the BPE vocabulary, then the special tokens in this order, then the other added tokens.
    ids = dict(vocab)
    ids.update({token: len(vocab) + i for i, token in enumerate(SPECIAL_TOKENS + ADDED_TOKENS)})
    tokenizer = Qwen2TokenizerFast(
        vocab=ids,
        merges=list(merges),
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=SPECIAL_TOKENS[1:],
        padding_side=padding_side,
    )
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED_TOKENS])
    return tokenizer


def bpe_processor(chat_template: str = QWEN3_VL_INSTRUCT_CHAT_TEMPLATE, padding_side: str = "right") -> Any:
    """The real Qwen3VLProcessor around bpe_tokenizer(padding_side), rendering prompts with chat_template."""
    from transformers import Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    with allow_processor_without_torchvision():
        video = importlib.import_module("transformers.models.qwen3_vl.video_processing_qwen3_vl")
        return Qwen3VLProcessor(
            image_processor=Qwen2VLImageProcessorPil(),
            tokenizer=bpe_tokenizer(padding_side),
            video_processor=video.Qwen3VLVideoProcessor(),
            chat_template=chat_template,
        )
