"""The vae_decoder graph of a real-dimension VAE (the released Qwen-Image config, random weights): exactness of the
"2d" and "3d" forms against diffusers, ONNX Runtime CPU time, TensorRT-RTX builds, FLOPs/bytes at the default
resolutions, and what FP8 would cost in image quality (a benchmark, not a test; findings in docs/vae_decoder.md).

    python benchmarks/bench_vae_decoder.py [--workdir /tmp/nucleus-vae-bench] [--vae PATH] [--sizes 256x256,512x512]
        [--trt-size 256x256] [--quality-size 256x256] [--skip exactness,timing,trt,cost,fp8]

FP8 here is a measurement, not a product option: every Conv gets E4M3 Q/DQ on its input (one per-tensor scale,
amax calibrated on separate latents) and its weight (one scale per output channel); the attention stays in the
compute dtype. bf16 graphs run as nucleus_export.rewrites.bf16_emulation rewrites them (float32 math, bf16 rounding of
every bf16 tensor), since ONNX Runtime's CPU provider has no bf16 convolutions. Quality is the PSNR of the uint8
image against the float32 graph's uint8 image, on random latents N(0, 1) (the normalized latents the denoiser
produces) through random weights: an estimate of the precision loss, not of a trained VAE's image quality.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import onnx
from nucleus_runtime.contract import IMAGE, LATENTS, VAE_DECODER_GRAPH
from onnx import TensorProto, helper, numpy_helper

from nucleus_export.export import write_graph
from nucleus_export.graph.external_data import CheckpointLinks, load_model
from nucleus_export.graph.precision import FP8_MAX, GraphPrecision, quantize_per_channel
from nucleus_export.costs.vae_decoder import vae_decoder_cost
from nucleus_export.graph.vae_decoder import DECODED, FORMS, build_vae_decoder
from nucleus_export.model.vae import QWEN_IMAGE_VAE, VaeCheckpoint, VaeConfig, open_vae, write_random_vae
from nucleus_export.resolutions import aspect_resolutions, parse_resolutions

SECTIONS = ("exactness", "timing", "trt", "cost", "fp8")
THREADS = 2


def export(vae: VaeCheckpoint, out_dir: Path, form: str, compute: str = "fp32", float_output: bool = False) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{VAE_DECODER_GRAPH}.onnx"
    if not path.is_file():
        write_graph(out_dir, VAE_DECODER_GRAPH, vae.weights, GraphPrecision(compute),
                    lambda g, emit: build_vae_decoder(g, emit, vae.config, form, float_output=float_output),
                    external=True, links=CheckpointLinks(out_dir))
    return path


def session(model: Path | onnx.ModelProto):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.log_severity_level = 3
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def latents(config: VaeConfig, size: tuple[int, int], count: int, seed: int) -> np.ndarray:
    h, w = (s // config.scale_factor for s in size)
    return np.random.default_rng(seed).standard_normal((count, config.z_dim, h, w), dtype=np.float32)


def diffusers_decode(vae_dir: Path, batch: np.ndarray) -> np.ndarray:
    """NucleusMoEImagePipeline's de-normalization and vae.decode(...)[0][:, :, 0], float32 on the CPU."""
    import torch
    from diffusers import AutoencoderKLQwenImage

    torch.set_num_threads(THREADS)
    vae = AutoencoderKLQwenImage.from_pretrained(vae_dir).eval()
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        return vae.decode(torch.from_numpy(batch)[:, :, None] / inv_std + mean, return_dict=False)[0][:, :, 0].numpy()


def to_uint8(decoded: np.ndarray) -> np.ndarray:
    return (np.clip(decoded * 0.5 + 0.5, 0, 1) * 255).round().astype(np.uint8).transpose(0, 2, 3, 1)


