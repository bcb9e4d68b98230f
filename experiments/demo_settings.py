"""Run the demo with some of its settings changed, and print the held-out Dice and the time.

    python experiments/demo_settings.py OUT [train.KEY=VALUE] [model.KEY=VALUE] [full.KEY=VALUE] ...

``train.*`` changes the demo's training settings (``batch_size``, ``lr``, ...), ``model.*`` its model
(``img_size``, ...), ``full.*`` its budget (``epochs``, ``samples_per_epoch``). How the demo's setting
was chosen (docs/results.md): for example ``train.batch_size=4 train.lr=0.003 model.img_size=96``.
"""

from __future__ import annotations

import json
import shutil
import sys

import yaml

import m4oe.demo.run as demo


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    out = sys.argv[1]
    sections = {"train": demo.TRAIN, "model": demo.MODEL, "full": demo.FULL}
    for pair in sys.argv[2:]:
        key, _, raw = pair.partition("=")
        section, _, name = key.partition(".")
        if section not in sections or not name or not raw:
            raise SystemExit(f"{pair!r}: expected train.KEY=VALUE, model.KEY=VALUE or full.KEY=VALUE")
        sections[section][name] = yaml.safe_load(raw)
    shutil.rmtree(out, ignore_errors=True)
    result = demo.run_demo(out, say=lambda *_: None)
    dice = {k: round(v, 3) for k, v in result.dice.items()}
    print(json.dumps({"settings": sys.argv[2:], "dice": dice, "mean": round(result.mean_dice, 3),
                      "seconds": round(result.seconds, 1)}))  # fmt: skip


if __name__ == "__main__":  # the data loader's worker processes import this file again
    main()
