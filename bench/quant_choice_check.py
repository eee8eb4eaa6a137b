"""Does the rounding choice carry over to other seeds? ``python -m bench.quant_choice_check <pipeline>``.

The headline's E2M1 ``+choice`` row once more (calibration on seeds 1000-1009, the choice on 1000-1029, every block
linear at E2M1 g32 bf16), then it, E2M1 adaround without the choice and INT4 GPTQ measured on the headline's seeds
(0-19) and on 40 others (100-139): pooled PSNR and worst image against the fp32 pipeline, printed (one CPU thread;
the choice takes 9 min on digits-flux, 17 on digits-dit).
"""

from __future__ import annotations

import argparse
import dataclasses

import torch


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.quant_choice_check", description=__doc__)
    p.add_argument("pipeline", choices=["digits-dit", "digits-flux"])
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    import ditkern
    from bench.quant_fidelity import headline_settings
    from ditkern import zoo
    from ditkern.quant import calibrate, choose_rounding
    from ditkern.zoo import fidelity

    pipe = zoo.load(a.pipeline)
    calib, sel = list(range(1000, 1010)), list(range(1000, 1030))
    cal = calibrate(pipe, lambda: [zoo.generate(pipe, [s % 10], [s]) for s in calib])
    settings = dict(headline_settings(cal))  # the headline's own configs
    ada = settings["fp4_e2m1 g32 bf16 adaround blocks"]
    chosen = choose_rounding(pipe, lambda: zoo.generate(pipe, [s % 10 for s in sel], sel), ada, progress=False)
    print(chosen.rounding, flush=True)
    rows = {"E2M1 adaround+choice": dataclasses.replace(ada, calibration=chosen), "E2M1 adaround": ada,
            "INT4 GPTQ": settings["int4 g32 bf16 gptq blocks"]}  # fmt: skip
    for tag, seeds in [("seeds 0-19", list(range(20))), ("seeds 100-139", list(range(100, 140)))]:
        classes = [s % 10 for s in seeds]
        ref = zoo.generate(pipe, classes, seeds)
        for name, qc in rows.items():
            ditkern.patch(pipe, quant=qc, fused_norms=False, backend="torch")
            img = zoo.generate(pipe, classes, seeds)
            ditkern.unpatch(pipe)
            print(f"{a.pipeline} {tag} {name:22s} {fidelity.pooled_psnr(img, ref):.2f} "
                  f"worst {fidelity.psnr(img, ref).min():.2f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
