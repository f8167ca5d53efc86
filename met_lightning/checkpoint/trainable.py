"""Trainable-only checkpoints: the adapters and heads in safetensors, plus the config to rebuild.

The frozen backbone is not stored (like peft's `save_pretrained`): `load_trainable` rebuilds it
from the recorded config, checks it is the one training recorded (`backbone_fingerprint`: timm
name and a SHA-256 over its weights) and loads the trainable tensors on top.
The file may come from someone else: its JSON metadata is never resolved, checked field by field
(`check_recorded`), and its network is built on the meta device and compared with the tensors'
shapes before any weight is allocated.

The tensors as stored (`export_state`): a 1-bit weight (`models.adapters.BinaryParts`) as
`NAME.signs` (uint8 [ceil(n/8)]: 8 signs per byte), `NAME.mu` and `NAME.sigma` (fp32 [1]), from
which loading rebuilds the same, bit-identical `BinaryParts`; every other tensor as is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from met_lightning.builders import build_backbone, meta_network, rebuild_network
from met_lightning.checkpoint.migrate import migrate
from met_lightning.checkpoint.tagged import read_tagged, write_tagged
from met_lightning.errors import CheckpointError, MetError
from met_lightning.models.adapters import BinaryParts, QuantLinear, binary_weights
from met_lightning.spec import InputSpec

log = logging.getLogger(__name__)

FORMAT = "met_lightning.trainable/1"
FILENAME = "trainable.safetensors"
FINGERPRINT_KEY = "backbone_fingerprint"  # its key in a checkpoint's rebuild config


def pack(parts: BinaryParts, name: str) -> dict[str, torch.Tensor]:
    """`{name.signs: uint8 [ceil(n/8)], name.mu: fp32 [1], name.sigma: fp32 [1]}`."""
    bits = np.packbits(parts.positive.flatten().cpu().numpy().astype(np.uint8))
    return {
        f"{name}.signs": torch.from_numpy(bits),
        f"{name}.mu": parts.mu.reshape(1).cpu(),
        f"{name}.sigma": parts.sigma.reshape(1).cpu(),
    }


def unpack(tensors: dict[str, torch.Tensor], name: str, shape: torch.Size) -> BinaryParts:
    """Inverse of `pack` for a weight of `shape`; CheckpointError if the sizes disagree."""
    signs, mu, sigma = (tensors[f"{name}.{part}"] for part in ("signs", "mu", "sigma"))
    numel = math.prod(shape)
    if signs.dtype != torch.uint8 or signs.numel() != (numel + 7) // 8:
        raise CheckpointError(
            f"{name}: {signs.numel()} packed sign bytes of dtype {signs.dtype} do not fit a "
            f"weight of shape {list(shape)} (expected {(numel + 7) // 8} uint8)"
        )
    bits = np.unpackbits(signs.numpy(), count=numel).reshape(tuple(shape))
    positive = torch.from_numpy(bits > 0)
    return BinaryParts(mu.float().reshape(()), sigma.float().reshape(()), positive)


def _trainable(net: nn.Module) -> Iterator[tuple[str, nn.Parameter, QuantLinear | None]]:
    """(name, parameter, its 1-bit layer or None) of every trainable parameter of `net`."""
    binary = binary_weights(net)
    for name, param in net.named_parameters():
        if param.requires_grad:
            yield name, param, binary.get(name)


def export_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors as stored: 1-bit weights packed (`pack`), the rest as is."""
    tensors: dict[str, torch.Tensor] = {}
    for name, param, layer in _trainable(net):
        if layer is not None:
            tensors.update(pack(layer.binary_parts(), name))
        else:
            tensors[name] = param.detach().cpu().contiguous()
    return tensors


