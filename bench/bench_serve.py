"""`ldm-serve` under load: N concurrent clients against one server, vs the same work done sequentially in-process.

    python bench/bench_serve.py                                   # the bundled demo model on the CPU
    python bench/bench_serve.py --clients 8 --requests 4 --queue-size 2 --steps 10

Each client sends `--requests` txt2img requests one after another (a 429 is counted and retried after 0.1 s, as a
polite client does). Reported: images/s through the server relative to the same requests run back to back by a
`Pipeline` in this process (same settings, seeds and thread count; 1.0 = the server adds nothing), p50/p95
latency per request (queueing included), and the number of 429 rejections. Other jobs on the machine move the
wall-clock ratio; the CPU-time ratio (this process's CPU seconds for the sequential run over the server process's for
the served one, HTTP, PNG encoding and rejections included) does not depend on them. The server's images are checked equal to
the in-process ones, so the speed is of the same work. Prints a markdown table row.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the test suite's server process helper: the same one the tests start


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc), all its threads: the server's cost, whatever the load."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--queue-size", type=int, default=2, help="the server's --queue-size (small shows rejections)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads, here and in the server")
    ap.add_argument("--model", default=None, help="default: the bundled demo model")
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)

    import numpy as np
    import torch
    from PIL import Image

    from ldm.pipeline import Pipeline
    from serve_server import running_server

    torch.set_num_threads(args.threads)
    prompts = ["a large red circle in the center on a black background", "a small blue square on a white background"]
    jobs = [(c, r) for c in range(args.clients) for r in range(args.requests)]
    body = lambda c, r: {"prompt": prompts[(c + r) % 2], "seed": 100 * c + r, "steps": args.steps}  # noqa: E731

    # the same requests, sequentially, in this process
    pipe = Pipeline.from_pretrained(args.model, device=args.device)
    pipe(prompts[0], steps=args.steps, seed=0, show_progress=False)  # warm-up
    start, cpu_start = time.perf_counter(), time.process_time()
    expected = {}
    for c, r in jobs:
        b = body(c, r)
        expected[c, r] = np.asarray(pipe(b["prompt"], steps=b["steps"], seed=b["seed"], show_progress=False).images[0])
    sequential_s, sequential_cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    del pipe

    server_args = ["--device", args.device, "--queue-size", str(args.queue_size), "--quiet"]
    if args.model:
        server_args += ["--model", args.model]
    latencies: list[float] = []
    rejected = [0]
    mismatched: list[tuple[int, int]] = []
    lock = threading.Lock()
    with running_server(*server_args, env={"OMP_NUM_THREADS": str(args.threads)}) as server:
        server.post("/sdapi/v1/txt2img", {"prompt": prompts[0], "steps": args.steps, "seed": 0})  # warm-up

        def client(c: int) -> None:
            for r in range(args.requests):
                sent = time.perf_counter()
                while True:
                    reply = server.post("/sdapi/v1/txt2img", body(c, r))
                    if reply.status != 429:
                        break
                    with lock:
                        rejected[0] += 1
                    time.sleep(0.1)
                assert reply.status == 200, reply.body[:300]
                image = np.asarray(Image.open(io.BytesIO(base64.b64decode(reply.json()["images"][0]))).convert("RGB"))
                with lock:
                    latencies.append(time.perf_counter() - sent)
                    if not np.array_equal(image, expected[c, r]):
                        mismatched.append((c, r))

        threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
        start, cpu_start = time.perf_counter(), cpu_seconds(server.proc.pid)
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        served_s, served_cpu_s = time.perf_counter() - start, cpu_seconds(server.proc.pid) - cpu_start

    n = len(jobs)
    q = statistics.quantiles(latencies, n=20, method="inclusive")
    result = {
        "clients": args.clients, "requests": n, "steps": args.steps, "queue_size": args.queue_size,
        "sequential_images_per_s": n / sequential_s, "served_images_per_s": n / served_s,
        "relative_throughput": sequential_s / served_s, "relative_cpu": sequential_cpu_s / served_cpu_s,
        "p50_s": statistics.median(latencies), "p95_s": q[18],
        "rejections_429": rejected[0], "images_equal": not mismatched,
    }
    print(json.dumps(result), file=sys.stderr)
    print("| clients x requests | steps | queue | sequential img/s | served img/s | relative (wall) | relative (CPU) | "
          "p50 s | p95 s | 429s | same pixels |")
    print(f"| {args.clients} x {args.requests} | {args.steps} | {args.queue_size} | "
          f"{result['sequential_images_per_s']:.2f} | {result['served_images_per_s']:.2f} | "
          f"{result['relative_throughput']:.2f} | {result['relative_cpu']:.2f} | {result['p50_s']:.2f} | {result['p95_s']:.2f} | {rejected[0]} | "
          f"{'yes' if not mismatched else f'no ({len(mismatched)} differ)'} |")
    if mismatched:
        sys.exit(1)


if __name__ == "__main__":
    main()
