"""Host microseconds from launching a decode piece's graph to holding its routing ids on the host, by how
the ids come over: the current way (the graph, then a copy to pinned memory and a stream sync), the copy
captured in the graph and a stream sync, and a kernel in the graph that writes each id with the step's
sequence number beside it straight into pinned host memory, which the host polls (no copy, no sync) or
syncs on. The graph is a chain of small kernels standing in for a layer's norm, attention and router.
Median and 10th percentile over the repeats; one JSON object.

    python benchmarks/routing_read_latency.py [--ids 8] [--kernels 12] [--repeats 3000]
"""

import argparse
import json
import statistics
import time

import torch

from moetier.kernels.routing_mailbox import RoutingMailbox


def chain(x: torch.Tensor, kernels: int) -> torch.Tensor:
    for _ in range(kernels):
        x = x * 1.0001 + 1e-6
    return x


def timed(read, repeats: int) -> dict:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        read()
        times.append((time.perf_counter() - start) * 1e6)
    times.sort()
    return {"median_us": round(statistics.median(times), 2), "p10_us": round(times[len(times) // 10], 2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ids", type=int, default=8)
    parser.add_argument("--kernels", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3000)
    args = parser.parse_args()
    device = torch.device("cuda")
    x = torch.randn(2048, device=device)
    ids_dev = torch.zeros(args.ids, dtype=torch.int64, device=device)
    host = torch.zeros(args.ids, dtype=torch.int64, pin_memory=True)
    mailbox = RoutingMailbox(args.ids, device)
    stream = torch.cuda.Stream()

    def body():
        y = chain(x, args.kernels)
        ids_dev.copy_((y[: args.ids] * 100).abs().long() % 128)

    graphs = {}
    for name in ("plain", "copy_in_graph", "mailbox"):
        torch.cuda.synchronize()
        with torch.cuda.stream(stream):
            body()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                body()
                if name == "copy_in_graph":
                    host.copy_(ids_dev, non_blocking=True)
                if name == "mailbox":
                    region = mailbox.publish(ids_dev)
        graphs[name] = graph
    torch.cuda.synchronize()
    current = torch.cuda.current_stream()

    def plain():
        graphs["plain"].replay()
        host.copy_(ids_dev, non_blocking=True)
        current.synchronize()
        return host.numpy().tolist()

    def copy_in_graph():
        graphs["copy_in_graph"].replay()
        current.synchronize()
        return host.numpy().tolist()

    def mailbox_poll():
        mailbox.arm()
        graphs["mailbox"].replay()
        return mailbox.read(region, args.ids).tolist()

    def mailbox_sync():
        mailbox.arm()
        graphs["mailbox"].replay()
        current.synchronize()
        return mailbox.read(region, args.ids).tolist()

    reads = {"plain": plain, "copy_in_graph": copy_in_graph, "mailbox_poll": mailbox_poll,
             "mailbox_sync": mailbox_sync}
    expected = plain()
    for name, read in reads.items():
        assert read() == expected, name
    result = {"ids": args.ids, "kernels": args.kernels}
    for _ in range(2):  # two passes: the first warms up
        for name, read in reads.items():
            result[name] = timed(read, args.repeats)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
