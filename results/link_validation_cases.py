"""Link the validation cases of a slice cache (images and labels, by dataset) into WORK, for the
run.sh scripts that predict and evaluate them as files:  python3 results/link_validation_cases.py CACHE WORK"""

import json
import os
import sys
from pathlib import Path

meta = json.load(open(Path(sys.argv[1]) / "meta.json"))
folds = {d["name"]: d["split"]["fold"] for d in meta["datasets"]}
for case in meta["cases"]:
    if case["fold"] != folds[case["dataset"]]:
        continue
    for kind, source in (("images", case["image"]), ("labels", case["label"])):
        target = Path(sys.argv[2]) / case["dataset"] / kind / Path(source).name
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            os.symlink(source, target)
