"""Raw checks of a NIfTI file (.nii, .nii.gz) that ITK's reader does not make, in one streaming pass.

ITK reads a NIfTI whose voxel data is short (a truncated download or copy) without an error and
fills the missing voxels with 0, and turns NaN voxels into 0: both would be segmented as if they
were a CT. :func:`check_nifti` parses the header itself (NIfTI-1 and NIfTI-2, either byte order),
then reads the voxel data once, decompressing a .nii.gz in bounded chunks (about 8 MiB in memory
at a time, never the whole file), and refuses with :class:`InputError` a file holding less voxel
data than its header needs, a compressed stream that ends early or is damaged, and float voxels
that are NaN or infinite. Cost: one pass of zlib over the file (about 0.02 s for the 3 mm sample,
0.25 s for 512x512x300 int16 on 2 cores).
"""

from __future__ import annotations

import math
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from ..errors import InputError

#: Suffixes checked (lower case).
NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: NIfTI datatype code -> (name, bytes per voxel, numpy kind for the NaN scan or None).
DATATYPES = {
    2: ("uint8", 1, None), 4: ("int16", 2, None), 8: ("int32", 4, None), 16: ("float32", 4, "f4"),
    32: ("complex64", 8, None), 64: ("float64", 8, "f8"), 128: ("rgb24", 3, None), 256: ("int8", 1, None),
    512: ("uint16", 2, None), 768: ("uint32", 4, None), 1024: ("int64", 8, None), 1280: ("uint64", 8, None),
    1536: ("float128", 16, None), 1792: ("complex128", 16, None), 2048: ("complex256", 32, None),
    2304: ("rgba32", 4, None),
}
#: Decompressed bytes handed on at a time (a multiple of every voxel size).
CHUNK = 8 << 20
#: Compressed bytes read at a time.
_READ = 1 << 20
_GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True)
class NiftiHeader:
    """What the check needs from a NIfTI header. ``dims``: the sizes of the ``dim[0]`` axes (x first)."""

    version: int  #: 1 (348-byte header) or 2 (540 bytes)
    byteorder: str  #: "<" little-endian, ">" big-endian
    dims: tuple[int, ...]
    datatype: int
    bitpix: int
    vox_offset: int  #: byte offset of the voxel data in the (decompressed) file
    scl_slope: float
    scl_inter: float
    single_file: bool  #: magic "n+1"/"n+2": header and voxels in one file

    @property
    def n_voxels(self) -> int:
        return math.prod(self.dims)

    @property
    def voxel_bytes(self) -> int:
        known = DATATYPES.get(self.datatype)
        return known[1] if known else max(1, self.bitpix // 8)

    @property
    def data_bytes(self) -> int:
        """Bytes of voxel data the header announces."""
        return self.n_voxels * self.voxel_bytes

    @property
    def description(self) -> str:
        """E.g. ``300x300x200 int16``."""
        name = DATATYPES.get(self.datatype, (f"datatype {self.datatype}",))[0]
        return "x".join(str(d) for d in self.dims) + f" {name}"


def is_nifti_name(path: os.PathLike | str) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def parse_header(raw: bytes) -> Optional[NiftiHeader]:
    """The header of the first bytes of a (decompressed) NIfTI file; None if they are not one."""
    for order in "<>":
        if len(raw) >= 348 and struct.unpack_from(order + "i", raw, 0)[0] == 348:
            return _parse_nifti1(raw, order)
        if len(raw) >= 540 and struct.unpack_from(order + "i", raw, 0)[0] == 540:
            return _parse_nifti2(raw, order)
    return None


def _parse_nifti1(raw: bytes, order: str) -> Optional[NiftiHeader]:
    dim = struct.unpack_from(order + "8h", raw, 40)
    datatype, bitpix = struct.unpack_from(order + "2h", raw, 70)
    vox_offset, slope, inter = struct.unpack_from(order + "3f", raw, 108)
    magic = raw[344:348]
    return _make(1, order, dim, datatype, bitpix, vox_offset, slope, inter, magic == b"n+1\0", 352)


def _parse_nifti2(raw: bytes, order: str) -> Optional[NiftiHeader]:
    datatype, bitpix = struct.unpack_from(order + "2h", raw, 12)
    dim = struct.unpack_from(order + "8q", raw, 16)
    (vox_offset,) = struct.unpack_from(order + "q", raw, 168)
    slope, inter = struct.unpack_from(order + "2d", raw, 176)
    magic = raw[4:8]
    return _make(2, order, dim, datatype, bitpix, vox_offset, slope, inter, magic == b"n+2\0", 544)


def _make(version, order, dim, datatype, bitpix, vox_offset, slope, inter, single, min_offset):  # noqa: ANN001, ANN202
    n = dim[0]
    if not 1 <= n <= 7 or any(d < 1 for d in dim[1 : n + 1]) or not math.isfinite(vox_offset):
        return None  # not a header ITK accepts: its own error stands
    return NiftiHeader(version, order, tuple(int(d) for d in dim[1 : n + 1]), int(datatype), int(bitpix),
                       max(int(vox_offset), min_offset), float(slope), float(inter), single)


class _Truncated(Exception):
    """The compressed stream ended before its end marker, after ``total`` decompressed bytes."""

    def __init__(self, total: int) -> None:
        super().__init__(total)
        self.total = total


class _Stream:
    """The bytes of a file, decompressed when it is gzip (several members allowed), at most
    :data:`CHUNK` at a time. Iterating raises :class:`_Truncated` when a gzip stream ends early and
    ``zlib.error`` when it is damaged."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as f:
            self.compressed = f.read(2) == _GZIP_MAGIC

    def __iter__(self) -> Iterator[bytes]:
        with open(self.path, "rb") as f:
            if not self.compressed:
                while block := f.read(CHUNK):
                    yield block
                return
            inflater, total = zlib.decompressobj(16 + zlib.MAX_WBITS), 0
            data = f.read(_READ)
            while data:
                out = inflater.decompress(data, CHUNK)
                if out:
                    total += len(out)
                    yield out
                if inflater.eof:  # the end of a gzip member: another may follow
                    data = inflater.unused_data or f.read(_READ)
                    if not data.strip(b"\0"):  # the end of the file (or zero padding)
                        return
                    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
                else:
                    data = inflater.unconsumed_tail or f.read(_READ)
            raise _Truncated(total)


def check_nifti(path: os.PathLike | str, name: Optional[str] = None, finite: bool = True) -> Optional[NiftiHeader]:
    """Refuse a NIfTI file whose voxel data is short, whose compression is truncated or damaged, or
    (``finite``) whose float voxels are NaN or infinite; :class:`InputError` names ``name`` (default
    the path). Returns the parsed header, or None when the file is not a single-file NIfTI (then
    nothing is checked: ITK reports what it makes of it).
    """
    path = Path(path)
    name = name or str(path)
    stream = _Stream(path)
    chunks = iter(stream)
    header, have = None, 0
    try:
        head = b""
        for block in chunks:
            head += block
            if len(head) >= 544:
                break
        header = parse_header(head)
        if header is None or not header.single_file:
            return None
        need = header.vox_offset + header.data_bytes
        kind = DATATYPES.get(header.datatype, (None, None, None))[2] if finite else None
        if kind is None and not stream.compressed:
            have = path.stat().st_size  # nothing to scan: the file's size says it all
        else:
            scan = _FiniteScan(np.dtype(header.byteorder + kind)) if kind else None
            for block in _chain(head, chunks):
                start, stop = max(0, header.vox_offset - have), min(len(block), need - have)
                if scan is not None and stop > start:
                    scan.feed(memoryview(block)[start:stop])
                have += len(block)
                if have >= need:
                    break
            if scan is not None and have >= need and scan.bad:
                raise InputError(f"{name}: {scan.bad} voxels are NaN or infinite")
    except _Truncated as exc:
        if header is None:
            raise InputError(f"{name}: the compressed file is truncated (it ends after {exc.total} bytes, "
                             "within the header)") from None
        voxels = max(0, exc.total - header.vox_offset)
        raise InputError(f"{name}: the compressed file is truncated (it ends after {voxels} of "
                         f"{header.data_bytes} bytes of voxel data)") from None
    except zlib.error as exc:  # e.g. "Error -3 while decompressing data: invalid distance too far back"
        reason = str(exc).split(": ", 1)[-1]
        raise InputError(f"{name}: the compressed data is damaged ({reason}): the file is corrupt") from None
    finally:
        chunks.close()
    if have < need:
        raise InputError(f"{name}: the file holds {max(0, have - header.vox_offset)} bytes of voxel data but its "
                         f"header ({header.description}) needs {header.data_bytes}: the file is truncated or the "
                         "header is wrong")
    return header


def _chain(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    yield first
    yield from rest


class _FiniteScan:
    """Counts non-finite values of ``dtype`` in a byte stream fed in pieces of any length."""

    def __init__(self, dtype: np.dtype) -> None:
        self.dtype, self.bad, self.carry = dtype, 0, b""

    def feed(self, data: memoryview) -> None:
        size = self.dtype.itemsize
        if self.carry:
            take = size - len(self.carry)
            self.carry += bytes(data[:take])
            data = data[take:]
            if len(self.carry) < size:
                return
            self._count(self.carry)
            self.carry = b""
        whole = len(data) // size * size
        if whole:
            self._count(data[:whole])
        self.carry = bytes(data[whole:])

    def _count(self, data) -> None:  # noqa: ANN001 (bytes or memoryview)
        values = np.frombuffer(data, dtype=self.dtype)
        finite = np.count_nonzero(np.isfinite(values))
        self.bad += values.size - finite
