"""What per-place whitening costs per frame: one model with it, the same model with one Gaussian, and (where the card
has them) without the cells' scales, interleaved.

    python benchmarks/whiten_place_cost.py MODEL IMAGE... [--rounds 4]

MODEL must have per-place whitening (its card's anomaly_map.white.place). The copy keeps the global Gaussian
the card also holds (the scores differ, the work is what the daemon would do with one Gaussian). Prints the
median seconds per frame of each and of the head alone (MapHead.patch_scores), fp32 on the CPU.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from edge_agent import artifact
from edge_agent.anomaly_map import WHITE_PLACE_ENTRY
from edge_agent.images import read_image
from edge_agent.scoring import Scorer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("images", type=Path, nargs="+")
    ap.add_argument("--rounds", type=int, default=4)
    a = ap.parse_args()
    if not (artifact.verify(a.model).get("anomaly_map") or {}).get("white", {}).get("place"):
        raise SystemExit(f"{a.model} has no per-place whitening")
    tmp = Path(tempfile.mkdtemp()) / "one.pt"
    shutil.copy(a.model, tmp)

    def drop(card):
        card["anomaly_map"]["white"].pop("place")
        return card

    artifact.update_card(tmp, drop, extras={WHITE_PLACE_ENTRY: None})
    scorers = {"per place": Scorer(a.model, device="cpu", precision="fp32"),
               "one Gaussian": Scorer(tmp, device="cpu", precision="fp32")}
    if "scale" in artifact.verify(a.model)["anomaly_map"]["white"]["place"]:
        unscaled = tmp.with_name("unscaled.pt")
        shutil.copy(a.model, unscaled)

        def unscale(card):
            card["anomaly_map"]["white"]["place"].pop("scale")
            return card

        artifact.update_card(unscaled, unscale)
        scorers["per place, no scales"] = Scorer(unscaled, device="cpu", precision="fp32")
    frames = [read_image(f) for f in a.images]
    total = {k: [] for k in scorers}
    head = {k: [] for k in scorers}
    for _ in range(a.rounds):
        for name, s in scorers.items():
            for image in frames:
                t0 = time.perf_counter()
                grid, patches = s.patches(image)
                maps, residuals, codes = s.maps_residuals(patches)
                t1 = time.perf_counter()
                with torch.inference_mode():
                    s.head.patch_scores(grid, maps, s._head_cache, codes=codes, residuals=residuals)
                t2 = time.perf_counter()
                total[name].append(t2 - t0)
                head[name].append(t2 - t1)
    for name in scorers:
        print(f"{name}: {statistics.median(total[name]):.3f} s per frame, head {1000 * statistics.median(head[name]):.1f} ms "
              f"({len(total[name])} frames, torch threads {torch.get_num_threads()})")


if __name__ == "__main__":
    main()
