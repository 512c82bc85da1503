"""One text progress line for a training job, shared by `tunegate jobs follow` and `tunegate
demo`: ``[#####.....] 12/45 loss 0.8123 1,234 tok/s ETA 3 min 12 s``."""

from __future__ import annotations


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    s = max(0, round(seconds))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"


def bar(step: int, total: int | None, loss: float | None, tokens_per_s: float | None,
        eta_s: float | None, width: int = 30) -> str:
    done = min(width, int(width * step / total)) if total else 0
    loss_s = f"{loss:.4f}" if loss is not None else "–"
    tps = f"{tokens_per_s:,.0f}" if tokens_per_s is not None else "–"
    return (f"[{'#' * done}{'.' * (width - done)}] {step}/{total or '?'} loss {loss_s} "
            f"{tps} tok/s ETA {duration(eta_s)}")


def stages_bar(stage: int, stages: int, what: str, width: int = 10) -> str:
    """``[####......] 2/5 verifying ...`` for work done in a few stages (model builds)."""
    n = min(width, int(width * stage / stages)) if stages else 0
    return f"[{'#' * n}{'.' * (width - n)}] {stage}/{stages} {what}"
