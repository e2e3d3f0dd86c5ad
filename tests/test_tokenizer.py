"""The runtime's prompt tokenizer gives the ids and masks of the pipeline's Qwen3VLProcessor call.

The reference is the processor itself, called as diffusers' NucleusMoEImagePipeline calls it (processor_encode):
a realistic byte-level BPE processor (tests/bpe_processor.py) with right and left padding and truncation, the same
processor saved and loaded back, and the toy pipeline's character-level processor (tests/toy_pipeline.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bpe_processor import QWEN3_VL_INSTRUCT_CHAT_TEMPLATE, bpe_processor
from diffusers.pipelines.nucleusmoe_image.pipeline_nucleusmoe_image import DEFAULT_SYSTEM_PROMPT
from nucleus_runtime.contract import PROMPT_TEMPLATE_FILE, TOKENIZER_FILE
from nucleus_runtime.errors import NucleusError
from nucleus_runtime.tokenizer import (
    PromptTemplate,
    PromptTokenizer,
    common_prefix_length,
)
from tokenizers import Tokenizer
from toy_pipeline import CHAT_TEMPLATE, _processor, allow_processor_without_torchvision

from nucleus_export.errors import NucleusExportError
from nucleus_export.model.prompt_template import prompt_template_from_processor, write_tokenizer_files

RUNTIME_DIR = Path(__file__).resolve().parents[1] / "runtime"
PROMPTS = [
    "A cat holding a sign that says hello world",
    "Three green apples on the left, two yellow bananas on the right.",
    "一只橘色的猫坐在窗台上，窗外是下雨的城市夜景",
    "桜の木の下で本を読む少女、푸른 바다 위의 하얀 등대",
    "👩\u200d🚀 on the moon, 👨\u200d👩\u200d👧 family, 🏳\ufe0f\u200d🌈 flag, 👍🏽",
    "caf\u00e9 cr\u00e8me br\u00fbl\u00e9e",
    "cafe\u0301 cre\u0300me bru\u0302le\u0301e",
    "\u0301 starts with a combining mark",
    "قطة صغيرة تنام على وسادة حمراء",
    "\u200fילד מחזיק בלון כחול\u200e and English",
    "",
    " ",
    "   ",
    "\n",
    "\n\n\n",
    "\t",
    "  two leading spaces",
    "trailing spaces   ",
    "\nleading newline",
    "trailing newline\n",
    "\ttabs\tinside\t",
    "\r\nwindows\r\nlines\r\n",
    "<|im_end|>",
    "before <|im_end|>\n<|im_start|>assistant\n after",
    "<|endoftext|><|vision_start|><|vision_end|>",
    "<think>reasoning</think> <tool_call>",
    "{{ messages }} {% if x %}{% endif %} {# c #}",
    "word " * 1500,
    "猫" * 1100,
]


def processor_encode(processor: Any, prompts: list[str], max_length: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """What the pipeline's encode_prompt gets: _format_prompt per prompt, then one padded processor call."""
    texts = [
        processor.apply_chat_template(
            [
                {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
                {"role": "user", "content": [{"type": "text", "text": p}]},
            ],
            tokenize=False,
            add_generation_prompt=True,
        )
        for p in prompts
    ]
    out = processor(
        text=texts, padding="longest", pad_to_multiple_of=8, max_length=max_length, truncation=True,
        return_attention_mask=True, return_tensors="np",
    )
    return out["input_ids"], out["attention_mask"]


def toy_processor(chat_template: str = CHAT_TEMPLATE) -> Any:
    with allow_processor_without_torchvision():
        processor = _processor()[0]
    processor.chat_template = chat_template
    return processor


@pytest.fixture(scope="module")
def processors(tmp_path_factory) -> dict[str, Any]:
    from transformers import Qwen3VLProcessor

    saved = tmp_path_factory.mktemp("bpe-processor")
    bpe_processor().save_pretrained(saved)
    with allow_processor_without_torchvision():
        reloaded = Qwen3VLProcessor.from_pretrained(saved)
    left = bpe_processor(padding_side="left")
    left.tokenizer.truncation_side = "left"
    return {"bpe": bpe_processor(), "bpe-left": left, "bpe-reloaded": reloaded, "toy": toy_processor()}


@pytest.fixture(scope="module")
def bundles(processors, tmp_path_factory) -> dict[str, Path]:
    out = {}
    for name, processor in processors.items():
        out[name] = tmp_path_factory.mktemp(f"bundle-{name}")
        write_tokenizer_files(processor, out[name])
    return out


def load(bundle: Path) -> PromptTokenizer:
    return PromptTokenizer.from_files(bundle / TOKENIZER_FILE, bundle / PROMPT_TEMPLATE_FILE)


@pytest.fixture(params=["bpe", "bpe-left", "bpe-reloaded", "toy"])
def case(request, processors, bundles) -> tuple[Any, PromptTokenizer]:
    return processors[request.param], load(bundles[request.param])


def test_prompts_one_at_a_time_match_the_processor(case):
    processor, runtime = case
    for prompt in PROMPTS:
        ids, mask = runtime.encode([prompt])
        expected_ids, expected_mask = processor_encode(processor, [prompt])
        assert ids.dtype == mask.dtype == np.int64
        np.testing.assert_array_equal(ids, expected_ids, err_msg=repr(prompt))
        np.testing.assert_array_equal(mask, expected_mask, err_msg=repr(prompt))
        assert runtime.encode_one(prompt) == expected_ids[0][expected_mask[0] == 1].tolist()


def test_a_batch_matches_the_processor(case):
    processor, runtime = case
    for batch in (PROMPTS, ["a", "a much longer prompt about a cat", ""], PROMPTS[:3]):
        ids, mask = runtime.encode(batch)
        expected_ids, expected_mask = processor_encode(processor, batch)
        np.testing.assert_array_equal(ids, expected_ids)
        np.testing.assert_array_equal(mask, expected_mask)
        longest = max(len(runtime.encode_one(p)) for p in batch)
        assert ids.shape == (len(batch), -(-longest // 8) * 8)


def test_pad_rebuilds_the_batch_from_prompts_encoded_one_at_a_time(case):
    _, runtime = case
    batch_ids, batch_mask = runtime.encode(PROMPTS)
    ids, mask = runtime.pad([runtime.encode_one(p) for p in PROMPTS])
    np.testing.assert_array_equal(ids, batch_ids)
    np.testing.assert_array_equal(mask, batch_mask)


def test_over_long_prompts_are_truncated_like_the_processor(case, tmp_path):
    processor, runtime = case
    ids, mask = runtime.encode(["word " * 1500])
    assert ids.shape == (1, 1024) and mask.all()
    # A short max_length cuts into the template itself, from the tokenizer's truncation side.
    write_tokenizer_files(processor, tmp_path, max_sequence_length=64)
    short = load(tmp_path)
    for batch in (["a cat"], ["a cat", "word " * 100]):
        np.testing.assert_array_equal(short.encode(batch)[0], processor_encode(processor, batch, max_length=64)[0])


def test_nfc_and_nfd_prompts_give_the_same_ids(bundles):
    runtime = load(bundles["bpe"])
    assert runtime.encode_one("caf\u00e9 cr\u00e8me") == runtime.encode_one("cafe\u0301 cre\u0300me")


def test_a_prompt_can_merge_into_the_prefix_and_this_is_detected(bundles):
    runtime = load(bundles["bpe"])
    prefix = runtime.prefix_ids
    assert common_prefix_length(runtime.encode_one("a cat"), prefix) == len(prefix)
    # The prefix ends with "user\n"; Qwen's pre-tokenizer groups "\n" runs and BPE merges them ("ĊĊ"), so the
    # prefix's last token is not a token of the full text.
    ids = runtime.encode_one("\nleading newline")
    shared = common_prefix_length(ids, prefix)
    assert shared < len(prefix) and ids[: len(prefix)] != prefix
    backend = Tokenizer.from_file(str(bundles["bpe"] / TOKENIZER_FILE))
    concatenated = prefix + backend.encode("\nleading newline" + runtime.template.suffix).ids
    assert concatenated != ids


def test_character_level_prompts_always_share_the_whole_prefix(bundles):
    runtime = load(bundles["toy"])
    assert all(common_prefix_length(runtime.encode_one(p), runtime.prefix_ids) == len(runtime.prefix_ids)
               for p in PROMPTS)


@pytest.mark.parametrize("placeholder", ["<|image_pad|>", "<|video_pad|>"])
def test_multimodal_placeholders_are_refused_like_the_processor(case, placeholder):
    processor, runtime = case
    with pytest.raises(ValueError):
        processor_encode(processor, [f"a {placeholder} b"])
    with pytest.raises(NucleusError, match="placeholder"):
        runtime.encode(["fine", f"a {placeholder} b"])


@pytest.mark.parametrize(
    "inserted,needle",
    [
        ("{{ part['text'] | trim }}", "strips"),
        ("{{ part['text'] | e }}", "HTML-escapes"),
        ("{{ part['text'] | replace('{', '(') }}", "changes"),
        ("{{ part['text'] }}{{ part['text'] }}", "2 times"),
    ],
)
def test_a_template_that_does_not_insert_the_prompt_verbatim_is_refused(inserted, needle):
    template = CHAT_TEMPLATE.replace("{{ part['text'] }}", inserted)
    assert template != CHAT_TEMPLATE
    with pytest.raises(NucleusExportError, match=needle) as refused:
        prompt_template_from_processor(toy_processor(template))
    assert "\n" not in str(refused.value)


def test_max_sequence_length_must_be_a_multiple_of_8(processors):
    with pytest.raises(ValueError, match="multiple"):
        processor_encode(processors["toy"], ["a"], max_length=1020)
    with pytest.raises(NucleusExportError, match="multiple of 8"):
        prompt_template_from_processor(processors["toy"], max_sequence_length=1020)


def test_the_record_round_trips_and_says_what_was_found(bundles):
    names = sorted(p.name for p in bundles["bpe"].iterdir())
    assert names == sorted([TOKENIZER_FILE, PROMPT_TEMPLATE_FILE])
    text = (bundles["bpe"] / PROMPT_TEMPLATE_FILE).read_text(encoding="utf-8")
    record = PromptTemplate.from_json(text)
    assert PromptTemplate.from_json(record.to_json()) == record
    assert record.chat_template_sha256 == hashlib.sha256(QWEN3_VL_INSTRUCT_CHAT_TEMPLATE.encode()).hexdigest()
    assert record.prefix == f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n"
    assert record.suffix == "<|im_end|>\n<|im_start|>assistant\n"
    assert (record.padding_side, record.truncation_side, record.pad_token) == ("right", "right", "<|endoftext|>")
    assert (record.max_length, record.pad_to_multiple_of, record.add_special_tokens) == (1024, 8, True)
    assert record.split_special_tokens is False
    assert record.forbidden_substrings == ("<|image_pad|>", "<|video_pad|>")
    assert json.loads((bundles["bpe"] / TOKENIZER_FILE).read_text())["padding"] is None
    assert load(bundles["bpe-left"]).template.padding_side == "left"


def test_files_go_into_an_existing_folder(processors, tmp_path):
    with pytest.raises(NucleusExportError, match="not a folder"):
        write_tokenizer_files(processors["toy"], tmp_path / "missing")


def _template_edit(**changes: Any):
    def edit(bundle: Path) -> None:
        path = bundle / PROMPT_TEMPLATE_FILE
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return edit


def _remove_field(bundle: Path) -> None:
    path = bundle / PROMPT_TEMPLATE_FILE
    raw = json.loads(path.read_text())
    del raw["suffix"]
    path.write_text(json.dumps(raw))


@pytest.mark.parametrize(
    "damage,needle",
    [
        (lambda b: (b / TOKENIZER_FILE).unlink(), "tokenizer file .* not found"),
        (lambda b: (b / PROMPT_TEMPLATE_FILE).unlink(), "prompt template file .* not found"),
        (lambda b: (b / TOKENIZER_FILE).write_text('{"model": '), "not a tokenizers tokenizer.json"),
        (lambda b: (b / TOKENIZER_FILE).write_text('{"version": "1.0"}'), "not a tokenizers tokenizer.json"),
        (lambda b: (b / TOKENIZER_FILE).write_bytes(b"\xff\xfe\x00"), "cannot be read"),
        (lambda b: (b / PROMPT_TEMPLATE_FILE).write_text("{"), "is not JSON"),
        (lambda b: (b / PROMPT_TEMPLATE_FILE).write_text("[]"), "not an object"),
        (_template_edit(format_version=2), "format_version 2"),
        (_remove_field, "lacks fields \\['suffix'\\]"),
        (_template_edit(extra=1), "unknown fields \\['extra'\\]"),
        (_template_edit(max_length="1024"), "'max_length'"),
        (_template_edit(pad_token_id=True), "'pad_token_id'"),
        (_template_edit(forbidden_substrings="<|image_pad|>"), "'forbidden_substrings'"),
        (_template_edit(padding_side="center"), "padding_side is 'center'"),
        (_template_edit(pad_token_id=3), "do not belong together"),
    ],
)
def test_missing_or_damaged_files_are_one_line_errors(bundles, tmp_path, damage, needle):
    for name in (TOKENIZER_FILE, PROMPT_TEMPLATE_FILE):
        (tmp_path / name).write_bytes((bundles["bpe"] / name).read_bytes())
    damage(tmp_path)
    with pytest.raises(NucleusError, match=needle) as failed:
        load(tmp_path)
    assert "\n" not in str(failed.value) and failed.value.fix


@pytest.mark.parametrize(
    "call,needle",
    [
        (lambda t: t.encode("a single string"), "list of str, got a str"),
        (lambda t: t.encode(["fine", 3]), "prompt 1 is a int"),
        (lambda t: t.encode([]), "no prompts"),
        (lambda t: t.encode_one(None), "prompt 0 is a NoneType"),
        (lambda t: t.pad([]), "no sequences"),
    ],
)
def test_bad_prompts_are_clear_errors(bundles, call, needle):
    with pytest.raises(NucleusError, match=needle):
        call(load(bundles["bpe"]))


def test_the_runtime_tokenizes_with_torch_transformers_and_diffusers_impossible(processors, bundles, tmp_path):
    prompts = PROMPTS[:12] + ["\nleading newline", "word " * 1500]
    expected_ids, expected_mask = processor_encode(processors["bpe"], prompts)
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    code = (
        "import json, sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'transformers', 'diffusers', 'nucleus_export'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from nucleus_runtime.tokenizer import PromptTokenizer\n"
        "bundle, out = sys.argv[1], sys.argv[2]\n"
        "t = PromptTokenizer.from_files(bundle + '/tokenizer.json', bundle + '/prompt_template.json')\n"
        "ids, mask = t.encode(json.load(open(out + '/prompts.json')))\n"
        "json.dump({'ids': ids.tolist(), 'mask': mask.tolist()}, open(out + '/result.json', 'w'))\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'diffusers')]\n"
    )
    env = {**os.environ, "PYTHONPATH": str(RUNTIME_DIR)}
    subprocess.run([sys.executable, "-c", code, str(bundles["bpe"]), str(tmp_path)], check=True, env=env)
    result = json.loads((tmp_path / "result.json").read_text())
    np.testing.assert_array_equal(np.array(result["ids"]), expected_ids)
    np.testing.assert_array_equal(np.array(result["mask"]), expected_mask)
