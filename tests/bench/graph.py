"""A deterministic, realistic follow graph for the benchmark (and anyone who needs one).

Followers follow a power law (a few users are followed by many, most by few), out-degrees
too (a few users follow thousands, under the cap), one celebrity is followed by a large share
of everyone, a fixed fraction of follows are returned (mutuals), and every follow has its own
time. The same parameters always give the same graph: pure-Python `random.Random(seed)`,
whose streams are stable across Python versions.

    python -m tests.bench.graph --out var/graph [--quick] [--seed 1]

writes `accounts.csv` and `edges.csv` in the importer's format, and `meta.json`.
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import json
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from server import rules

# 2023-01-01T00:00:00Z: follow times are spread over the three years after it.
BASE_US = 1_672_531_200 * 1_000_000
SPAN_US = 3 * 365 * 86_400 * 1_000_000


@dataclass(frozen=True, slots=True)
class GraphParams:
    """The size and shape of a generated graph (same parameters, same graph)."""

    users: int
    edges: int
    celebrity_followers: int
    mutual_fraction: float = 0.3
    zipf_exponent: float = 1.0
    max_following: int = rules.DEFAULT_MAX_FOLLOWING - 1000
    seed: int = 1

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


FULL = GraphParams(users=250_000, edges=1_200_000, celebrity_followers=210_000)
QUICK = GraphParams(users=20_000, edges=100_000, celebrity_followers=12_000)


def user_id(index: int) -> str:
    return f"u{index:07d}"


@dataclass(frozen=True, slots=True)
class Graph:
    """A generated graph as parallel edge arrays, cheap to hold for millions of edges."""

    params: GraphParams
    followers: list[int]  # edge i is followers[i] -> targets[i] at times[i] (µs)
    targets: list[int]
    times: list[int]
    celebrity: int
    ten_follower_user: int
    mutual_pairs: int

    @property
    def edge_count(self) -> int:
        return len(self.followers)

    def meta(self) -> dict[str, object]:
        return {
            "params": asdict(self.params),
            "edges": self.edge_count,
            "celebrity": user_id(self.celebrity),
            "ten_follower_user": user_id(self.ten_follower_user),
            "mutual_pairs": self.mutual_pairs,
        }


def _zipf_cumulative(n: int, exponent: float, offset: float = 5.0) -> list[float]:
    return list(itertools.accumulate((r + offset) ** -exponent for r in range(n)))


def generate(params: GraphParams) -> Graph:
    n = params.users
    if params.celebrity_followers >= n:
        raise ValueError("the celebrity cannot have more followers than there are users")
    rng = random.Random(params.seed)
    seen: set[int] = set()
    out_degree = [0] * n
    followers: list[int] = []
    targets: list[int] = []
    mutual_pairs = 0

    def add(a: int, b: int) -> bool:
        key = a * n + b
        if a == b or key in seen or out_degree[a] >= params.max_following:
            return False
        seen.add(key)
        out_degree[a] += 1
        followers.append(a)
        targets.append(b)
        return True

    celebrity = 0
    for fan in rng.sample(range(1, n), params.celebrity_followers):
        add(fan, celebrity)
    # Popularity and activity are power laws over two independent orders of the users.
    popular = list(range(1, n))
    active = list(range(1, n))
    rng.shuffle(popular)
    rng.shuffle(active)
    pop_cum = _zipf_cumulative(n - 1, params.zipf_exponent)
    act_cum = _zipf_cumulative(n - 1, 0.8, offset=50.0)
    pop_total, act_total = pop_cum[-1], act_cum[-1]
    random_ = rng.random
    while len(followers) < params.edges:
        a = active[bisect.bisect(act_cum, random_() * act_total)]
        b = popular[bisect.bisect(pop_cum, random_() * pop_total)]
        if add(a, b) and random_() < params.mutual_fraction and add(b, a):
            mutual_pairs += 1
    seen.clear()
    # Distinct times: a random order of the edges, evenly spread over the span.
    order = list(range(len(followers)))
    rng.shuffle(order)
    step = SPAN_US // len(order)
    times = [0] * len(order)
    for rank, edge in enumerate(order):
        times[edge] = BASE_US + rank * step + rng.randrange(step // 2)
    in_degree = [0] * n
    for b in targets:
        in_degree[b] += 1
    ten = next((u for u in range(1, n) if in_degree[u] == 10), 1)
    return Graph(params, followers, targets, times, celebrity, ten, mutual_pairs)


def account_lines(graph: Graph) -> Iterator[str]:
    yield "user_id,nick,face_url\n"
    for i in range(graph.params.users):
        yield f"{user_id(i)},user {i},https://img.example.com/{i}.png\n"


def edge_lines(graph: Graph) -> Iterator[str]:
    yield "follower_id,target_id,followed_at\n"
    for a, b, t in zip(graph.followers, graph.targets, graph.times, strict=True):
        sec, us = divmod(t, 1_000_000)
        yield f"u{a:07d},u{b:07d},{sec}.{us:06d}\n"


def write_csv(graph: Graph, out: Path) -> tuple[Path, Path]:
    """Write accounts.csv, edges.csv and meta.json into `out`; the two CSV paths."""
    out.mkdir(parents=True, exist_ok=True)
    accounts, edges = out / "accounts.csv", out / "edges.csv"
    for path, lines in ((accounts, account_lines(graph)), (edges, edge_lines(graph))):
        tmp = path.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8", newline="") as f:
            batch: list[str] = []
            for line in lines:
                batch.append(line)
                if len(batch) >= 65536:
                    f.write("".join(batch))
                    batch.clear()
            f.write("".join(batch))
        tmp.replace(path)
    (out / "meta.json").write_text(json.dumps(graph.meta(), indent=2) + "\n")
    return accounts, edges


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.graph", description="Write a deterministic follow graph."
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for the CSV files")
    parser.add_argument("--quick", action="store_true", help="the small graph of bench-quick")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--users", type=int, help="override the number of users")
    parser.add_argument("--edges", type=int, help="override the number of edges")
    parser.add_argument("--celebrity-followers", type=int, help="override the celebrity's fans")
    args = parser.parse_args(argv)
    base = QUICK if args.quick else FULL
    params = GraphParams(
        users=args.users or base.users,
        edges=args.edges or base.edges,
        celebrity_followers=args.celebrity_followers or base.celebrity_followers,
        seed=args.seed,
    )
    started = time.perf_counter()
    graph = generate(params)
    write_csv(graph, args.out)
    print(
        f"{graph.edge_count} edges over {params.users} users, {graph.mutual_pairs} mutual pairs,"
        f" written to {args.out} in {time.perf_counter() - started:.1f}s",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
