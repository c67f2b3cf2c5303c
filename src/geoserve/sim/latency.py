"""How long a simulated replica takes: Llama-2-70B on H100, tensor parallel 4.

Calibrated from Splitwise's measurements (``shared/data/latency/splitwise/
perf_model.csv``, MIT; rows ``hardware=h100-80gb, tensor_parallel=4``):

* **prefill** - piecewise linear through the medians of ``prompt_time`` by prefill
  tokens (``prompt_size x batch_size``, 128 to 32,768), extended linearly beyond
  with the last segment's slope (0.109 ms/token). A straight line cannot fit this
  data within 10 % below 1k tokens (there is a ~45 ms floor), so the simulator
  keeps the curve; the router's own profile (``ModelProfile``: 7.7 + 0.107/token)
  is the linear fit and is allowed to be wrong at the small end, as a real
  router's model would be.
* **time per output token** - linear in the decode batch, the least-squares fit of
  the medians by batch size: 28.3 + 0.352 ms per sequence in the batch (within 8 %
  of every median, batch 1-64).

``tests/test_sim_latency.py`` recomputes both from the CSV and checks them.
"""

from __future__ import annotations

from bisect import bisect_left

# (prefill tokens, median prompt_time ms) of the h100-80gb TP4 rows
SPLITWISE_H100_TP4_PREFILL = (
    (128, 49.1), (256, 51.0), (512, 59.7), (1024, 104.6), (2048, 200.5),
    (4096, 456.7), (8192, 924.9), (16384, 1726.1), (32768, 3520.5),
)
SPLITWISE_H100_TP4_TPOT = (28.3, 0.352)  # base ms, ms per sequence in the batch


class LatencyModel:
    """prefill_ms(tokens) and tpot_ms(batch), scaled by ``speed`` (2.0 = twice as slow)."""

    __slots__ = ("_x", "_y", "_slope", "tpot_base_ms", "tpot_ms_per_batch", "scale")

    def __init__(self, prefill_points=SPLITWISE_H100_TP4_PREFILL, tpot=SPLITWISE_H100_TP4_TPOT, scale: float = 1.0) -> None:
        pts = sorted(prefill_points)
        self._x = [float(p[0]) for p in pts]
        self._y = [float(p[1]) * scale for p in pts]
        self._slope = (self._y[-1] - self._y[-2]) / (self._x[-1] - self._x[-2])
        self.tpot_base_ms = tpot[0] * scale
        self.tpot_ms_per_batch = tpot[1] * scale
        self.scale = scale

    def scaled(self, factor: float) -> "LatencyModel":
        """The same curve for a model ``factor`` times as fast per token (e.g. 8B vs 70B)."""
        pts = tuple(zip(self._x, (y / self.scale for y in self._y)))
        return LatencyModel(pts, (self.tpot_base_ms / self.scale, self.tpot_ms_per_batch / self.scale), self.scale * factor)

    def prefill_ms(self, tokens: float) -> float:
        if tokens <= 0:
            return 0.0
        x, y = self._x, self._y
        if tokens <= x[0]:
            return y[0]  # below the first point the floor holds (fixed cost of a forward pass)
        if tokens >= x[-1]:
            return y[-1] + self._slope * (tokens - x[-1])
        i = bisect_left(x, tokens)
        return y[i - 1] + (y[i] - y[i - 1]) * (tokens - x[i - 1]) / (x[i] - x[i - 1])

    def tpot_ms(self, batch: int) -> float:
        return self.tpot_base_ms + self.tpot_ms_per_batch * batch
