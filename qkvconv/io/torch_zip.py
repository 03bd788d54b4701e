"""The zip archive of a torch.save file, laid out completely before any byte is written. Pure layout.

torch.save writes an uncompressed zip of records under a folder named after the file: `data.pkl`
(the pickled structure, whose persistent ids name storages), `byteorder`, `data/<key>` (one per
storage), `version`, ... torch's own writer appends records one after another. Knowing every size up
front, this module computes every record's place first, so tensors can then be written in any order,
from any thread, with pwrite, or copied from another file inside the kernel (writers.TorchWriter).

Each record: a local header with the real sizes (no data descriptor), a zip64 extra where its size or
offset reaches 4 GiB, and an "FB" padding field that starts the data on the storage alignment, as
torch pads; then the data. At the end: the central directory, the zip64 end record and its locator
(torch writes them always), and the end record. CRC-32 fields are 0, as torch.save writes them with
torch.serialization.set_crc32_options(False): torch.load does not check them (qkvconv compares what it
wrote with its source instead). Dates are 1980-01-01.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

ZIP64_LIMIT = 0xFFFFFFFF  # sizes and offsets from here on need the zip64 extra field
_DATE = 0x21  # 1980-01-01, the earliest date a zip can hold
_PADDING_ID = 0x4246  # "FB": torch's padding field


@dataclass(frozen=True)
class Record:
    """One record of the archive: where its local header and its data go."""

    name: str  # without the archive folder: "data/0"
    size: int
    header_offset: int
    data_offset: int
    header: bytes  # the local header, ready to write at header_offset

    @property
    def zip64(self) -> bool:
        return self.size >= ZIP64_LIMIT or self.header_offset >= ZIP64_LIMIT


def _local_header(full_name: bytes, size: int, offset: int, alignment: int) -> bytes:
    zip64 = size >= ZIP64_LIMIT or offset >= ZIP64_LIMIT
    extra = struct.pack("<HHQQ", 1, 16, size, size) if zip64 else b""
    unpadded = offset + 30 + len(full_name) + len(extra) + 4  # + the padding field's own header
    pad = -unpadded % alignment
    extra += struct.pack("<HH", _PADDING_ID, pad) + b"Z" * pad
    size32 = 0xFFFFFFFF if zip64 else size
    return struct.pack(
        "<IHHHHHIIIHH", 0x04034B50, 45 if zip64 else 20, 0, 0, 0, _DATE, 0, size32, size32, len(full_name), len(extra)
    ) + full_name + extra


def layout(folder: str, records: list[tuple[str, int]], alignment: int = 64) -> tuple[list[Record], int]:
    """Records (name, data size) in file order -> their places, and where the central directory starts."""
    if alignment < 1:
        raise ValueError(f"the alignment must be positive, got {alignment}")
    out, offset = [], 0
    for name, size in records:
        header = _local_header(f"{folder}/{name}".encode("utf-8"), size, offset, alignment)
        out.append(Record(name, size, offset, offset + len(header), header))
        offset += len(header) + size
    return out, offset


def _central_entry(full_name: bytes, record: Record) -> bytes:
    big = [v for v in (record.size, record.size) if v >= ZIP64_LIMIT]  # uncompressed, compressed
    if record.header_offset >= ZIP64_LIMIT:
        big.append(record.header_offset)
    extra = struct.pack("<HH", 1, 8 * len(big)) + b"".join(struct.pack("<Q", v) for v in big) if big else b""
    size32 = 0xFFFFFFFF if record.size >= ZIP64_LIMIT else record.size
    offset32 = 0xFFFFFFFF if record.header_offset >= ZIP64_LIMIT else record.header_offset
    version = 45 if record.zip64 else 20
    return struct.pack(
        "<IHHHHHHIIIHHHHHII", 0x02014B50, 45, version, 0, 0, 0, _DATE, 0, size32, size32, len(full_name),
        len(extra), 0, 0, 0, 0, offset32,
    ) + full_name + extra


def end_of_archive(folder: str, records: list[Record], directory_offset: int) -> bytes:
    """The central directory, zip64 end record and locator, and end record, written at directory_offset."""
    directory = b"".join(_central_entry(f"{folder}/{r.name}".encode("utf-8"), r) for r in records)
    n, size = len(records), len(directory)
    zip64_end = directory_offset + size
    return directory + struct.pack(
        "<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, n, n, size, directory_offset
    ) + struct.pack("<IIQI", 0x07064B50, 0, zip64_end, 1) + struct.pack(
        "<IHHHHIIH", 0x06054B50, 0, 0, min(n, 0xFFFF), min(n, 0xFFFF), min(size, 0xFFFFFFFF),
        min(directory_offset, 0xFFFFFFFF), 0,
    )
