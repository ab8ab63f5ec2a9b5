"""Nearest-neighbour search for PatchCore: exact matmul + min (numpy, and inside a Paddle
Inference program with oneDNN, as the model runs it) against faiss-cpu's exact IndexFlatL2.

    python bench/patchcore_nn.py [--dim 152] [--queries 1024] [--banks 2048,8192,16384,32768,65536]

Queries are one 256x256 image's patches at stride 8 (1024); the bank is random float32
features of the model's width. Prints the median of 20 runs per method and bank size, ms.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import paddle

from stfpm.model.export import open_program
from stfpm.nn.patchcore import MemoryBank
from stfpm.runtime import configure_threads




def median_ms(fn, runs: int = 20) -> float:
    fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=152)
    ap.add_argument("--queries", type=int, default=1024)
    ap.add_argument("--banks", default="2048,8192,16384,32768,65536")
    args = ap.parse_args()
    configure_threads()
    import faiss

    rng = np.random.default_rng(0)
    queries = rng.standard_normal((args.queries, args.dim)).astype(np.float32)
    print(f"{'bank':>7} {'numpy ms':>9} {'paddle-inference ms':>20} {'faiss ms':>9}  max |diff|")
    for size in (int(b) for b in args.banks.split(",")):
        bank = rng.standard_normal((size, args.dim)).astype(np.float32)
        bank_sq = (bank ** 2).sum(1)

        def numpy_nn(bank=bank, bank_sq=bank_sq):
            return np.sqrt(np.maximum((bank_sq[None] - 2 * queries @ bank.T).min(1) + (queries ** 2).sum(1), 0))

        layer = MemoryBank(size, args.dim)  # what the model's program runs
        layer.patches.set_value(bank)
        layer.eval()
        with tempfile.TemporaryDirectory() as tmp:
            paddle.jit.save(layer, f"{tmp}/inference",
                            input_spec=[paddle.static.InputSpec([None, args.dim], "float32", "patches")])
            program = open_program(tmp)
        index = faiss.IndexFlatL2(args.dim)
        index.add(bank)

        def faiss_nn(index=index):
            return np.sqrt(np.maximum(index.search(queries, 1)[0][:, 0], 0))

        diff = max(np.abs(program(queries)[0] - numpy_nn()).max(), np.abs(faiss_nn() - numpy_nn()).max())
        print(f"{size:>7} {median_ms(numpy_nn):>9.1f} {median_ms(lambda program=program: program(queries)):>20.1f} "
              f"{median_ms(faiss_nn):>9.1f}  {diff:.1e}", flush=True)


if __name__ == "__main__":
    main()
