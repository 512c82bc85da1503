"""Canary and shadow choice on the request path (gateway.promotion), over a real SQLite registry:
only bare names take part, the weights are honoured, the table follows state changes."""

from __future__ import annotations

import asyncio
from pathlib import Path

from prometheus_client import CollectorRegistry

from gateway.promotion import PromotionRouting
from shared.db import Database
from shared.promotion import Promotions, PromotionSettings
from shared.registry import Registry


def test_canary_weight_shadow_fraction_and_pinning(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    reg = Registry(db, str(tmp_path / "artifacts"))
    for i in (1, 2):
        (Path(reg.store.root) / f"staging/{i}").mkdir(parents=True)
        (Path(reg.store.root) / f"staging/{i}/w").write_text(str(i))
        reg.register_version("rt", f"staging/{i}", {})
    reg.set_alias("rt", "stable", 1)
    promotions = Promotions(db, reg, PromotionSettings(canary_weight=0.3, shadow_fraction=0.6))
    draws = iter([0.5, 0.2, 0.7, 0.29, 0.1])
    routing = PromotionRouting(promotions, None, CollectorRegistry(), rng=lambda: next(draws))

    async def run() -> None:
        await routing.refresh()
        stable = reg.resolve("rt")
        assert routing.route("rt", stable) == (stable, None)  # nothing under promotion
        promotions.start("rt", 2, actor="op", reason="r")
        promotions.advance("rt", actor="op", reason="r")
        await routing.refresh()
        assert routing.shadow_route("rt", stable) is not None  # 0.5 < 0.6
        assert routing.shadow_route("rt", stable) is not None  # 0.2
        assert routing.shadow_route("rt", stable) is None  # 0.7
        assert routing.shadow_route("rt:stable", reg.resolve("rt:stable")) is None  # pinned
        assert routing.route("rt", stable)[1] is None  # shadow is never served
        promotions.advance("rt", actor="op", reason="r")
        await routing.refresh()
        served, promo = routing.route("rt", stable)  # 0.29 < 0.3
        assert promo is not None and served.ref == "rt@v2" and served.requested == "rt"
        assert routing.route("rt@v1", reg.resolve("rt@v1"))[1] is None  # pinned, no draw
        assert routing.shadow_route("rt", stable) is None  # canary state: no shadow copies
        served, promo = routing.route("rt", stable)  # 0.1
        assert served.ref == "rt@v2"
        promotions.stop("rt", actor="monitor", reason="worse")
        await routing.refresh()
        assert routing.routes == {} and routing.route("rt", stable) == (stable, None)

    asyncio.run(run())
