"""torch.compile (Inductor, freezing) against the frozen TorchScript score, per core, fp32 and bf16.

A probe for the TorchScript migration question in docs/PERFORMANCE.md, not part of the bench: it
compiles the seed VAE's score four times (minutes on a loaded 2-core machine). One thread, CPU time,
one 128-patch batch, interleaved with the per-core matmul limits. Usage:

    PYTHONPATH=. python benchmarks/compile_probe.py
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch._inductor.config as inductor

from edge_agent.bench import SEED, export_seed, matmul_limit, vae_flops_per_patch
from edge_agent.scoring import WEIGHTED, Scorer
from edge_agent.train import nets
from edge_agent.train.fit import TrainOptions, build_model


class _Score(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.score(x, "m")


def _compiled(rewrite: str, precision: str):
    torch.manual_seed(0)  # export_seed's weights
    model = nets.fold_decoder_batchnorm(build_model(TrainOptions(model="vae", channels=1, **SEED)))
    if rewrite == "subpixel_output":
        model = nets.subpixel_decoder(model)
    module = _Score(model).eval().to(memory_format=torch.channels_last)
    if precision == "bf16":  # the Scorer's mixed policy: every weighted layer but the last in bf16
        leaves = [m for m in module.modules() if not list(m.children())]
        weighted = [m for m in leaves if type(m).__name__ in WEIGHTED]
        for m in leaves:
            if m is not weighted[-1]:
                m.to(torch.bfloat16)
    return torch.compile(module)


def main() -> None:
    torch.set_num_threads(1)
    inductor.freezing = True
    batch = 128
    x = torch.rand(batch, 1, 96, 96).contiguous(memory_format=torch.channels_last)
    flops = vae_flops_per_patch(1, 96, SEED["nc"], SEED["nz"]) * batch
    fns, compile_s = {}, {}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        path = Path(tmp) / "seed.pt"
        export_seed(path, False, 640, 480)
        for precision in ("fp32", "bf16"):
            for rewrite in ("deconv", "subpixel_output"):
                t0 = time.time()
                fn = _compiled(rewrite, precision)
                fn(x)
                compile_s[f"inductor_{rewrite}_{precision}"] = time.time() - t0
                fns[f"inductor_{rewrite}_{precision}"] = fn
            fns[f"torchscript_{precision}"] = Scorer(path, device="cpu", precision=precision, threshold=0.0).score_patches
        best: dict[str, float] = {}
        for _ in range(3):
            for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
                rate = matmul_limit(torch.device("cpu"), dtype, 1, [1], time.process_time)["gflops"]
                best[f"matmul_{name}"] = max(best.get(f"matmul_{name}", 0.0), rate)
            for name, fn in fns.items():
                t0 = time.process_time()
                fn(x)
                best[name] = max(best.get(name, 0.0), flops / (time.process_time() - t0) / 1e9)
    fractions = {k: v / best["matmul_bf16" if k.endswith("bf16") else "matmul_fp32"]
                 for k, v in best.items() if not k.startswith("matmul")}
    print(json.dumps({"gflops": best, "fraction_of_own_matmul": fractions, "compile_s": compile_s,
                      "load_average": os.getloadavg(), "torch": torch.__version__}, indent=2))


if __name__ == "__main__":
    main()
