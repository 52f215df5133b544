"""SHViT S1-S4: batch-1 latency (CUDA graphs on the GPU), batch throughput and a training step, as stock eager,
torch.compile, timm's shvit_s*, fused and fused + torch.compile. Scenarios and sizes: shvit_kernels/bench_models.py."""
import pytest

from shvit_kernels import bench_models as bm

from .settings import DEVICE, SIZE, dtypes


@pytest.mark.parametrize("variant", list(bm.VARIANTS))
@pytest.mark.parametrize("scenario", bm.SCENARIOS)
@pytest.mark.parametrize("model", SIZE.models)
@pytest.mark.parametrize("dtype", dtypes(("bfloat16",)), ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("device", [DEVICE], ids=str)
def test_model(measure, benchmark, device, dtype, model, scenario, variant):
    if bm.VARIANTS[variant][1] and not SIZE.compile:
        pytest.skip("compile variants are off (SHVIT_BENCH_COMPILE=1 to include them)")
    batch = None if scenario == "infer b1" else SIZE.model_batch
    try:
        p = bm.prepare_model(model, scenario, variant, device, dtype, batch, SIZE.resolution)
    except bm.Unavailable as e:
        pytest.skip(str(e))
    benchmark.group = f"{model} {scenario} b{p.batch} {p.resolution}px {str(dtype).removeprefix('torch.')}"
    ms = measure(p.fn, dtype, gflop=p.gflop, model=model, scenario=scenario, variant=variant, batch=p.batch,
                 resolution=p.resolution, note=p.note)
    benchmark.extra_info.update(images_per_s=p.batch / (ms * 1e-3) if ms else None,
                                peak_mib=bm.peak_mib(p.fn, device))
    del p
    bm.release(device)
