"""Write a merged model and its tokenizer as one GGUF file, one tensor at a time.

The header, metadata and tensor index are written first (every tensor's stored size is known from
its shape), then each tensor is transformed and encoded just before it is written, so memory holds
one tensor's copy at a time. `progress(done_bytes, total_bytes)` is called after each tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

from sftop.engine.export.gguf.encode import FILE_TYPES, encode, storage_type, stored_bytes
from sftop.engine.export.gguf.families import Family
from sftop.engine.export.gguf.tokenizer import Vocabulary, write_vocabulary

Progress = Callable[[int, int], None]


def write_gguf(
    path: Path, model, vocab: Vocabulary, family: Family, kind: str, name: str, progress: Progress | None = None
) -> None:
    """Write `model` to `path` (which the caller removes if this raises)."""
    config = model.config
    state_dict = model.state_dict()
    plan = family.plan(config, state_dict)
    writer = gguf.GGUFWriter(path, family.arch_name)
    try:
        writer.add_name(name)
        writer.add_file_type(FILE_TYPES[kind])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        family.write_hparams(writer, config)
        write_vocabulary(writer, vocab)
        types = []
        for tensor in plan:
            shape = tuple(tensor.source.shape)
            qtype = storage_type(shape, kind)
            types.append(qtype)
            writer.add_tensor_info(tensor.name, *_index_entry(shape, qtype))
        total = sum(stored_bytes(tuple(t.source.shape), q) for t, q in zip(plan, types))
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        done = 0
        with torch.no_grad():
            for tensor, qtype in zip(plan, types):
                data = encode(tensor.value(), qtype)
                writer.write_tensor_data(data)
                done += data.nbytes
                if progress is not None:
                    progress(done, total)
        writer.flush()
    finally:
        writer.close()


def _index_entry(shape: tuple[int, ...], qtype: Q) -> tuple:
    """`add_tensor_info`'s (shape, dtype, nbytes, raw_dtype) for a tensor stored as `qtype`."""
    if qtype is Q.F32:
        return shape, np.dtype(np.float32), stored_bytes(shape, qtype), None
    if qtype is Q.F16:
        return shape, np.dtype(np.float16), stored_bytes(shape, qtype), None
    return gguf.quant_shape_to_byte_shape(shape, qtype), np.dtype(np.uint8), stored_bytes(shape, qtype), qtype
