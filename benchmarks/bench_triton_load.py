"""Triton under load, measured by a real client: the pipeline model with step-level batching across requests against
the same model serving one request at a time (--max-batch-requests 1), at several client concurrencies. Not a test:
it prints a table (and --json writes the numbers).

    python benchmarks/bench_triton_load.py                          # tiny model, 128x128, 10 steps, c = 1 2 4 8
    python benchmarks/bench_triton_load.py --requests 16 --soak 0   # quicker
    python benchmarks/bench_triton_load.py --bundle BUNDLE --height 1024 --width 1024 --steps 50 --threads 0

perf_analyzer does not run on these machines (the `perf-analyzer` package on the index here is a placeholder without
the binary, and the wheel's tritonserver ships none), so the load comes from a bounded-concurrency tritonclient
generator: `c` threads, each with its own gRPC client, each sending its next request as soon as the previous one
returns (closed loop, as perf_analyzer's --concurrency-range), `--requests` requests per level after a warm-up. Every
request has its own prompt embeddings (no text K/V cache hits across requests) and seed. Both repositories are served
at once and measured in turns, `--rounds` times, so that other load on a shared machine falls on both alike.

Per level: throughput (requests/s over the level's wall time), client latency p50/p95/p99, the model's own per-stage
time per request and mean denoiser batch (its nucleus_* metrics on Triton's metrics endpoint), and the peak RSS of the
server with its Python backend stubs. The soak (batched, concurrency 4) sends --soak requests and reports the RSS
growth from the end of its first tenth to its end.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "runtime")]

from nucleus_runtime.bundle import load_manifest  # noqa: E402
from nucleus_runtime.serving import STAGES  # noqa: E402
from nucleus_runtime.triton import model as pipeline_model  # noqa: E402

from nucleus_export.triton import serving  # noqa: E402
from nucleus_export.triton.configs import INPROCESS, ONNXRUNTIME  # noqa: E402
from nucleus_export.triton.names import PIPELINE_MODEL  # noqa: E402
from nucleus_export.triton.local_server import Server, find_local_triton, read_metrics, running_server  # noqa: E402
from nucleus_export.triton.repository import TritonOptions, plan_repository, write_repository  # noqa: E402

MODES = {"batched": 0, "one-at-a-time": 1}  # --max-batch-requests of each repository
GOALS = {"c4_over_c1": 2.0, "p99_over_p50": 1.5, "rss_growth": 0.05}


@dataclasses.dataclass
class Level:
    mode: str
    concurrency: int
    requests: int
    seconds: float
    latencies: list[float]
    stage_seconds: dict[str, float]  # per request
    mean_rows: float
    peak_rss_mib: float

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q))


def request_inputs(manifest: Any, seed: int, args: argparse.Namespace) -> list[Any]:
    import tritonclient.grpc as grpc

    rng = np.random.default_rng(seed)
    dim = manifest.model_config["joint_attention_dim"]
    values = {
        "prompt_embeds": rng.standard_normal((1, args.text_len, dim)).astype(np.float32),
        "negative_prompt_embeds": rng.standard_normal((1, args.negative_len, dim)).astype(np.float32),
        "height": np.array([args.height], np.int64),
        "width": np.array([args.width], np.int64),
        "num_inference_steps": np.array([args.steps], np.int64),
        "guidance_scale": np.array([args.guidance], np.float32),
        "seed": np.array([seed], np.int64),
    }
    inputs = []
    for name, value in values.items():
        tensor = grpc.InferInput(name, list(value.shape), serving.CLIENT_TYPES[value.dtype.name])
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    return inputs


class RssSampler:
    """Peak resident memory of the server and its stubs (one process group), sampled every 50 ms."""

    def __init__(self, server: Server):
        import psutil

        self.root = psutil.Process(server.process.pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> int:
        total = 0
        for process in [self.root, *self.root.children(recursive=True)]:
            with contextlib.suppress(Exception):
                total += process.memory_info().rss
        return total

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.now())

    def __enter__(self) -> RssSampler:
        self.peak = self.now()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def model_counters(server: Server) -> dict[str, float]:
    metrics = read_metrics(server.metrics_url)

    def total(name: str, **labels: str) -> float:
        return sum(v for k, v in metrics.get(name, {}).items() if set(labels.items()) <= set(k))

    counters = {f"stage:{s}": total(pipeline_model.METRIC_STAGE_SECONDS, stage=s) for s in STAGES}
    counters["calls"] = total(pipeline_model.METRIC_DENOISER_CALLS)
    counters["rows"] = total(pipeline_model.METRIC_DENOISER_ROWS)
    counters["completed"] = total(pipeline_model.METRIC_REQUESTS, outcome="completed")
    return counters


def settled_counters(server: Server, completed: float, timeout: float = 10.0) -> dict[str, float]:
    """The model's counters once they count `completed` requests (it publishes them when it goes idle)."""
    deadline = time.monotonic() + timeout
    while True:
        counters = model_counters(server)
        if counters["completed"] >= completed or time.monotonic() > deadline:
            return counters
        time.sleep(0.05)


