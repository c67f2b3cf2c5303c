"""Demand: the requests a simulation replays.

* :func:`synthetic` - Poisson arrivals per origin region with a diurnal rate that
  peaks at 14:00 local time (follow-the-sun), prompts and outputs drawn to the
  Azure 2023 conversation trace's means, shared system prompts (Zipf popularity)
  and multi-turn sessions whose follow-ups extend the previous prompt (so prefix
  caching pays off exactly when the blocks are really there), and a priority mix.
* :func:`load_mooncake` / :func:`load_azure` - the real traces in
  ``shared/data/traces`` (Mooncake's ``hash_ids`` are used as 512-token block
  hashes as they are); :func:`assign_origins` gives them regions, keeping a
  conversation (requests sharing a first block) in one region;
  :func:`follow_the_sun` makes time-shifted copies per region; :func:`scale_rate`
  compresses time to a target rate.

All randomness comes from the ``numpy.random.Generator`` passed in.
"""

from __future__ import annotations

import json
import math
from datetime import datetime
from pathlib import Path
from typing import Iterable, Optional, Sequence

import msgspec
import numpy as np


class SimRequest(msgspec.Struct, gc=False):
    """One request of a simulation: what the trace says, then what happened to it.

    Not tracked by the garbage collector (``gc=False``): a day holds hundreds of
    thousands of these per policy, none can be part of a cycle (they hold numbers,
    strings, tuples, an array and an immutable Decision), and every collection
    would otherwise walk them all.
    """

    id: int
    arrival_ms: float
    origin: str
    prompt_tokens: int
    output_tokens: int
    prefix: np.ndarray  # uint64 array: what the router reads
    block_tokens: int
    priority: str = "interactive"
    model: str = "chat"
    session: Optional[str] = None
    blocks: tuple = ()  # the same hashes as Python ints: what caches key on (derived)
    peak: bool = False
    # what happened
    attempts: int = 0
    tried: tuple = ()
    queued: int = 0
    outcome: str = ""  # served, overflowed, degraded, shed, lost
    region: str = ""
    replica: int = -1
    model_used: str = ""
    ttft_ms: float = math.nan
    completion_ms: float = math.nan
    cached_tokens: int = 0
    output_cap: int = 0  # output tokens the router's last decision allowed, when it shortened them (0: as asked)
    decision: object = None

    def __post_init__(self) -> None:
        self.output_tokens = max(1, self.output_tokens)
        if len(self.blocks) != len(self.prefix):
            self.blocks = tuple(self.prefix.tolist())


def diurnal_factor(hour_utc: np.ndarray, utc_offset: float, peak_hour_local: float = 14.0, trough: float = 0.3) -> np.ndarray:
    """Relative demand at a UTC hour: 1 at the local peak, ``trough`` twelve hours away."""
    local = (hour_utc + utc_offset) % 24.0
    phase = np.cos(2 * np.pi * (local - peak_hour_local) / 24.0)
    return trough + (1 - trough) * (1 + phase) / 2


