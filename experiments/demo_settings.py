"""Run the demo with some of its settings changed, and print the held-out Dice and the time.

    python experiments/demo_settings.py OUT [SECTION.KEY=VALUE ...]

The words are ``m4oe train --set``'s, over the demo's recipe (``src/m4oe/demo/demo.yaml``): for example
``train.batch_size=12 train.samples_per_epoch=240 model.img_size=128`` (how the demo's setting was
chosen: docs/decisions.md).
"""

from __future__ import annotations

import json
import sys

import m4oe.demo.run as demo
from m4oe.config import ConfigError


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    out = sys.argv[1]
    try:
        result = demo.run_demo(out, say=lambda *_: None, overrides=sys.argv[2:])
    except ConfigError as err:
        raise SystemExit(str(err)) from None
    dice = {k: round(v, 3) for k, v in result.dice.items()}
    print(json.dumps({"settings": sys.argv[2:], "dice": dice, "mean": round(result.mean_dice, 3),
                      "seconds": round(result.seconds, 1)}))  # fmt: skip


if __name__ == "__main__":  # the data loader's worker processes import this file again
    main()