def check_shapes(net: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """CheckpointError naming `source` unless `tensors` have exactly the names and shapes that
    `export_state(net)` would store (computed from the parameters' shapes: `net` may be on the
    meta device)."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    expected: dict[str, tuple[int, ...]] = {}
    for name, param, layer in _trainable(net):
        if layer is None:
            expected[name] = tuple(param.shape)
        else:
            signs = (math.prod(param.shape) + 7) // 8
            expected.update({f"{name}.signs": (signs,), f"{name}.mu": (1,), f"{name}.sigma": (1,)})
    if set(shapes) != set(expected):
        missing, extra = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
        raise CheckpointError(
            f"checkpoint {source!r} does not match the network its config builds "
            f"(missing {missing[:5]}, unexpected {extra[:5]})"
        )
    if wrong := [n for n in sorted(expected) if shapes[n] != expected[n]]:
        name = wrong[0]
        raise CheckpointError(
            f"checkpoint {source!r}: {name} has shape {list(shapes[name])}, the network its "
            f"config builds expects {list(expected[name])} ({len(wrong)} tensor(s) differ)"
        )


def storage_bytes(net: nn.Module) -> int:
    """Bytes of the trainable state as `export_state` stores it (computed, nothing copied)."""
    return sum(
        (math.ceil(p.numel() / 8) + 8) if layer is not None else p.numel() * p.element_size()
        for _, p, layer in _trainable(net)
    )


def backbone_fingerprint(backbone: nn.Module, name: str) -> dict[str, str]:
    """{"name": timm name, "sha256": weights hash} of a freshly built backbone; the hash runs over
    its `state_dict()`: every tensor's name, dtype, shape and bytes, by name."""
    digest = hashlib.sha256()
    state = backbone.state_dict()
    for key in sorted(state):
        tensor = state[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return {"name": str(name), "sha256": digest.hexdigest()}


def verify_backbone(
    backbone: nn.Module, config: dict[str, Any], path: str | Path, weights_file: str | None = None
) -> None:
    """CheckpointError naming both identities and the fix unless `backbone` (just built from a
    checkpoint's config) is the one it was trained on; a warning if none is recorded (older)."""
    recorded = config.get(FINGERPRINT_KEY) or {}
    backbone_cfg = config.get("backbone") or {}
    name = str(backbone_cfg.get("name", "?"))
    if not recorded.get("sha256"):
        log.warning(
            "checkpoint %s records no backbone weights hash (made by an older met_lightning): "
            "the backbone %s it is loaded on cannot be verified",
            path,
            name,
        )
        return
    now = backbone_fingerprint(backbone, name)
    if now == {"name": str(recorded.get("name")), "sha256": recorded["sha256"]}:
        return
    source = weights_file or backbone_cfg.get("weights_file")
    built = f"weights file {source}" if source else "hub weights"
    if not source and not backbone_cfg.get("pretrained"):
        built = f"random weights, seed {config.get('seed')}"
    raise CheckpointError(
        f"checkpoint {str(path)!r} is for another backbone: it was trained on "
        f"{recorded.get('name')!r} with weights sha256 {recorded['sha256'][:16]}…, but the "
        f"backbone built now is {name!r} ({built}) with sha256 {now['sha256'][:16]}…. Load it "
        "with the weights it was trained on: weights_file=/path/to/weights (predict, "
        "load_trainable) or backbone.weights_file=... (training)"
    )


def save_trainable(
    net: nn.Module, path: str | Path, config: dict[str, Any], weights: dict | None = None
) -> Path:
    """Write the trainable tensors (1-bit weights packed) and, as JSON metadata, `config` and
    `weights` (which epoch / checkpoint they are, `train.exported_weights`), atomically."""
    metadata = {"config": json.dumps(config, sort_keys=True)}
    if weights is not None:
        metadata["weights"] = json.dumps(weights, sort_keys=True)
    return write_tagged(path, export_state(net), FORMAT, metadata)


def read_trainable(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, config in today's shape: `migrate`) of a trainable checkpoint; CheckpointError if
    it is missing, not ours, or its recorded config is malformed (`check_recorded`)."""
    tensors, metadata = read_tagged(path, FILENAME, FORMAT, "checkpoint")
    try:
        config = json.loads(metadata["config"])
    except (KeyError, ValueError, RecursionError) as err:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has no readable rebuild config in its metadata "
            f"({type(err).__name__})"
        ) from None
    check_recorded(config, str(path))
    return tensors, migrate(config, f"checkpoint {str(path)!r}")


def _interpolations(value: Any, key: str = "") -> list[str]:
    """Keys of `value` (nested dicts / lists) whose key or string holds an interpolation."""
    if isinstance(value, str):
        return [key or "(top)"] if "${" in value else []
    if isinstance(value, list):
        return [k for i, v in enumerate(value) for k in _interpolations(v, f"{key}[{i}]")]
    if isinstance(value, dict):
        found = []
        for name, item in value.items():
            path = f"{key}.{name}" if key else str(name)
            found += [path] if "${" in str(name) else _interpolations(item, path)
        return found
    return []


def check_recorded(config: Any, source: str) -> None:
    """CheckpointError naming `source` and the key (never its value) unless the recorded config
    has the shape met_lightning writes, with no interpolation anywhere (it is never resolved)."""

    def fail(problem: str) -> None:
        raise CheckpointError(
            f"checkpoint {source!r}: its recorded config {problem}; it was not written by "
            "met_lightning as it is (use the run's own file, or train again)"
        )

    if not isinstance(config, dict):
        fail("is not a mapping")
    if interpolated := _interpolations(config):
        fail(f"holds an interpolation (${{...}}) in {interpolated[0]}, which is never resolved")
    for key in ("model", "backbone", "input_spec"):
        if not isinstance(config.get(key), dict):
            fail(f"has no mapping {key!r}")
    num_classes = config.get("num_classes")
    if type(num_classes) is not int or num_classes < 1:
        fail(f"has num_classes={str(num_classes)[:40]!r}, not a positive integer")
    names = config.get("class_names")
    count = len(names) if isinstance(names, list) else type(names).__name__
    if names is not None and (count != num_classes or not all(isinstance(n, str) for n in names)):
        fail(f"has class_names ({count}) that are not {num_classes} strings, one per class")
    try:
        InputSpec.of(config["input_spec"])
    except (KeyError, TypeError, ValueError) as err:
        fail(f"has an unreadable input_spec ({type(err).__name__}: {err})")
    if type(config.get("seed", 0)) is not int:
        fail("has a seed that is not an integer")


def network_plan(config: dict[str, Any], tensors: dict[str, torch.Tensor], source: str) -> None:
    """CheckpointError naming `source` unless the recorded network, built on the meta device (no
    memory), fits the stored tensors and the recorded input size."""
    try:
        net = meta_network(config)
    except CheckpointError as err:
        raise CheckpointError(f"checkpoint {source!r}: {err}") from None
    except (MetError, KeyError, TypeError, ValueError, AttributeError, RuntimeError) as err:
        reason = (str(err).splitlines() or [""])[0][:300]
        raise CheckpointError(
            f"checkpoint {source!r}: its recorded config does not build a network "
            f"({type(err).__name__}: {reason})"
        ) from None
    check_shapes(net, tensors, source)
    built = tuple(InputSpec.from_timm(net.backbone).input_size)
    recorded = tuple(InputSpec.of(config["input_spec"]).input_size)
    if built != recorded:
        raise CheckpointError(
            f"checkpoint {source!r}: its input_spec.input_size {list(recorded)} is not the "
            f"input size {list(built)} of the backbone it records"
        )


def _checked(path: str | Path, weights_file: str | None) -> tuple[dict, dict, nn.Module]:
    """(tensors, config, frozen backbone) of a trainable checkpoint after every check: file,
    format, recorded config, tensor shapes (before any weight is allocated), fingerprint."""
    tensors, config = read_trainable(path)
    network_plan(config, tensors, str(path))
    backbone_cfg = dict(config["backbone"])
    if weights_file is not None:
        backbone_cfg["weights_file"] = weights_file
    with torch.random.fork_rng():
        # random (not pretrained) frozen weights come out as in training: same seed, built first
        torch.manual_seed(int(config.get("seed", 0)))
        backbone = build_backbone(backbone_cfg)
    verify_backbone(backbone, config, path, weights_file)  # the backbone it was trained on
    return tensors, config, backbone


def verify(path: str | Path, weights_file: str | None = None) -> dict[str, Any]:
    """The config of a trainable checkpoint after `load_trainable`'s checks, network not built."""
    return _checked(path, weights_file)[1]


def load_trainable(path: str | Path, weights_file: str | None = None) -> tuple[nn.Module, dict]:
    """(network, config) of a trainable checkpoint, in eval mode; `weights_file` overrides the
    recorded backbone weights file (e.g. after moving it)."""
    tensors, config, backbone = _checked(path, weights_file)  # shapes checked by network_plan
    net = rebuild_network(config, backbone)
    plain = {}
    for name, param, layer in _trainable(net):
        if layer is not None:
            layer.load_binary(unpack(tensors, name, param.shape))
        else:
            plain[name] = tensors[name]
    net.load_state_dict(plain, strict=False)
    return net.eval(), config