def synthetic(
    rng: np.random.Generator,
    *,
    regions: Sequence[str],
    shares: Sequence[float],
    utc_offsets: Sequence[float],
    mean_rate: float,
    duration_s: float,
    day_s: float,
    start_hour_utc: float = 0.0,
    peak_hour_local: float = 14.0,
    peak_window_h: float = 2.0,
    trough: float = 0.3,
    prompt_mean: float = 1155.0,
    output_mean: float = 211.0,
    max_prompt: int = 16_000,
    max_output: int = 2_000,
    block_tokens: int = 64,
    prefix_groups: int = 64,
    prefix_share: float = 0.6,
    system_prompt_tokens: tuple[int, int] = (256, 2048),
    zipf: float = 1.1,
    follow_up_share: float = 0.3,
    priorities: Optional[dict[str, float]] = None,
    model: str = "chat",
) -> list[SimRequest]:
    """Synthetic global demand (see the module docstring); ``day_s`` seconds = 24 h."""
    priorities = priorities or {"interactive": 0.8, "batch": 0.15, "best_effort": 0.05}
    shares_arr = np.asarray(shares, dtype=np.float64)
    shares_arr = shares_arr / shares_arr.sum()
    # Non-homogeneous Poisson arrivals by thinning, per region.
    hours_per_ms = 24.0 / (day_s * 1000.0)
    arrivals = []
    for g, region in enumerate(regions):
        # mean of the diurnal factor over a day is (1 + trough) / 2: normalize so the
        # day's mean rate of this region is mean_rate * share
        base = mean_rate * shares_arr[g] / ((1 + trough) / 2) / 1000.0  # per ms at the peak
        n_max = rng.poisson(base * duration_s * 1000.0)
        times = np.sort(rng.uniform(0.0, duration_s * 1000.0, n_max))
        hour = start_hour_utc + times * hours_per_ms
        keep = rng.uniform(0, 1, n_max) < diurnal_factor(hour, utc_offsets[g], peak_hour_local, trough)
        local = (hour + utc_offsets[g]) % 24.0
        near_peak = np.abs(((local - peak_hour_local) + 12) % 24 - 12) <= peak_window_h
        for t, p in zip(times[keep], near_peak[keep]):
            arrivals.append((float(t), g, bool(p)))
    arrivals.sort()

    # Prompts: lognormal around the Azure conversation means.
    n = len(arrivals)
    sigma_p, sigma_o = 1.0, 0.9
    prompt = np.minimum(max_prompt, np.maximum(8, rng.lognormal(np.log(prompt_mean) - sigma_p**2 / 2, sigma_p, n))).astype(int)
    output = np.minimum(max_output, np.maximum(1, rng.lognormal(np.log(output_mean) - sigma_o**2 / 2, sigma_o, n))).astype(int)
    group_sizes = rng.integers(system_prompt_tokens[0], system_prompt_tokens[1] + 1, prefix_groups)
    popularity = 1.0 / np.arange(1, prefix_groups + 1) ** zipf
    popularity /= popularity.sum()
    group_of = rng.choice(prefix_groups, n, p=popularity)
    uses_group = rng.uniform(0, 1, n) < prefix_share
    follow_up = rng.uniform(0, 1, n) < follow_up_share
    names = list(priorities)
    pri = rng.choice(len(names), n, p=np.array([priorities[k] for k in names]) / sum(priorities.values()))

    out: list[SimRequest] = []
    recent: dict[int, list] = {g: [] for g in range(len(regions))}  # open conversations per origin
    next_block = 1 << 40  # private blocks never collide with system-prompt blocks
    for i, (t, g, near_peak) in enumerate(arrivals):
        convs = recent[g]
        if follow_up[i] and convs:
            # the next turn of an open conversation: its whole context plus new tokens
            conv = convs[int(rng.integers(len(convs)))]
            context_tokens, blocks, session = conv
            new_tokens = int(prompt[i] // 4) + 1
            tokens = min(max_prompt, context_tokens + new_tokens)
        else:
            session = f"c{i}"
            if uses_group[i]:
                k = int(group_of[i])
                sys_tokens = int(group_sizes[k])
                blocks = [(k << 24) | b for b in range(sys_tokens // block_tokens)]
                tokens = min(max_prompt, sys_tokens + int(prompt[i]))
            else:
                blocks = []
                tokens = int(prompt[i])
            conv = [0, blocks, session]
            convs.append(conv)
            if len(convs) > 256:
                convs.pop(0)
        # extend with private blocks up to ceil(tokens / block_tokens)
        need = -(-tokens // block_tokens)
        blocks = list(blocks[:need])
        while len(blocks) < need:
            blocks.append(next_block)
            next_block += 1
        conv[0] = tokens + int(output[i])
        conv[1] = blocks  # the next turn shares this prompt's blocks (output blocks are new)
        req = SimRequest(i, t, regions[g], tokens, int(output[i]), np.array(blocks, dtype=np.uint64),
                         block_tokens, names[int(pri[i])], model, session)
        req.peak = near_peak
        out.append(req)
    return out


def load_mooncake(path: Path, limit: Optional[int] = None) -> list[dict]:
    """Mooncake jsonl: timestamp (ms), input_length, output_length, hash_ids (512-token blocks)."""
    rows = []
    with open(path) as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
                if limit and len(rows) >= limit:
                    break
    return [
        {"arrival_ms": float(r["timestamp"]), "prompt_tokens": int(r["input_length"]), "output_tokens": int(r["output_length"]),
         "prefix": np.array(r["hash_ids"], dtype=np.uint64), "block_tokens": 512}
        for r in rows
    ]


def _azure_time(text: str) -> float:
    # "2023-11-16 18:15:46.6805900": seven fractional digits (datetime takes six)
    head, _, frac = text.partition(".")
    base = datetime.strptime(head, "%Y-%m-%d %H:%M:%S").timestamp()
    return (base + float("0." + (frac or "0"))) * 1000.0


def load_azure(path: Path, limit: Optional[int] = None, block_tokens: int = 64) -> list[dict]:
    """Azure LLM inference trace csv: TIMESTAMP, ContextTokens, GeneratedTokens (no prefixes)."""
    rows = []
    with open(path) as f:
        header = f.readline().strip().split(",")
        ti, ci, gi = header.index("TIMESTAMP"), header.index("ContextTokens"), header.index("GeneratedTokens")
        for line in f:
            parts = line.strip().split(",")
            if len(parts) < 3:
                continue
            rows.append((_azure_time(parts[ti]), int(parts[ci]), int(parts[gi])))
            if limit and len(rows) >= limit:
                break
    t0 = rows[0][0] if rows else 0.0
    out = []
    next_block = 1 << 48
    for t, c, g in rows:
        n = -(-c // block_tokens)
        out.append({"arrival_ms": t - t0, "prompt_tokens": c, "output_tokens": g,
                    "prefix": np.arange(next_block, next_block + n, dtype=np.uint64), "block_tokens": block_tokens})
        next_block += n
    return out


def assign_origins(rng: np.random.Generator, rows: Iterable[dict], regions: Sequence[str], shares: Sequence[float],
                   priorities: Optional[dict[str, float]] = None, model: str = "chat") -> list[SimRequest]:
    """Trace rows -> requests with an origin region; requests whose prompts share a
    first block are one conversation and keep one region."""
    priorities = priorities or {"interactive": 0.8, "batch": 0.15, "best_effort": 0.05}
    names = list(priorities)
    weights = np.array([priorities[k] for k in names]) / sum(priorities.values())
    p = np.asarray(shares, dtype=np.float64) / np.sum(shares)
    cdf = np.cumsum(p)
    out = []
    for i, r in enumerate(sorted(rows, key=lambda r: r["arrival_ms"])):
        first = int(r["prefix"][0]) if len(r["prefix"]) else i
        u = (first * 0x9E3779B97F4A7C15 % (1 << 64)) / float(1 << 64)  # stable per conversation
        g = int(np.searchsorted(cdf, u, side="right"))
        g = min(g, len(regions) - 1)
        pri = names[int(rng.choice(len(names), p=weights))]
        out.append(SimRequest(i, r["arrival_ms"], regions[g], r["prompt_tokens"], r["output_tokens"], r["prefix"],
                              r["block_tokens"], pri, model, session=f"c{first}"))
    return out


def follow_the_sun(rows: list[dict], regions: Sequence[str], day_ms: float, utc_offsets: Sequence[float]) -> list[tuple[str, dict]]:
    """One copy of a trace per region, shifted so each copy's start falls at that
    region's same local time (a trace recorded in one place, replayed everywhere)."""
    out = []
    for g, region in enumerate(regions):
        shift = ((-utc_offsets[g]) % 24.0) / 24.0 * day_ms
        for r in rows:
            copy = dict(r)
            copy["arrival_ms"] = (r["arrival_ms"] + shift) % day_ms
            copy["prefix"] = r["prefix"] + np.uint64(g << 56)  # regions do not share caches
            out.append((region, copy))
    return out


def scale_rate(rows: list[dict], target_rate: float) -> list[dict]:
    """Compress (or stretch) time so the trace's mean rate is ``target_rate`` req/s."""
    if len(rows) < 2:
        return rows
    span = max(r["arrival_ms"] for r in rows) - min(r["arrival_ms"] for r in rows)
    factor = (len(rows) / target_rate * 1000.0) / span if span > 0 else 1.0
    return [dict(r, arrival_ms=r["arrival_ms"] * factor) for r in rows]
