"""How to serve a generated repository and call it: the one source of the commands in the repository's README.md.

`server_command` builds the tritonserver command line and `client_code` the request code; `serving_notes` renders
both into the README, and tests/test_triton_server.py starts a real tritonserver with `server_command` and sends
requests by running `client_code`, so what the README says is what the test ran.
"""

from __future__ import annotations

import dataclasses
import math
import shlex

import ml_dtypes  # noqa: F401 - registers bfloat16 and the float8 types with numpy by name
import numpy as np
from nucleus_runtime.bundle import Manifest
from nucleus_runtime.contract import TEXT_ENCODER_GRAPH, TEXT_KV, TEXT_KV_GRAPH
from nucleus_runtime.triton import model as pipeline_model

from nucleus_export.triton.names import ModelNames

HTTP_PORT = 8000
GRPC_PORT = 8001
PROTOCOLS = ("http", "grpc")


@dataclasses.dataclass(frozen=True)
class ServerCommand:
    """tritonserver's argv and the environment variables it needs on top of the caller's."""

    argv: list[str]
    env: dict[str, str]

    def shell(self) -> str:
        return " ".join([f"{k}={shlex.quote(v)}" for k, v in self.env.items()] + [shlex.join(self.argv)])


def server_command(
    repo: str,
    plugin_library: str | None = None,
    *,
    executable: str = "tritonserver",
    backend_directory: str | None = None,
    address: str | None = None,
    http_port: int = HTTP_PORT,
    grpc_port: int = GRPC_PORT,
    metrics: bool = True,
) -> ServerCommand:
    """tritonserver serving `repo`.

    Auto-completion of configs is off (the 2.x form of --strict-model-config=true): the server then takes every
    generated config.pbtxt as written and validates it as complete, instead of filling in what it would guess.

    Args:
        repo: the repository folder as the server sees it.
        plugin_library: repository-relative path of the TensorRT plugin library that Triton's TensorRT backend
            must load (bls layout with plugin engines); the inprocess model loads it itself.
        executable, backend_directory: where tritonserver and its backends are, when not the container's defaults.
        address: interface for HTTP and gRPC (default: Triton's, all interfaces).
        http_port, grpc_port: ports; metrics: serve Prometheus metrics.
    """
    argv = [executable, f"--model-repository={repo}", "--disable-auto-complete-config"]
    if backend_directory is not None:
        argv.append(f"--backend-directory={backend_directory}")
    if address is not None:
        argv += [f"--http-address={address}", f"--grpc-address={address}"]
    if http_port != HTTP_PORT:
        argv.append(f"--http-port={http_port}")
    if grpc_port != GRPC_PORT:
        argv.append(f"--grpc-port={grpc_port}")
    if not metrics:
        argv.append("--allow-metrics=false")
    env = {"LD_PRELOAD": f"{repo}/{plugin_library}"} if plugin_library else {}
    return ServerCommand(argv, env)


# Triton client types of the numpy arrays the client code sends (prompts go as object arrays of UTF-8 bytes).
CLIENT_TYPES = {"float32": "FP32", "int64": "INT64", "object": "BYTES", "bool": "BOOL"}