def psnr(image: np.ndarray, reference: np.ndarray) -> float:
    mse = np.mean((image.astype(np.float64) - reference.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


# ---- sections ---------------------------------------------------------------------------------------------------


def exactness(vae: VaeCheckpoint, work: Path, size: tuple[int, int]) -> dict:
    batch = latents(vae.config, size, 1, seed=1)
    start = time.perf_counter()
    reference = diffusers_decode(vae.vae_dir, batch)
    out = {"size": f"{size[0]}x{size[1]}", "diffusers_cpu_seconds": round(time.perf_counter() - start, 2),
           "reference_std": float(reference.std())}
    for form in FORMS:
        decoded, image = session(export(vae, work / f"fp32-{form}-float", form, float_output=True)).run(
            [DECODED, IMAGE], {LATENTS: batch})
        diff = np.abs(decoded - reference)
        out[form] = {"max_abs": float(diff.max()), "max_rel": float(diff.max() / np.abs(reference).max()),
                     "uint8_pixels_differing": float((image != to_uint8(reference)).mean()),
                     "uint8_max_step": int(np.abs(image.astype(int) - to_uint8(reference).astype(int)).max())}
    return out


def timing(vae: VaeCheckpoint, work: Path, sizes: list[tuple[int, int]], runs: int = 2) -> dict:
    out = {}
    for form in FORMS:
        path = export(vae, work / f"fp32-{form}", form)
        start = time.perf_counter()
        sess = session(path)
        out[form] = {"session_seconds": round(time.perf_counter() - start, 2)}
        for size in sizes:
            batch = latents(vae.config, size, 1, seed=2)
            sess.run([IMAGE], {LATENTS: batch})  # warm-up
            seconds = []
            for _ in range(runs):
                start = time.perf_counter()
                sess.run([IMAGE], {LATENTS: batch})
                seconds.append(time.perf_counter() - start)
            out[form][f"{size[0]}x{size[1]}_seconds"] = round(min(seconds), 2)
    return out


def trt_builds(vae: VaeCheckpoint, work: Path, size: tuple[int, int]) -> dict:
    """One static-shape build per form at `size`, and one with the dynamic profile of the default resolutions
    (batch 1..2, latent sides from the smallest to the largest side served)."""
    from nucleus_export.engines.flavors import resolve_flavor
    from nucleus_export.engines.loaders import BuildSettings, EngineFromOnnx, NetworkFromOnnxPath

    backend = resolve_flavor("tensorrt-rtx")
    shape = latents(vae.config, size, 1, 0).shape
    sides = [s // vae.config.scale_factor for r in aspect_resolutions() for s in r]
    z, opt = vae.config.z_dim, 1024 // vae.config.scale_factor
    profiles = {f"{size[0]}x{size[1]}": (shape, shape, shape),
                "default resolutions": ((1, z, min(sides), min(sides)), (1, z, opt, opt), (2, z, max(sides), max(sides)))}
    out = {"backend": f"{backend.name} {backend.version}"}
    for form in FORMS:
        path = export(vae, work / f"bf16-{form}", form, compute="bf16")
        for profile, triple in profiles.items():
            report = EngineFromOnnx(NetworkFromOnnxPath(backend, path), BuildSettings({LATENTS: triple}),
                                    work / f"bf16-{form}" / "vae_decoder.plan", graph=VAE_DECODER_GRAPH)()
            out[f"{form}, {profile}"] = {"plan_mib": round(report.engine_bytes / 2**20, 1),
                                         "network_layers": report.network.num_layers,
                                         "layer_types": report.network.layer_types,
                                         "build_seconds": report.build_seconds}
    return out


def costs(config: VaeConfig) -> dict:
    out = {}
    for height, width in aspect_resolutions():
        row = {}
        for form in FORMS:
            cost = vae_decoder_cost(config, height, width, form=form)
            row[form] = {"tflop": round(cost.flops / 1e12, 3), "conv_tflop": round(cost.conv_flops / 1e12, 3),
                         "attention_tflop": round(cost.attention_flops / 1e12, 3), "gb": round(cost.bytes / 1e9, 2),
                         "weight_mb": round(cost.weight_bytes / 1e6, 1)}
        out[f"{height}x{width}"] = row
    return out


def conv_input_amax(model: onnx.ModelProto, batches: list[np.ndarray]) -> dict[str, float]:
    """Per-tensor amax of every Conv's input over the calibration batches, keyed by the Conv's weight name (the same
    in the float32 and bf16 graphs)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    convs = {n.input[0]: n.input[1] for n in probe.graph.node if n.op_type == "Conv"}
    probe.graph.output.extend(helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in convs)
    sess, amax = session(probe), dict.fromkeys(convs.values(), 0.0)
    for batch in batches:
        for name, value in zip(convs, sess.run(list(convs), {LATENTS: batch})):
            amax[convs[name]] = max(amax[convs[name]], float(np.abs(value).max()))
    return amax


def with_fp8_convs(model: onnx.ModelProto, amax: dict[str, float] | None) -> onnx.ModelProto:
    """Every Conv with E4M3 weights (DQ, one scale per output channel) and, unless amax is None (weights only),
    E4M3 Q/DQ on its input (one per-tensor scale, amax / 448)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    convs = [n for n in graph.node if n.op_type == "Conv"]
    replaced = {n.input[1] for n in convs}
    weights = {t.name: t for t in graph.initializer if t.name in replaced}
    kept = [t for t in graph.initializer if t.name not in replaced]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    graph.initializer.append(helper.make_tensor("fp8_zero", TensorProto.FLOAT8E4M3FN, [], [0.0]))
    nodes = []
    for node in graph.node:
        if node.op_type == "Conv":
            w_name = node.input[1]
            dtype = helper.tensor_dtype_to_np_dtype(weights[w_name].data_type)
            weight = numpy_helper.to_array(weights[w_name]).astype(np.float32)
            w_q, w_scales = quantize_per_channel(weight.reshape(weight.shape[0], -1).T)  # [in * taps, out] layout
            graph.initializer.extend([_array(f"{w_name}.fp8", w_q.T.reshape(weight.shape)),
                                      _array(f"{w_name}.fp8_scale", w_scales.astype(dtype))])
            nodes.append(helper.make_node("DequantizeLinear", [f"{w_name}.fp8", f"{w_name}.fp8_scale"],
                                          [f"{w_name}.w_dq"], axis=0))
            node.input[1] = f"{w_name}.w_dq"
            if amax is not None:
                scale = f"{w_name}.input_scale"
                graph.initializer.append(_array(scale, np.asarray(max(amax[w_name], 1e-12) / FP8_MAX, dtype)))
                nodes += [helper.make_node("QuantizeLinear", [node.input[0], scale, "fp8_zero"], [f"{w_name}.x_q"]),
                          helper.make_node("DequantizeLinear", [f"{w_name}.x_q", scale, "fp8_zero"], [f"{w_name}.x_dq"])]
                node.input[0] = f"{w_name}.x_dq"
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    return out


def _array(name: str, array: np.ndarray) -> TensorProto:
    proto = TensorProto(name=name, dims=list(array.shape), data_type=helper.np_dtype_to_tensor_dtype(array.dtype))
    proto.raw_data = np.ascontiguousarray(array).tobytes()
    return proto


def fp8_quality(vae: VaeCheckpoint, work: Path, size: tuple[int, int], calibration: int = 4, evaluation: int = 4) -> dict:
    from nucleus_export.rewrites.bf16_emulation import emulate_bf16_in_fp32

    fp32 = load_model(export(vae, work / "fp32-2d", "2d"))
    bf16 = load_model(export(vae, work / "bf16-2d", "2d", compute="bf16"))
    amax = conv_input_amax(fp32, [latents(vae.config, size, 1, seed=100 + i) for i in range(calibration)])
    variants = {
        "bf16": emulate_bf16_in_fp32(bf16),
        "fp8 W8A8, float32 otherwise": with_fp8_convs(fp32, amax),
        "fp8 W8A8 + bf16": emulate_bf16_in_fp32(with_fp8_convs(bf16, amax)),
        "fp8 weights only + bf16": emulate_bf16_in_fp32(with_fp8_convs(bf16, None)),
    }
    evals = [latents(vae.config, size, 1, seed=200 + i) for i in range(evaluation)]
    reference = [session(fp32).run([IMAGE], {LATENTS: batch})[0] for batch in evals]
    out = {"size": f"{size[0]}x{size[1]}", "calibration_latents": calibration, "evaluation_latents": evaluation}
    for name, model in variants.items():
        sess = session(model)
        images = [sess.run([IMAGE], {LATENTS: batch})[0] for batch in evals]
        scores = [psnr(i, r) for i, r in zip(images, reference)]
        steps = max(int(np.abs(i.astype(int) - r.astype(int)).max()) for i, r in zip(images, reference))
        out[name] = {"psnr_db_min": round(min(scores), 2), "psnr_db_mean": round(float(np.mean(scores)), 2),
                     "max_step": steps}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/nucleus-vae-bench"))
    parser.add_argument("--vae", type=Path, help="a VAE folder or pipeline root (default: a random real-dimension VAE)")
    parser.add_argument("--sizes", default="256x256,512x512", help="ONNX Runtime timing sizes")
    parser.add_argument("--exact-size", default="256x256")
    parser.add_argument("--trt-size", default="256x256")
    parser.add_argument("--quality-size", default="256x256")
    parser.add_argument("--skip", default="", help=f"comma-separated sections of {', '.join(SECTIONS)}")
    args = parser.parse_args()
    skip = {s for s in args.skip.split(",") if s}
    args.workdir.mkdir(parents=True, exist_ok=True)
    vae_dir = args.vae or args.workdir / "vae"
    if args.vae is None and not vae_dir.is_dir():
        write_random_vae(vae_dir, QWEN_IMAGE_VAE)
    vae = open_vae(vae_dir)
    results: dict = {}
    sections = {
        "exactness": lambda: exactness(vae, args.workdir, parse_resolutions(args.exact_size)[0]),
        "timing": lambda: timing(vae, args.workdir, parse_resolutions(args.sizes)),
        "trt": lambda: trt_builds(vae, args.workdir, parse_resolutions(args.trt_size)[0]),
        "cost": lambda: costs(vae.config),
        "fp8": lambda: fp8_quality(vae, args.workdir, parse_resolutions(args.quality_size)[0]),
    }
    for name, run in sections.items():
        if name not in skip:
            start = time.perf_counter()
            results[name] = run()
            print(json.dumps({name: results[name], "seconds": round(time.perf_counter() - start, 1)}), flush=True)
    (args.workdir / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
