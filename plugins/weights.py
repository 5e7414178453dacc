"""Helpers shared by the plugins that load local models from files the user names."""

from __future__ import annotations

import pickle
from pathlib import Path

from chatroom.errors import ConfigError


def unreadable(exc: Exception) -> str:
    """Why a file did not read as weights, in a few words.

    A file that is no pickle breaks torch's unpickler with anything from KeyError to
    EOFError, and the unpickler's message advises loading unsafely: neither is worth
    showing.
    """
    if isinstance(exc, (pickle.UnpicklingError, KeyError, EOFError, IndexError)):
        return "torch.load cannot unpickle it"
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def checkpoint_file(value: str, where: str, file_name: str, hint: str) -> Path:
    """The file ``value`` names: the file itself, or ``file_name`` in a folder."""
    if not value:
        raise ConfigError(f"{where}: no checkpoint: {hint}")
    path = Path(value).expanduser()
    if path.is_dir():
        path = path / file_name
    if not path.is_file():
        raise ConfigError(f"{where}: checkpoint {str(path)!r} does not exist: {hint}")
    return path


def torch_device(device: str) -> str:
    """The device a ``device`` option names; ``auto`` is CUDA when there is one."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def device_and_dtype(device: str, dtype: str) -> tuple[str, str]:
    """``device`` and ``dtype`` options resolved; ``auto`` dtype is float16 on CUDA."""
    device = torch_device(device)
    if dtype == "auto":
        dtype = "float16" if device == "cuda" else "float32"
    return device, dtype


def save_safetensors(state: dict, path: Path, metadata: dict[str, str]) -> None:
    """``safetensors.torch.save_file`` with the metadata in a fixed order.

    The library writes metadata keys in hash order, which changes from process to
    process; smoke checkpoints must be the same bytes on every write.
    """
    import json
    import struct

    from safetensors.torch import save_file

    save_file(state, str(path), metadata=metadata)
    data = bytearray(path.read_bytes())
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    if len(text) > size:  # not expected: the same keys and values, reordered
        return
    data[8 : 8 + size] = text.ljust(size, b" ")
    path.write_bytes(bytes(data))
