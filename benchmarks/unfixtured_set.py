"""The station's part (or the bracket), not fixtured: the check for the place score on parts that move (round 12).

`synth` draws the part with +-2.5 px of placement jitter at 128 px. This draws it at 160x160 and cuts every
image (and mask) to 128x128 at a random offset of up to +-SHIFT px in x and y, so the part moves that much more
from image to image; `--shift 0` cuts the centre (the fixtured control, same part scale). A defect image whose
defect the cut left fewer than 4 pixels of is dropped, with its kind. `--kind bracket` does the same with
benchmarks/bracket_set.py's stamped bracket (its own jitter: +-4 px, +-3 degrees).

    PYTHONPATH=.:benchmarks python benchmarks/unfixtured_set.py data/unfix16 --shift 16 [--seed 5] [--kind bracket]
"""

from __future__ import annotations

import argparse
import csv
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np

from edge_agent import synth

FRAME, CUT = 160, 128


def cut_dataset(src: Path, out: Path, shift: int, seed: int) -> int:
    """out/{train/good, calib/good, test/good, test/defect (+ kinds.csv), test/masks}; returns the defects kept."""
    if not 0 <= shift <= (FRAME - CUT) // 2:
        raise SystemExit(f"--shift {shift} must be 0..{(FRAME - CUT) // 2}")
    rng = np.random.default_rng(seed)
    kinds_file = src / "test/defect/kinds.csv"
    kinds = dict(list(csv.reader(kinds_file.open()))[1:]) if kinds_file.exists() else {}
    kept: list[str] = []
    margin = (FRAME - CUT) // 2
    for split in ("train/good", "calib/good", "test/good", "test/defect"):
        (out / split).mkdir(parents=True, exist_ok=True)
        for f in sorted((src / split).glob("*.png")):
            dy, dx = rng.integers(-shift, shift + 1, 2) if shift else (0, 0)
            y0, x0 = margin + int(dy), margin + int(dx)
            if split == "test/defect":
                mask = cv2.imread(str(src / "test/masks" / f.name), cv2.IMREAD_GRAYSCALE)[y0:y0 + CUT, x0:x0 + CUT]
                if int((mask > 0).sum()) < 4:
                    continue
                (out / "test/masks").mkdir(exist_ok=True)
                cv2.imwrite(str(out / "test/masks" / f.name), mask)
                kept.append(f.name)
            image = cv2.imread(str(f), cv2.IMREAD_UNCHANGED)[y0:y0 + CUT, x0:x0 + CUT]
            cv2.imwrite(str(out / split / f.name), image)
    if kinds:
        with (out / "test/defect/kinds.csv").open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["image", "kind"])
            writer.writerows([name, kinds[name]] for name in kept)
    return len(kept)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--shift", type=int, default=16, help="largest extra offset in px (0 = fixtured control)")
    ap.add_argument("--seed", type=int, default=5, help="synth's data set seed")
    ap.add_argument("--cut-seed", type=int, default=11, help="seed of the offsets")
    ap.add_argument("--kind", choices=("part", "bracket"), default="part")
    a = ap.parse_args()
    defects = 100
    if a.kind == "bracket":
        import bracket_set  # benchmarks/bracket_set.py: another tool's part

        synth.KINDS["bracket"] = bracket_set.make_bracket
        defects = 180
    if a.out.exists():
        shutil.rmtree(a.out)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp)
        synth.write_dataset(src, n_train=200, n_calib=100, n_test_good=100, n_test_defect=defects, seed=a.seed,
                            size=FRAME, kind=a.kind)
        kept = cut_dataset(src, a.out, a.shift, a.cut_seed)
    print(f"wrote {a.out}: {a.kind} moved up to +-{a.shift} px; {kept} of {defects} defect images kept")


if __name__ == "__main__":
    main()
