"""A JPEG file's marker structure, checked the way libjpeg reads it, without decoding the image.

A JPEG is a sequence of marker segments: 0xFF, a marker byte and, for most
markers, a 2-byte big-endian length that counts itself. After each start of
scan (SOS) comes entropy-coded data, in which a 0xFF byte is followed by 0x00
(a stuffed byte), 0xFF (fill) or a restart marker RST0-7; any other marker
ends the scan. libjpeg (inside Pillow and torchvision) stops with an error at
a marker it does not know, a second SOI or frame header, an unsupported coding
process, or a table or header whose content contradicts its length; the
decoder inside DALI skips over all of these and decodes what follows. So a
file that the other back ends and `verify` reject would be trained on.
`structure_problem` finds these errors from the bytes alone (about 1 us per KB),
which lets the dali back end hold JPEGs to Pillow's standard.

What libjpeg only warns about (bytes where a marker should be, a truncated
file, a corrupt Huffman code) is left alone: Pillow accepts those too, and
both decoders recover the same way.
"""

from __future__ import annotations

import numpy as np

SOI, EOI, SOS, DHT, DAC, DQT, DRI, TEM = 0xD8, 0xD9, 0xDA, 0xC4, 0xCC, 0xDB, 0xDD, 0x01
RESTARTS = frozenset(range(0xD0, 0xD8))
# The coding processes libjpeg-turbo decodes: baseline, extended, progressive, and their arithmetic-coded forms
SUPPORTED_FRAMES = frozenset({0xC0, 0xC1, 0xC2, 0xC9, 0xCA})
UNSUPPORTED_FRAMES = frozenset({0xC3, 0xC5, 0xC6, 0xC7, 0xC8, 0xCB, 0xCD, 0xCE, 0xCF})
# Segments that libjpeg reads or skips besides frames and scans: DHT, DAC, DQT, DNL, DRI, APP0-15, COM
OTHER_SEGMENTS = frozenset({DHT, DAC, DQT, 0xDC, DRI, *range(0xE0, 0xF0), 0xFE})
START_OF_FRAME = frozenset(range(0xC0, 0xD0)) - {DHT, 0xC8, DAC}  # SOFn markers (not DHT, JPG, DAC)


def is_jpeg(data: bytes) -> bool:
    return data.startswith(b"\xff\xd8")


def structure_problem(data: bytes) -> str | None:
    """Why libjpeg would stop with an error on these JPEG bytes, or None if it reads them through.

    numpy finds the markers and releases the GIL meanwhile, so threads check files in parallel."""
    markers = marker_positions(data)
    position, frames = 2, 0
    while True:
        following = int(np.searchsorted(markers, position))  # as libjpeg does: on to the next marker
        if following == len(markers):
            return None  # truncated: a warning to libjpeg, an error to every decoder alike
        position = int(markers[following])
        marker = data[position + 1]
        where = f"marker 0x{marker:02x} at offset {position}"
        if marker == EOI:
            return None
        if marker in RESTARTS or marker == TEM:
            position += 2
            continue
        if marker == SOI:
            return f"corrupt: a second start-of-image {where}"
        if marker in UNSUPPORTED_FRAMES:
            return f"unsupported JPEG coding process ({where})"
        if marker not in SUPPORTED_FRAMES and marker not in OTHER_SEGMENTS and marker != SOS:
            return f"corrupt: unknown {where}"
        length = int.from_bytes(data[position + 2 : position + 4], "big")
        if length < 2:
            return f"corrupt: bogus length {length} of {where}"
        frames += marker in SUPPORTED_FRAMES
        if frames > 1:
            return f"corrupt: a second frame header ({where})"
        problem = segment_problem(marker, data[position + 4 : position + 2 + length], length - 2)
        if problem:
            return f"corrupt: {problem} in {where}"
        position += 2 + length  # a scan's entropy-coded data runs to the next marker


def marker_positions(data: bytes) -> np.ndarray:
    """Offsets of every 0xFF that starts a marker: followed by neither stuffing (00), fill (FF) nor
    a restart (D0-D7). Inside segments too, where the walk above jumps over them by length."""
    array = np.frombuffer(data, dtype=np.uint8)
    candidates = np.flatnonzero(array[:-1] == 0xFF)
    following = array[candidates + 1]
    restart = (following >= 0xD0) & (following <= 0xD7)
    return candidates[(following != 0x00) & (following != 0xFF) & ~restart]


def segment_problem(marker: int, body: bytes, size: int) -> str | None:
    """libjpeg's checks of a segment's content against its declared `size` (jdmarker.c: get_sof,
    get_sos, get_dht, get_dqt, get_dac, get_dri). `body` is what the file holds of it: where a
    truncated file ends before a check can be made, that is for the decoders to find."""
    if marker == DRI:
        return None if size == 2 else "bogus restart interval length"
    if marker in SUPPORTED_FRAMES and len(body) >= 6:  # precision, height, width, components, 3 bytes each
        if body[5] == 0 or not any(body[1:3]) or not any(body[3:5]):
            return "an empty image"
        return None if size == 6 + 3 * body[5] else "bogus frame header length"
    if marker == SOS and body:  # components, 2 bytes per component, spectral selection and approximation
        return None if 1 <= body[0] <= 4 and size == 4 + 2 * body[0] else "bogus scan header"
    if marker == DHT:
        return huffman_tables_problem(body, size)
    if marker == DQT:
        return quantisation_tables_problem(body, size)
    if marker == DAC:
        return arithmetic_tables_problem(body, size)
    return None


def huffman_tables_problem(body: bytes, size: int) -> str | None:
    position = 0
    while size - position > 16:  # a class/index byte and 16 counts, then the symbols
        if position + 17 > len(body):
            return None
        index, symbols = body[position], sum(body[position + 1 : position + 17])
        if symbols > 256 or symbols > size - position - 17:
            return "bogus Huffman table"
        if index & ~0x10 >= 4:
            return f"bogus Huffman table index {index}"
        position += 17 + symbols
    return None if position == size else "bogus Huffman table length"


def quantisation_tables_problem(body: bytes, size: int) -> str | None:
    position = 0
    while position < size:
        if position >= len(body):
            return None
        if body[position] & 0x0F >= 4:
            return f"bogus quantisation table index {body[position] & 0x0F}"
        position += 1 + 64 * (2 if body[position] >> 4 else 1)  # 8- or 16-bit entries
    return None if position == size else "bogus quantisation table length"


def arithmetic_tables_problem(body: bytes, size: int) -> str | None:
    for index, value in zip(body[::2], body[1::2]):
        if index >= 32:
            return f"bogus arithmetic table index {index}"
        if index < 16 and value & 0x0F > value >> 4:  # a DC table's lower bound above its upper
            return f"bogus arithmetic table value {value}"
    return None if size % 2 == 0 else "bogus arithmetic table length"


def components(data: bytes) -> int | None:
    """Colour components in a JPEG's frame header (1 gray, 3 YCbCr, 4 CMYK); None if not found."""
    position = 2
    while position + 9 < len(data):
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker in START_OF_FRAME:
            return data[position + 9]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        position += 2 + int.from_bytes(data[position + 2 : position + 4], "big")
    return None