def load(server: Server, manifest: Any, args: argparse.Namespace, concurrency: int, count: int, first_seed: int,
         on_done: Any = None) -> tuple[float, list[float]]:  # fmt: skip
    """`count` requests from `concurrency` closed-loop clients: wall seconds and each request's latency."""
    import tritonclient.grpc as grpc

    seeds = iter(range(first_seed, first_seed + count))
    lock = threading.Lock()
    latencies: list[float] = []

    def client_loop() -> None:
        with contextlib.closing(grpc.InferenceServerClient(server.url("grpc"))) as client:
            while True:
                with lock:
                    seed = next(seeds, None)
                if seed is None:
                    return
                inputs = request_inputs(manifest, seed, args)
                started = time.perf_counter()
                client.infer(PIPELINE_MODEL, inputs, client_timeout=600)
                with lock:
                    latencies.append(time.perf_counter() - started)
                    if on_done is not None:
                        on_done(len(latencies))

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=concurrency) as pool:
        for future in [pool.submit(client_loop) for _ in range(concurrency)]:
            future.result()
    return time.perf_counter() - started, latencies


def measure_level(server: Server, manifest: Any, args: argparse.Namespace, mode: str, concurrency: int,
                  seed: int) -> Level:  # fmt: skip
    """One level on one server: throughput, latencies, the model's per-stage seconds and batch, peak RSS."""
    before = model_counters(server)
    with RssSampler(server) as sampler:
        seconds, latencies = load(server, manifest, args, concurrency, args.requests, seed)
    after = settled_counters(server, before["completed"] + len(latencies))
    done = max(1.0, after["completed"] - before["completed"])
    return Level(
        mode, concurrency, len(latencies), seconds, latencies,
        {s: (after[f"stage:{s}"] - before[f"stage:{s}"]) / done for s in STAGES},
        (after["rows"] - before["rows"]) / max(1.0, after["calls"] - before["calls"]), sampler.peak / 2**20,
    )  # fmt: skip


def merge(levels: list[Level]) -> Level:
    """The rounds of one (mode, concurrency) as one level: all requests over all seconds, the peak of the peaks."""
    first = levels[0]
    requests = sum(lv.requests for lv in levels)
    stages = {s: sum(lv.stage_seconds[s] * lv.requests for lv in levels) / requests for s in STAGES}
    rows = sum(lv.mean_rows for lv in levels) / len(levels)
    return Level(first.mode, first.concurrency, requests, sum(lv.seconds for lv in levels),
                 [t for lv in levels for t in lv.latencies], stages, rows, max(lv.peak_rss_mib for lv in levels))  # fmt: skip


