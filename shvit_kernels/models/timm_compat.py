"""timm interoperability: import timm on a torch whose torchvision ops do not load, and rename SHViT
`state_dict` keys between timm's layout (`stages.{i}.downsample.{0..4}`, `stages.{i}.blocks.{j}`) and the
official one (`blocks{i+1}.{n}`) that `shvit_kernels.models` uses.

Layouts of one downsampling stage (the official code puts it at the head of the *next* stage):

    timm                      official
    stages.i.downsample.0     blocks{i+1}.0.0   residual depthwise conv
    stages.i.downsample.1     blocks{i+1}.0.1   residual FFN
    stages.i.downsample.2     blocks{i+1}.1     PatchMerging
    stages.i.downsample.3     blocks{i+1}.2.0   residual depthwise conv
    stages.i.downsample.4     blocks{i+1}.2.1   residual FFN
    stages.i.blocks.j         blocks{i+1}.{j+3} BasicBlock  ({j} in a stage without downsampling)

Every other key (`patch_embed.*`, `head.*`, `head_dist.*`) is the same in both.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import re
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import torch
from torch import nn

__all__ = ["import_timm", "load_timm_state_dict", "official_to_timm", "timm_to_official"]

# The two ops torchvision registers a fake (meta) kernel for by name at import time, which fails when its C++
# library did not load (e.g. a CUDA torchvision next to a CPU torch). Their schemas are all that import needs.
_TV_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
# Kept for the life of the process: a Library deregisters its definitions when it is garbage collected.
_tv_lib: torch.library.Library | None = None


def _has_torchvision_op(name: str) -> bool:
    try:
        getattr(torch.ops.torchvision, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def _load_torchvision_library() -> None:
    """Load torchvision's C++ ops the way torchvision itself would, without importing the package.

    This must come before any stand-in schema: were the real library loaded afterwards, its own
    registration of the same schemas would collide with ours.
    """
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    loader = (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES)
    for folder in spec.submodule_search_locations:
        ext = importlib.machinery.FileFinder(folder, loader).find_spec("torchvision._C")
        if ext is not None and ext.origin:
            try:
                torch.ops.load_library(ext.origin)
            except (ImportError, OSError):
                pass  # the broken-build case: fall back to stand-in schemas
            return


def _ensure_torchvision_schemas() -> None:
    global _tv_lib
    if all(_has_torchvision_op(n) for n in _TV_SCHEMAS):
        return  # torchvision's ops are registered (its library loaded, or we ran before)
    if importlib.util.find_spec("torchvision") is None:
        return  # timm imports without torchvision; nothing to patch
    _load_torchvision_library()
    missing = [n for n in _TV_SCHEMAS if not _has_torchvision_op(n)]
    if not missing:
        return
    if _tv_lib is None:
        _tv_lib = torch.library.Library("torchvision", "FRAGMENT")
    for name in missing:
        # Schema only, no kernel: torchvision.ops.nms stays unusable, but nothing SHViT needs calls it.
        _tv_lib.define(_TV_SCHEMAS[name])


def import_timm() -> ModuleType:
    """Return the `timm` module, first making torchvision importable if its C++ ops cannot load.

    Raises ImportError (with the cause chained) when timm is not installed or still fails to import.
    """
    if importlib.util.find_spec("timm") is None:
        raise ImportError("timm is not installed; `pip install timm` to use timm SHViT models")
    _ensure_torchvision_schemas()
    try:
        import timm
    except Exception as e:  # torchvision/timm raise RuntimeError too; callers only need to catch ImportError
        raise ImportError(f"timm is installed but failed to import: {type(e).__name__}: {e}") from e
    return timm


_TIMM_STAGE = re.compile(r"stages\.(\d+)\.(downsample|blocks)\.(\d+)\.(.+)")
_OFFICIAL_STAGE = re.compile(r"blocks(\d+)\.(\d+)\.(.+)")
_SEQ_CHILD = re.compile(r"(\d+)\.(.+)")
_STAGE_PREFIX = re.compile(r"stages\.|blocks\d+\.")  # keys that belong to a stage in one layout or the other
# timm downsample index -> official "entry.sub" (entries 0 and 2 are Sequential(dwconv, FFN)).
_DOWN_TO_OFFICIAL = ("0.0", "0.1", "1", "2.0", "2.1")
_DOWN_FROM_OFFICIAL = {p: i for i, p in enumerate(_DOWN_TO_OFFICIAL)}
_N_HEAD = 3  # official entries at the head of a stage that hold the downsampling
# First name component of every key inside a BasicBlock; downsampling entries have Sequential indices
# (entries 0, 2) or PatchMerging names (entry 1) there instead.
_BASIC_BLOCK_CHILDREN = frozenset({"conv", "mixer", "ffn"})


def timm_to_official(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Rename the keys of a timm `shvit_s*` state_dict to the official layout (values and order kept).

    Whether a stage downsamples (and so shifts its block indices by three) is read from the keys.
    Raises ValueError on a `stages.*` key of unknown shape or on a key already in the official layout.
    """
    parsed: list[tuple[str, re.Match | None]] = []
    downsampling: set[int] = set()
    for key in state_dict:
        m = _TIMM_STAGE.fullmatch(key)
        if m is None and _STAGE_PREFIX.match(key):
            raise ValueError(f"not a timm SHViT state_dict key: {key!r}")
        if m is not None and m[2] == "downsample":
            if int(m[3]) >= len(_DOWN_TO_OFFICIAL):
                raise ValueError(f"timm SHViT downsample has {len(_DOWN_TO_OFFICIAL)} entries, got key {key!r}")
            downsampling.add(int(m[1]))
        parsed.append((key, m))

    out: dict[str, Any] = {}
    for key, m in parsed:
        if m is None:
            out[key] = state_dict[key]
            continue
        stage, kind, idx, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "downsample":
            entry = _DOWN_TO_OFFICIAL[idx]
        else:
            entry = str(idx + _N_HEAD if stage in downsampling else idx)
        out[f"blocks{stage + 1}.{entry}.{rest}"] = state_dict[key]
    return out


