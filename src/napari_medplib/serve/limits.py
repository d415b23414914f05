"""Server settings that bound what one request may cost, and a per-client rate limit.

Everything a client controls has a cap checked before work starts: body sizes (from the declared
Content-Length, and by counting bytes as they arrive), the number of regions, the question's length,
``max_new_tokens``, the history, the queue length. A request over a cap gets a 4xx with one line.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

MiB = 2**20


@dataclass
class ServeLimits:
    """Caps of one server (defaults fit a 2048² 16-bit plane and a long answer with room to spare)."""

    max_upload_bytes: int = 512 * MiB  # one image upload
    max_json_bytes: int = 32 * MiB  # one ask/segment request (mask regions and priors ride in it)
    max_regions: int = 64
    max_question_chars: int = 4_000
    max_new_tokens: int = 2_048
    max_history_turns: int = 16
    max_queue: int = 64  # jobs waiting for the model; more get 503 + Retry-After
    image_cache_bytes: int = 2048 * MiB  # uploaded images kept (LRU by bytes)
    rate: float = 50.0  # requests per second per client address, sustained
    burst: int = 200  # requests a client may make at once

    def describe(self) -> dict[str, int | float]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


@dataclass
class RateLimiter:
    """Token bucket per client address: ``rate`` per second, up to ``burst`` at once."""

    rate: float
    burst: int
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def allow(self, who: str, now: float | None = None) -> float:
        """0.0 when the request may go ahead, else the seconds until it may (Retry-After)."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, last = self._buckets.get(who, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[who] = (tokens - 1.0, now)
                if len(self._buckets) > 10_000:  # forget idle clients (full buckets)
                    self._buckets = {k: v for k, v in self._buckets.items() if v[0] < self.burst - 1}
                return 0.0
            self._buckets[who] = (tokens, now)
            return (1.0 - tokens) / self.rate
