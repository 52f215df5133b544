"""Counts of Triton compile variants for the README's specialisation table: `python -m benchmarks.triton_variants`
(from the repository root; CPU, no GPU needed). The test model of tests/integration/test_workflows.py, converted,
runs on the Triton launchers with the GPU launch configuration (and ConvBN's CUDA choice of ops), every kernel
replaced by a recorder of its compile key (Triton's own binder; nothing is computed), as
test_triton_specialisations_are_bounded does. Prints, per row, (compiled variants, kernels, distinct meta-parameter
tuples)."""
import os
import random

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

import shvit_kernels as sk
from shvit_kernels.nn import ConvBN
from shvit_kernels.nn._match import is_pointwise
from tests.helpers import replace_triton_kernels, size_launchers_for_gpu, triton_compile_key
from tests.integration import test_workflows as W


def main() -> None:
    binders, seen = {}, {}

    def record(name, kernel, grid, args, kwargs):
        key = f"{kernel.fn.__module__.rsplit('.', 1)[-1]}.{name}"
        seen.setdefault(key, set()).add(triton_compile_key(binders, kernel, args, kwargs))

    model = sk.convert(W._stock(), channels_last=False)
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)  # garbage activations

    def count(sizes, evaluate: bool, train: bool) -> tuple[int, int, int]:
        seen.clear()
        for hw in sizes:
            if evaluate:
                with torch.no_grad():
                    model.eval()(torch.zeros(1, 3, *hw))
            if train:
                model.train()(torch.zeros(2, 3, *hw)).sum().backward()
        return (sum(len(v) for v in seen.values()), len(seen), sum(len({W._meta(k) for k in v}) for v in seen.values()))

    detection = [(r.randint(480, 1344), r.randint(480, 1344)) for r in [random.Random(0)] for _ in range(200)]
    rows = {"224, eval": ([(224, 224)], True, False), "224, training": ([(224, 224)], False, True),
            "five resolutions": (W.RESOLUTIONS, True, True),
            "square 112..1024 px": ([(16 * h, 16 * h) for h in W.SWEEP], True, True),
            "50 detection sizes, eval": (detection[:50], True, False),
            "200 detection sizes, eval": (detection, True, False)}
    with pytest.MonkeyPatch.context() as mp, W._backend("triton"):
        replace_triton_kernels(mp, record)
        size_launchers_for_gpu(mp)
        mp.setattr(ConvBN, "_runs_op", lambda self, x, train, gated: is_pointwise(self))  # ConvBN as on CUDA
        for name, args in rows.items():
            print(f"{name}: {count(*args)}", flush=True)


if __name__ == "__main__":
    main()
