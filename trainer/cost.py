"""What a fine-tuning job cost: trained tokens, device seconds by phase, an estimated price.

A job holds its worker's device (the GPU, or the CPU cores of a CPU worker) from the moment it
starts running until it ends, so the device seconds of a phase are its wall-clock seconds. The
phases are the pipeline's: ``validate`` (files checked, base model scored when asked), ``train``
(model load to saved adapter), ``evaluate`` (golden set, stable's score), ``register`` (upload,
manifest, aliases). The estimate is ``total seconds / 3600 * price per device-hour``; the price
is ``TUNEGATE_TRAINER_PRICE_PER_DEVICE_HOUR`` (``trainer.settings.TrainerSettings``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

PHASES = ("validate", "train", "evaluate", "register")


@dataclass
class CostMeter:
    """Device seconds per phase of one job; ``report`` turns them into the cost record."""

    price_per_device_hour: float  # in ``currency``
    currency: str = "usd"
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    clock: Any = time.monotonic  # seconds; replaceable for tests of the arithmetic

    _current: str | None = None
    _since: float = 0.0

    def enter(self, name: str) -> None:
        """From now on the device time is ``name``'s (the phase before it ends here)."""
        if name not in self.seconds:
            raise ValueError(f"unknown phase {name!r}; one of {', '.join(PHASES)}")
        self.stop()
        self._current, self._since = name, self.clock()

    def stop(self) -> None:
        """The current phase (if any) ends now; a phase that raised still counts."""
        if self._current is not None:
            self.seconds[self._current] += max(0.0, self.clock() - self._since)
            self._current = None

    @property
    def total_s(self) -> float:
        return sum(self.seconds.values())

    def report(self, trained_tokens: int | None) -> dict[str, Any]:
        """The job's cost record (``result["cost"]``, the job object's ``tunegate.cost``, the
        job's closing cost event, its checkpoint's metrics). Seconds to 0.1 s; the estimate to
        1/10,000 of the currency."""
        total = self.total_s
        return {
            "trained_tokens": int(trained_tokens or 0),
            "device_seconds": {
                **{k: round(v, 1) for k, v in self.seconds.items()},
                "total": round(total, 1),
            },
            "price_per_device_hour": self.price_per_device_hour,
            "currency": self.currency,
            "estimated_cost": round(total / 3600.0 * self.price_per_device_hour, 4),
        }


def cost_message(cost: dict[str, Any]) -> str:
    secs = cost["device_seconds"]
    parts = ", ".join(f"{k} {secs[k]:.1f} s" for k in PHASES if secs.get(k))
    return (
        f"Cost: {cost['trained_tokens']:,} trained tokens, {secs['total']:.1f} device "
        f"seconds ({parts or 'none'}), estimated {cost['estimated_cost']:.4f} "
        f"{cost['currency'].upper()} at {cost['price_per_device_hour']:g}/device-hour"
    )