def client_code(
    model: str,
    url: str,
    protocol: str = "http",
    *,
    prompt: str | None = None,
    negative_prompt: str = "",
    stream: bool = False,
    height: int = 1024,
    width: int = 1024,
    steps: int = pipeline_model.DEFAULT_STEPS,
    guidance: float = pipeline_model.DEFAULT_GUIDANCE,
    seed: int = pipeline_model.DEFAULT_SEED,
    png_path: str = "image.png",
) -> str:
    """Python that sends one request with tritonclient.

    Embeddings in (`prompt` None): it reads `prompt_embeds.npy` and `negative_embeds.npy` from the current folder
    (text encoder outputs) and leaves the final packed latents in `latents`. Text in: it sends `prompt` and
    `negative_prompt` as strings, asks for PNG bytes, writes them to `png_path` and leaves the pixels in `image`.
    With `stream` (a repository generated with --stream-progress; gRPC only) it reads the progress responses,
    printing each and keeping them in `progress`, until the result arrives.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if stream and protocol != "grpc":
        raise ValueError("the progress stream is a gRPC stream (Triton's HTTP infer refuses decoupled models)")
    dtypes = {spec.name: spec.dtype for spec in pipeline_model.PIPELINE_INPUTS}
    scalars = {"height": height, "width": width, "num_inference_steps": steps, "guidance_scale": guidance, "seed": seed}
    if prompt is None:
        rows = ['    ("prompt_embeds", prompt),', '    ("negative_prompt_embeds", negative),']
        read = (
            'prompt = np.load("prompt_embeds.npy").astype(np.float32)      # [1, T, joint_attention_dim], text encoder output\n'
            'negative = np.load("negative_embeds.npy").astype(np.float32)  # [1, T\', joint_attention_dim], e.g. of ""\n'
        )
    else:
        rows = [f'    ("prompt", np.array([{prompt!r}.encode()], np.object_)),',
                f'    ("negative_prompt", np.array([{negative_prompt!r}.encode()], np.object_)),']  # fmt: skip
        read = ""
    rows += [f'    ("{k}", np.array([{v!r}], np.{dtypes[k]})),' for k, v in scalars.items()]
    if prompt is not None:
        rows.append('    ("return_png", np.array([True])),')
    types = ", ".join(f'"{np_type}": "{t}"' for np_type, t in CLIENT_TYPES.items())
    code = f"""{'import queue' + chr(10) if stream else ''}import numpy as np
import tritonclient.{protocol} as tritonclient

client = tritonclient.InferenceServerClient("{url}")
{read}triton_types = {{{types}}}
inputs = []
for name, value in [
{chr(10).join(rows)}
]:
    tensor = tritonclient.InferInput(name, list(value.shape), triton_types[value.dtype.name])
    tensor.set_data_from_numpy(value)
    inputs.append(tensor)
"""
    if stream:
        code += f"""responses = queue.Queue()
client.start_stream(callback=lambda result, error: responses.put(error or result))
client.async_stream_infer("{model}", inputs)
progress = []
while True:
    result = responses.get(timeout=600)
    if isinstance(result, Exception):
        raise result
    if result.as_numpy("{pipeline_model.OUTPUT_STEP}") is None:
        break  # the last response: the result
    step, total = result.as_numpy("{pipeline_model.OUTPUT_STEP}")[0], result.as_numpy("{pipeline_model.OUTPUT_TOTAL_STEPS}")[0]
    progress.append((step, total, result.as_numpy("{pipeline_model.OUTPUT_ELAPSED}")[0]))
    print(f"step {{step}}/{{total}}, {{progress[-1][2]:.2f}} s")
