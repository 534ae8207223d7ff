"""An AOTInductor package's weights kept in a file of their own and mapped in place, not copied.

Why: AOTInductor's CPU runtime copies every weight out of the shared library when it loads one
(measured 2.6 s warm, 12 s cold for the built-in 1.5B target's 3.6 GB of prepacked weights, and the
memory twice over). A package built without its weights (`package_constants_in_so=False`) takes them
from the caller instead, as tensors it does not own: here, views of one file mapped copy-on-write,
which the page cache shares between processes, so loading costs milliseconds and each weight is read
when a forward first touches it.

`constants.bin` holds each weight's bytes at a page-aligned offset; `constants.json` gives, per
weight, its name inside the package, dtype, shape, strides and, for the oneDNN-packed matrices that
freezing makes of the linear layers' weights, the opaque layout description oneDNN reads them back
with. Building a oneDNN tensor over memory it does not own is only possible through torch's AOTI C
shim (`aoti_torch_create_tensor_from_blob_v2`, called here with ctypes), a private interface: a
failure here makes the caller fall back to compiling in-process.
"""

from __future__ import annotations

import ctypes
import functools
import json
from pathlib import Path

import torch

DATA, INDEX = "constants.bin", "constants.json"
ALIGN = 4096


def save_constants(runner, folder: Path) -> None:
    """Write the weights `runner` (a loaded package) holds into `folder`'s `constants.bin` and
    `constants.json`, under the names the package's `update_constant_buffer` expects."""
    inner = {fqn: name for name, fqn in runner.get_constant_names_to_original_fqns().items()}
    index, offset = [], 0
    with open(folder / DATA, "wb") as out:
        for fqn, tensor in runner.extract_constants_map(False).items():
            entry = {"name": inner.get(fqn, fqn), "dtype": str(tensor.dtype).removeprefix("torch."),
                     "shape": list(tensor.shape), "offset": offset}
            if tensor.is_mkldnn:
                size = torch.ops.mkldnn._nbytes(tensor)
                data = memoryview((ctypes.c_ubyte * size).from_address(torch.ops.mkldnn.data_ptr(tensor)))
                entry["onednn_layout"] = torch.ops.mkldnn._get_mkldnn_serialized_md(tensor).tolist()
            else:
                storage = tensor.untyped_storage()
                size = storage.nbytes()
                data = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (size,)).numpy().data
                entry.update(stride=list(tensor.stride()), storage_offset=tensor.storage_offset())
            out.write(data)
            entry["bytes"] = size
            index.append(entry)
            offset += size
            pad = -offset % ALIGN
            out.write(bytes(pad))
            offset += pad
    (folder / INDEX).write_text(json.dumps(index))


def load_constants(runner, folder: Path) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Give `runner` (a package built without its weights) the weights in `folder`, mapped in place;
    returns the mapped file [bytes] and the weights by name: the caller keeps them alive as long as
    the runner (it does not own them)."""
    index = json.loads((folder / INDEX).read_text())
    size = (folder / DATA).stat().st_size
    blob = torch.from_file(str(folder / DATA), shared=False, size=size, dtype=torch.uint8)
    tensors = {}
    for entry in index:
        if "onednn_layout" in entry:
            tensors[entry["name"]] = _onednn_tensor(blob.data_ptr() + entry["offset"], entry)
        else:  # offsets are page-aligned: whole elements of any dtype from the file's start
            elements = blob.view(getattr(torch, entry["dtype"]))
            tensors[entry["name"]] = elements.as_strided(
                entry["shape"], entry["stride"], entry["offset"] // elements.element_size() + entry["storage_offset"])
    runner.update_constant_buffer(tensors, False, True, True)  # not inactive, every one, user-managed
    return blob, tensors


def _onednn_tensor(address: int, entry: dict) -> torch.Tensor:
    """A oneDNN tensor reading `entry`'s packed matrix at `address`, without copying it."""
    shim = _shim()
    ndim = len(entry["shape"])
    sizes = (ctypes.c_int64 * ndim)(*entry["shape"])
    strides = (ctypes.c_int64 * ndim)(*torch.empty(entry["shape"], device="meta").stride())
    layout = (ctypes.c_uint8 * len(entry["onednn_layout"]))(*entry["onednn_layout"])
    handle = ctypes.c_void_p()
    dtype = getattr(shim, f"aoti_torch_dtype_{entry['dtype']}")()
    error = shim.aoti_torch_create_tensor_from_blob_v2(
        address, ndim, sizes, strides, 0, dtype, shim.aoti_torch_device_type_cpu(), 0, ctypes.byref(handle),
        shim.aoti_torch_layout__mkldnn(), layout, len(entry["onednn_layout"]))
    if error:
        raise RuntimeError(f"torch could not map the packed weight {entry['name']} (error {error})")
    return torch._C._aoti.alloc_tensor_by_stealing_from_void_ptr(_capsule()(handle.value, None, None))


@functools.cache
def _capsule():
    """Python's PyCapsule_New, typed: torch takes a tensor handle wrapped in a capsule."""
    capsule = ctypes.pythonapi.PyCapsule_New
    capsule.restype, capsule.argtypes = ctypes.py_object, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
    return capsule


@functools.cache
def _shim():
    """libtorch's AOTI C shim, with the one function that takes pointers typed for ctypes."""
    shim = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
    make = shim.aoti_torch_create_tensor_from_blob_v2
    make.restype = ctypes.c_int32
    make.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_int64),
                     ctypes.c_int64, ctypes.c_int32, ctypes.c_int32, ctypes.c_int32, ctypes.POINTER(ctypes.c_void_p),
                     ctypes.c_int32, ctypes.POINTER(ctypes.c_uint8), ctypes.c_int64]
    return shim  # the dtype, device and layout codes are int32 functions: ctypes' default result