def official_to_timm(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Rename the keys of an official-layout SHViT state_dict to timm's layout; inverse of `timm_to_official`.

    A stage is taken to start with the three downsampling entries when any of its first three entries holds
    a key that no BasicBlock has. Raises ValueError on keys that fit neither layout.
    """
    parsed: list[tuple[str, tuple[int, int, str] | None]] = []
    downsampling: set[int] = set()
    for key in state_dict:
        m = _OFFICIAL_STAGE.fullmatch(key)
        if m is None and _STAGE_PREFIX.match(key):
            raise ValueError(f"not an official SHViT state_dict key: {key!r}")
        if m is None:
            parsed.append((key, None))
            continue
        stage, idx, rest = int(m[1]), int(m[2]), m[3]
        if stage < 1:
            raise ValueError(f"official SHViT stages count from blocks1, got key {key!r}")
        if idx < _N_HEAD and rest.split(".", 1)[0] not in _BASIC_BLOCK_CHILDREN:
            downsampling.add(stage)
        parsed.append((key, (stage, idx, rest)))

    out: dict[str, Any] = {}
    for key, p in parsed:
        if p is None:
            out[key] = state_dict[key]
            continue
        stage, idx, rest = p
        prefix = f"stages.{stage - 1}"
        if stage not in downsampling:
            new = f"{prefix}.blocks.{idx}.{rest}"
        elif idx >= _N_HEAD:
            new = f"{prefix}.blocks.{idx - _N_HEAD}.{rest}"
        else:
            # Entry 1 (PatchMerging) maps whole; entries 0 and 2 split on their Sequential index.
            entry, tail = str(idx), rest
            if idx != 1:
                sub = _SEQ_CHILD.fullmatch(rest)
                entry, tail = (f"{idx}.{sub[1]}", sub[2]) if sub else ("", "")
            if entry not in _DOWN_FROM_OFFICIAL or rest.split(".", 1)[0] in _BASIC_BLOCK_CHILDREN:
                raise ValueError(f"key {key!r} does not fit the downsampling head of blocks{stage}")
            new = f"{prefix}.downsample.{_DOWN_FROM_OFFICIAL[entry]}.{tail}"
        out[new] = state_dict[key]
    return out


def load_timm_state_dict(model: nn.Module, timm_state_dict: Mapping[str, Any], strict: bool = True):
    """Load a timm `shvit_s*` state_dict into an official-layout model; returns `load_state_dict`'s result."""
    return model.load_state_dict(timm_to_official(timm_state_dict), strict=strict)
