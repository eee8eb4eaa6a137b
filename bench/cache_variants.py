"""The ditkern rows of ``python -m bench.cache_sweep``: one place that lists the TaylorCache variants the sweep measures,
how each is built and whether it is calibrated first (the sweep owns the measuring, the baselines and the tables).

``ditkern_rows(pipeline, steps, quick)`` -> list of :class:`Row`. ``apply(pipe, row, steps)`` patches the pipeline with
the row's config, calibrates it on ``ditkern.zoo.demo.CALIB_SEEDS`` (the demo's six seeds, never the measured ones)
when the row says so, and returns the note for the table (the calibrated schedule, the cache's warnings); the caller
measures and then ``ditkern.unpatch``es.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import NamedTuple

#: TaylorCache.front per pipeline: about a third of the cached chain (measured on digits-dit-deep at 28 steps: 5 of
#: 16 blocks on 7 steps and the rest on 5 beat one group on 6 steps, 31.5 / 27.8 vs 30.5 / 26.3 dB, at 0.20 vs 0.21)
FRONT = {"digits-dit": 2, "digits-flux": 2, "digits-dit-deep": 5, "digits-flux-deep": 5}


class Row(NamedTuple):
    method: str  # the curve in the plot / table
    setting: str  # the point on it
    build: Callable[[], object]  # -> ditkern.TaylorCache
    calibrate: bool = False  # calibrate on ditkern.zoo.demo.CALIB_SEEDS before measuring


def ditkern_rows(pipeline: str, steps: int, quick: bool = False) -> list[Row]:
    """The ditkern settings measured on ``pipeline`` at ``steps`` sampling steps (``quick``: fewer)."""
    from ditkern import TaylorCache  # noqa: PLC0415

    out = []
    intervals = (3, 6) if quick else (2, 3, 4, 6)
    for order in (1, 2):
        for n in intervals:
            out.append(Row(f"ditkern fixed o{order}", f"interval={n}", lambda o=order, n=n: TaylorCache(order=o, interval=n)))
    for n in (4, 5, 6) if quick else (2, 3, 4, 5, 6):
        out.append(Row("ditkern end-anchored o1", f"interval={n}", lambda n=n: TaylorCache.end_anchored(steps, n, order=1)))
    # correct=True (default): the calibration may pick per-step gains; forecast=None: it measures the output forecast on
    # its three best schedules too. 0.36 / 0.4: diffusers' TaylorSeer at interval 3 computes 0.36 of the steps at 50,
    # 0.39 at 28 (0.4 rounds to the same 11 of 28 steps)
    for b in (0.15, 0.18, 0.2, 0.25) if quick else (0.15, 0.18, 0.2, 0.25, 0.3, 0.36, 0.4):
        out.append(Row("ditkern budget o1", f"budget={b}", lambda b=b: TaylorCache(order=1, budget=b), calibrate=True))
    # second order: the fixed o2 rows are above o1 at the same interval on DiT; 0.3-0.7: the frontier at the fractions
    # where diffusers' TaylorSeer, FasterCache and cache-dit's TaylorSeer rows lie (2026-12-03 sweep: up to 2.8 dB above
    # the interval rows there)
    for b in (0.15, 0.18, 0.2) if quick else (0.15, 0.18, 0.2, 0.3, 0.36, 0.4, 0.55, 0.7):
        out.append(Row("ditkern budget o2", f"budget={b}", lambda b=b: TaylorCache(order=2, budget=b), calibrate=True))
    for b in (0.18, 0.2):  # ablation: schedule only
        out.append(Row("ditkern budget o1 uncorrected", f"budget={b}",
                       lambda b=b: TaylorCache(order=1, budget=b, correct=False), calibrate=True))  # fmt: skip
    # the calibration refined in closed loop (gains per segment, then single-step moves; 8-28 times its runs), from
    # the best schedule or from the three best (" x3": three times the cost)
    for order, budgets, k in ((1, (0.18, 0.2), 1), (2, (0.2,), 1), (1, (0.18, 0.2), 3)) if not quick else ():
        for b in budgets:
            out.append(Row(f"ditkern budget o{order} refined" + (f" x{k}" if k > 1 else ""), f"budget={b}",
                           lambda o=order, b=b, k=k: TaylorCache(order=o, budget=b, refine=True, refine_starts=k),
                           calibrate=True))  # fmt: skip
    # x3 with the wide step search first (steps moved up to 6 either way), maximising mean + worst image or the mean
    for obj, suffix in (("mean+worst", ""), ("mean", " mean")) if not quick else ():
        # 0.36 at 50 steps on digits-flux: diffusers' block TaylorSeer at 0.36 is 0.2 dB above one start (below)
        for b in (0.18, 0.2, *((0.36,) if steps == 50 and pipeline == "digits-flux" and not suffix else ())):
            out.append(Row("ditkern budget o1 refined x3 reach 6" + suffix, f"budget={b}",
                           lambda b=b, obj=obj: TaylorCache(order=1, budget=b, refine=True, refine_starts=3,
                                                            refine_reach=6, refine_objective=obj), calibrate=True))  # fmt: skip
    # one start with the wide search at the 50-step fractions where block-level peers lie above the frontier
    # (digits-flux: diffusers' block TaylorSeer at 0.36; digits-flux-deep: cache-dit DBCache F1B0 + TaylorSeer at
    # 0.325 and 0.39 of the blocks); one start, as three at 50 steps take about an hour per row on one thread
    for order, budgets in ((1, (0.3, 0.36)), (2, (0.3, 0.36, 0.38))):  # 0.38: 19 of 50 steps, below cache-dit's 0.39
        for b in budgets if steps == 50 and "flux" in pipeline and not quick else ():
            out.append(Row(f"ditkern budget o{order} refined reach 6", f"budget={b}",
                           lambda o=order, b=b: TaylorCache(order=o, budget=b, refine=True, refine_reach=6),
                           calibrate=True))  # fmt: skip
    front = FRONT.get(pipeline)
    for b in (0.18, 0.2) if front else ():  # a front group with its own state and steps among the candidates
        out.append(Row("ditkern budget o1 front", f"budget={b},front={front}",
                       lambda b=b: TaylorCache(order=1, budget=b, front=front), calibrate=True))  # fmt: skip
    for b in (0.2,) if front else ():  # o2 with a front group: at 28 steps a whole-stack 0.2 rounds to 6 steps (0.21)
        out.append(Row("ditkern budget o2 front", f"budget={b},front={front}",
                       lambda b=b: TaylorCache(order=2, budget=b, front=front), calibrate=True))  # fmt: skip
    # attention-level: every block and MLP runs, the self-attentions forecast (FasterCache's and PAB's trade; plotted
    # and compared at their attention fraction, as those are)
    for order in (1, 2):
        for n in (2, 3) if quick else (2, 3, 4):
            out.append(Row(f"ditkern attention o{order}", f"interval={n}",
                           lambda o=order, n=n: TaylorCache(order=o, interval=n, level="attention")))  # fmt: skip
    for g in (0.1, 0.3) if quick else (0.1, 0.2, 0.4):  # 0.05: below what digits-flux-deep reaches (never forecasts)
        out.append(Row("ditkern gated o1 calibrated", f"gate={g},max_skip=3",
                       lambda g=g: TaylorCache(order=1, gate=g, warmup=2, max_skip=3), calibrate=True))  # fmt: skip
    for g in (0.02, 0.08) if quick else (0.02, 0.04, 0.08):  # o0 / o2 and gate 0.01: pruned (2026-12-02 sweep: no
        # point below 0.47 of the blocks, o0 below o1 at equal blocks, 0.01 never forecasts on FLUX)
        out.append(Row("ditkern gated o1", f"gate={g},max_skip=3",
                       lambda g=g: TaylorCache(order=1, gate=g, warmup=2, max_skip=3)))  # fmt: skip
    return out


def apply(pipe, row: Row, steps: int) -> str:
    """Patch ``pipe`` with ``row``'s cache (calibrated first if the row says so); returns the note for the table."""
    import ditkern  # noqa: PLC0415
    import ditkern.zoo as zoo  # noqa: PLC0415
    from ditkern.zoo.demo import CALIB_SEEDS  # noqa: PLC0415 - the calibration's seeds (classes seed % 10)

    ditkern.patch(pipe, cache=row.build())
    if not row.calibrate:
        return ""
    cal = [s % 10 for s in CALIB_SEEDS]
    try:
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            done = ditkern.cache.calibrate(pipe, lambda: zoo.generate(pipe, cal, list(CALIB_SEEDS), num_inference_steps=steps))
    except BaseException:
        ditkern.unpatch(pipe)
        raise
    detail = f"schedule={list(done.schedule)}" if done.schedule else ""
    detail += f", front on {list(done.front_schedule)}" if done.front_schedule else ""
    detail += ", corrected" if done.step_gain else ""
    detail += ", refined" if done.refine else ""
    detail += ", output forecast" if done.forecast == "output" else ""
    return detail + "; ".join(str(w.message)[:120] for w in said if "TaylorCache" in str(w.message))