def soak_test(server: Server, manifest: Any, args: argparse.Namespace) -> dict[str, Any]:
    """RSS over --soak requests at concurrency 4, sampled every tenth of them."""
    samples: list[tuple[int, float]] = []
    with RssSampler(server) as sampler:

        def sample(done: int) -> None:
            if done % max(1, args.soak // 10) == 0:
                samples.append((done, sampler.now() / 2**20))

        seconds, latencies = load(server, manifest, args, 4, args.soak, 20_000_000, on_done=sample)
    first, last = samples[0][1], samples[-1][1]
    cache_mib = read_metrics(server.metrics_url).get(pipeline_model.METRIC_TEXT_KV_CACHE_BYTES, {})
    cache_mib = sum(cache_mib.values()) / 2**20
    print(f"  soak: {len(latencies)} requests in {seconds:.1f} s, RSS {first:.1f} -> {last:.1f} MiB "
          f"({100 * (last - first) / first:+.2f} %), text K/V cache {cache_mib:.1f} MiB at the end", flush=True)  # fmt: skip
    return {"requests": len(latencies), "seconds": seconds, "rss_mib": samples, "growth": (last - first) / first,
            "text_kv_cache_mib": cache_mib,
            "p50": float(np.percentile(latencies, 50)), "p99": float(np.percentile(latencies, 99))}  # fmt: skip


def run_all(triton: Any, bundle: Path, work: Path, args: argparse.Namespace) -> tuple[list[Level], dict[str, Any]]:
    """Both repositories served at once (an idle server waits without using the CPU), the levels measured in turns,
    mode after mode and round after round, so that other load on the machine falls on both alike."""
    manifest = load_manifest(bundle)
    servers: dict[str, Server] = {}
    with contextlib.ExitStack() as stack:
        for mode in args.modes:
            repo = work / f"repo-{mode}"
            options = TritonOptions(layout=INPROCESS, platform=ONNXRUNTIME, onnxruntime_threads=args.threads,
                                    max_batch_requests=MODES[mode], max_pending_requests=4 * max(args.concurrency),
                                    text_kv_cache_bytes=args.text_kv_cache_mib << 20)  # fmt: skip
            write_repository(plan_repository(bundle, options), repo)
            servers[mode] = stack.enter_context(running_server(triton, repo, work / f"server-{mode}.log", metrics=True))
            load(servers[mode], manifest, args, 4, args.warmup, 10_000_000)  # sessions, allocator, caches warm
        rounds: dict[tuple[str, int], list[Level]] = {}
        seed = 0
        for round_ in range(args.rounds):
            for concurrency in args.concurrency:
                for mode, server in servers.items():
                    level = measure_level(server, manifest, args, mode, concurrency, seed)
                    seed += args.requests
                    rounds.setdefault((mode, concurrency), []).append(level)
                    print(f"  round {round_ + 1}: {mode:>13} c={concurrency}: {level.throughput:6.2f} req/s, "
                          f"p50 {level.percentile(50) * 1e3:7.1f} ms, p99 {level.percentile(99) * 1e3:7.1f} ms, "
                          f"mean rows {level.mean_rows:.2f}", flush=True)  # fmt: skip
        soak = soak_test(servers["batched"], manifest, args) if args.soak and "batched" in servers else {}
    return [merge(rounds[mode, c]) for mode in servers for c in args.concurrency], soak


def export_tiny(out: Path, args: argparse.Namespace) -> Path:
    from nucleus_export.export import ExportOptions, export_bundle
    from nucleus_export.model.specs import open_model

    export_bundle(open_model("tiny"), out, ExportOptions(resolutions=[(args.height, args.width)], max_text_len=64,
                                                          opt_text_len=args.text_len, max_batch=args.max_batch))  # fmt: skip
    return out


def report(levels: list[Level], soak: dict[str, Any]) -> dict[str, Any]:
    by = {(lv.mode, lv.concurrency): lv for lv in levels}
    header = f"{'mode':>13} {'c':>2} {'req/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'p99/p50':>7} {'rows':>5} " + \
        " ".join(f"{s + ' ms':>13}" for s in STAGES if s != "png") + f" {'RSS MiB':>8}"  # fmt: skip
    print("\n" + header)
    for lv in levels:
        stages = " ".join(f"{lv.stage_seconds[s] * 1e3:13.2f}" for s in STAGES if s != "png")
        print(f"{lv.mode:>13} {lv.concurrency:>2} {lv.throughput:7.2f} {lv.percentile(50) * 1e3:8.1f} "
              f"{lv.percentile(95) * 1e3:8.1f} {lv.percentile(99) * 1e3:8.1f} {lv.percentile(99) / lv.percentile(50):7.2f} "
              f"{lv.mean_rows:5.2f} {stages} {lv.peak_rss_mib:8.1f}")  # fmt: skip
    summary: dict[str, Any] = {}
    if ("batched", 1) in by and ("batched", 4) in by:
        summary["c4_over_c1"] = by["batched", 4].throughput / by["batched", 1].throughput
    concurrencies = sorted({lv.concurrency for lv in levels})
    summary["batched_over_one_at_a_time"] = {
        c: by["batched", c].throughput / by["one-at-a-time", c].throughput
        for c in concurrencies if ("batched", c) in by and ("one-at-a-time", c) in by
    }
    if ("batched", 4) in by:
        summary["p99_over_p50"] = by["batched", 4].percentile(99) / by["batched", 4].percentile(50)
    if soak:
        summary["rss_growth"] = soak["growth"]
    print()
    for c, ratio in summary["batched_over_one_at_a_time"].items():
        print(f"batched / one-at-a-time throughput at c={c}: {ratio:.2f}x")
    for goal, bound in GOALS.items():
        if goal in summary:
            met = summary[goal] >= bound if goal == "c4_over_c1" else summary[goal] <= bound
            print(f"goal {goal} {'>=' if goal == 'c4_over_c1' else '<='} {bound:g}: {summary[goal]:.3f} "
                  f"({'met' if met else 'missed'})")  # fmt: skip
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="bundle to serve (default: the tiny model, exported to a temp folder)")
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--text-len", type=int, default=16)
    parser.add_argument("--negative-len", type=int, default=4)
    parser.add_argument("--max-batch", type=int, default=8, help="batch profile of the exported tiny bundle (rows)")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads of the instance (0: one per core)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--requests", type=int, default=24, help="requests per concurrency level and round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over every level and mode, taken in turns")
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--soak", type=int, default=500, help="requests of the RSS soak (batched, c=4; 0 = none)")
    parser.add_argument("--text-kv-cache-mib", type=int, default=16,
                        help="the text K/V cache bound of each instance: every request here has new text, so the cache "
                        "only fills up to it (and the RSS with it)")
    parser.add_argument("--modes", nargs="+", choices=sorted(MODES), default=list(MODES))
    parser.add_argument("--json", type=Path, help="write the numbers here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-triton-") as tmp:
        work = Path(tmp)
        triton = find_local_triton(work / "backends")
        bundle = args.bundle or export_tiny(work / "bundle", args)
        print(f"bundle {bundle}: {args.height}x{args.width}, {args.steps} steps, CFG {args.guidance}, text "
              f"{args.text_len}/{args.negative_len}, {args.threads} ONNX Runtime threads, one instance", flush=True)  # fmt: skip
        levels, soak = run_all(triton, bundle, work, args)
    summary = report(levels, soak)
    if args.json:
        args.json.write_text(json.dumps({
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "levels": [{**dataclasses.asdict(lv), "throughput": lv.throughput, "p50": lv.percentile(50),
                        "p95": lv.percentile(95), "p99": lv.percentile(99)} for lv in levels],
            "soak": soak, "summary": summary,
        }, indent=2, default=str))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