client.stop_stream()
"""
    else:
        code += f'result = client.infer("{model}", inputs)\n'
    if prompt is None:
        code += f'latents = result.as_numpy("{pipeline_model.OUTPUT_LATENTS}")  # [1, S, 64] packed\n'
    else:
        code += (
            f'image = result.as_numpy("{pipeline_model.OUTPUT_IMAGE}")  # [1, H, W, 3] uint8\n'
            f'with open({png_path!r}, "wb") as f:\n'
            f'    f.write(result.as_numpy("{pipeline_model.OUTPUT_PNG}")[0])\n'
        )
    return code


CFG_BATCH = 2  # prompt and negative prompt as one batch


def text_kv_bytes_per_token(manifest: Manifest, batch: int = CFG_BATCH) -> int:
    """Bytes of text K/V per text token for one denoiser call: what the bls layout hands through Triton every step."""
    spec = manifest.stages[TEXT_KV_GRAPH].io.outputs[TEXT_KV]
    fixed = math.prod(d for d in spec.shape if isinstance(d, int))
    return fixed * batch * np.dtype(spec.dtype).itemsize


EXAMPLE_PROMPT = "a red fox in fresh snow"


def serving_notes(names: ModelNames, layout: str, platform: str, plugin_library: str | None, manifest: Manifest,
                  stream_progress: bool = False) -> str:  # fmt: skip
    """README.md at the repository root: how to serve it and call it."""
    n = names
    height, width = manifest.profiles.opt_resolution
    per_token = text_kv_bytes_per_token(manifest) / 1024
    command = server_command("REPO", plugin_library)
    text = layout == pipeline_model.LAYOUT_INPROCESS and TEXT_ENCODER_GRAPH in manifest.stages
    if layout == pipeline_model.LAYOUT_INPROCESS:
        stages = "text encoder, text K/V, denoiser and VAE decoder" if text else "text K/V and denoiser"
        models = (
            f"Model: `{n.pipeline}` (Python backend), which runs whole requests with nucleus_runtime's own "
            f"{'TensorRT' if platform == 'tensorrt_plan' else 'ONNX Runtime'} backend over the bundle files in "
            f"`{n.pipeline}/1/` ({stages}); text K/V ({per_token:g} KiB per text token with CFG) stays in that "
            "backend across steps and requests."
        )
        backend = "tensorrt" if platform == "tensorrt_plan" else "onnxruntime"
        needs = (
            f"The Python backend's stub embeds the interpreter of the first `python3` on the server's PATH and ignores "
            "PYTHONPATH: start the server with the bin folder of an environment that has the runtime and its backend "
            f"first on PATH (`pip install './runtime[{backend}]'` from a nucleus-export checkout"
            + (", or `[tensorrt-rtx]` for TensorRT-RTX engines" if backend == "tensorrt" else "")
            + "; it brings numpy" + (" and tokenizers, which the prompt tokenizer needs)." if text else ").")
            + " The copy of nucleus_runtime next to model.py is the one imported."
        )
    else:
        models = (
            f"Models: `{n.text_kv}` and `{n.denoiser}` (the bundle's graphs), `{n.pipeline}` (whole requests, Python "
            "backend, calling the other two with BLS)."
        )
        models += (
            f" Each step hands the text K/V to `{n.denoiser}` through Triton: {per_token:g} KiB per text token with "
            "CFG (`--layout inprocess` keeps it in one model instead)."
        )
        needs = (
            f"The server needs Triton's {'TensorRT' if platform == 'tensorrt_plan' else 'ONNX Runtime'} backend; "
            "the pipeline model imports the copy of nucleus_runtime next to its model.py and needs only numpy."
        )
        if plugin_library:
            needs += (
                " The engines use the nucleus TensorRT plugins: the command preloads the library (or pass "
                f"`--backend-config=tensorrt,plugins=REPO/{plugin_library}`)."
            )
    protocol = "grpc" if stream_progress else "http"
    url = f"localhost:{GRPC_PORT if stream_progress else HTTP_PORT}"
    examples = []
    if text:
        code = client_code(n.pipeline, url, protocol, prompt=EXAMPLE_PROMPT, stream=stream_progress, height=height, width=width)
        examples.append(("Text in, pixels and a PNG file out", code))
    code = client_code(n.pipeline, url, protocol, stream=stream_progress, height=height, width=width)
    examples.append(("Prompt embeddings in, packed latents out", code))
    how = (
        "This model is decoupled (--stream-progress): after every step it sends a response with only `step`, "
        "`total_steps` and `elapsed_seconds`, then the result. Triton's HTTP infer endpoint refuses decoupled models, "
        "so the client streams over gRPC (port {GRPC_PORT})."
        if stream_progress
        else f"Over gRPC: `tritonclient.grpc` and port {GRPC_PORT} instead; the rest is the same."
    ).format(GRPC_PORT=GRPC_PORT)
    sections = "\n".join(f"### {title}\n\n```python\n{code}```\n" for title, code in examples)
    return f"""# Triton model repository generated by nucleus-export triton ({layout}, {platform})

{models} Replace REPO by the absolute path of this folder.

## Start the server

    {command.shell()}

{needs}

## Send a request

{how}

{sections}
## Serving many requests

Each instance batches the denoising steps of its concurrent requests: the rows of every request of one image size
go into one denoiser call per step, up to the bundle's batch profile ({manifest.profiles.batch[2]} rows), requests
joining and leaving between steps; each request gets the result it gets alone. A request ends with one error naming
the reason when its client cancels it or goes away (gRPC), when its deadline passes (the client's request
`timeout`, in microseconds, or the config parameter `{pipeline_model.PARAM_REQUEST_TIMEOUT_S}`), or when it waited
longer than `{pipeline_model.PARAM_QUEUE_DELAY_US}` for a place in a batch. The model's counters (requests by outcome,
denoiser calls and rows, seconds per stage, text K/V cache hits, misses, evictions and bytes) are on Triton's metrics
endpoint (port 8002) as `nucleus_*`.
"""
