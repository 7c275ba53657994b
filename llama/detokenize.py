"""Exact incremental text: token ids to text deltas, and stop strings matched across deltas.

`IncrementalDetokenizer` turns one token at a time into the text it adds, such that the deltas
put together are exactly `Tokenizer.decode_infilling` of all the ids (the text in the context of
the prompt: no leading space dropped). Byte-fallback tokens are held back until they complete a
UTF-8 character. `StopMatcher` cuts a stream of deltas at the first stop string, never emitting
the start of a stop string before knowing whether it completes.
"""

import threading
import weakref
from typing import Callable, List, Sequence, Tuple

from llama.limits import MAX_STOP_STRINGS
from llama.tokenizer import Tokenizer

REPLACEMENT_CHARACTER = "\ufffd"

_NOT_A_BYTE = -1


class _PieceTable:
    """Per token id: the text it decodes to on its own, or the byte of a byte-fallback token."""

    def __init__(self, tokenizer: Tokenizer):
        sp = tokenizer.sp_model
        self.byte_values: List[int] = []
        self.texts: List[str] = []
        decode_one = tokenizer.decode_infilling
        try:
            decode_one([tokenizer.bos_id])
        except ValueError:  # a normaliser that changes whitespace: each piece's own text instead
            decode_one = _piece_text(tokenizer)
        for token_id in range(tokenizer.n_words):
            if sp.is_byte(token_id):
                self.byte_values.append(int(sp.id_to_piece(token_id)[3:5], 16))  # "<0xNN>"
                self.texts.append("")
            else:
                # Control tokens decode to "", <unk> to its surface, other pieces to their text
                # with "▁" as a space; decoding without the dummy prefix keeps a leading space.
                self.byte_values.append(_NOT_A_BYTE)
                self.texts.append(decode_one([token_id]))


def _piece_text(tokenizer: Tokenizer) -> Callable[[List[int]], str]:
    """Text of one id from its piece ("▁" as a space), for tokenizers that cannot decode exactly
    without the leading space: control pieces give "", the unknown piece what SentencePiece gives."""
    sp = tokenizer.sp_model

    def decode(ids: List[int]) -> str:
        (token_id,) = ids
        if sp.is_control(token_id):
            return ""
        if sp.is_unknown(token_id):
            return sp.decode([token_id])
        return sp.id_to_piece(token_id).replace("\u2581", " ")

    return decode


_tables: "weakref.WeakKeyDictionary[Tokenizer, _PieceTable]" = weakref.WeakKeyDictionary()
_tables_lock = threading.Lock()


def _piece_table(tokenizer: Tokenizer) -> _PieceTable:
    with _tables_lock:
        table = _tables.get(tokenizer)
        if table is None:
            table = _tables[tokenizer] = _PieceTable(tokenizer)
        return table


def _utf8_length(lead: int) -> int:
    """Length of the UTF-8 sequence a byte starts, or 0 if it cannot start one."""
    if lead < 0x80:
        return 1
    if 0xC2 <= lead <= 0xDF:
        return 2
    if 0xE0 <= lead <= 0xEF:
        return 3
    if 0xF0 <= lead <= 0xF4:
        return 4
    return 0


def _second_byte_range(lead: int) -> Tuple[int, int]:
    """Allowed second bytes after `lead`: excludes overlong forms, surrogates and > U+10FFFF."""
    return {0xE0: (0xA0, 0xBF), 0xED: (0x80, 0x9F), 0xF0: (0x90, 0xBF), 0xF4: (0x80, 0x8F)}.get(
        lead, (0x80, 0xBF)
    )


def _decode_bytes(buf: bytearray, final: bool) -> Tuple[str, int]:
    """Decode a run of byte-fallback bytes the way SentencePiece does: every byte that does not
    begin a valid UTF-8 sequence becomes one U+FFFD. Unless `final`, an incomplete sequence
    that may still become valid is left undecoded.

    Returns:
        (text, number of bytes of `buf` consumed).
    """
    out: List[str] = []
    pos = 0
    while pos < len(buf):
        length = _utf8_length(buf[pos])
        available = min(length, len(buf) - pos)
        valid = length > 0
        for offset in range(1, available):
            low, high = _second_byte_range(buf[pos]) if offset == 1 else (0x80, 0xBF)
            if not low <= buf[pos + offset] <= high:
                valid = False
                break
        if valid and available == length:
            out.append(buf[pos : pos + length].decode("utf-8"))
            pos += length
        elif valid and not final:
            break  # a character still arriving
        else:
            out.append(REPLACEMENT_CHARACTER)
            pos += 1
    return "".join(out), pos


class IncrementalDetokenizer:
    """Text deltas of a token stream whose concatenation is `tokenizer.decode_infilling(ids)`.

    Bytes of a UTF-8 character split over byte-fallback tokens are held back until the
    character is complete (or can no longer complete, then decoded as SentencePiece does).
    The work per token is constant: the decoded text of each id is computed once per
    tokenizer.
    """

    def __init__(self, tokenizer: Tokenizer):
        """A detokenizer for ids of `tokenizer` (its per-id table is built on first use)."""
        self._table = _piece_table(tokenizer)
        self._pending = bytearray()

    def add(self, token_id: int) -> str:
        """Take the next token; return the text it completes (may be "" while bytes are held).

        Raises:
            ValueError: if `token_id` is outside the vocabulary.
        """
        if not 0 <= token_id < len(self._table.texts):
            raise ValueError(
                f"token id {token_id} is outside the vocabulary [0, {len(self._table.texts) - 1}]"
            )
        byte = self._table.byte_values[token_id]
        if byte != _NOT_A_BYTE:
            self._pending.append(byte)
            return self._drain(final=False)
        # Any other token (even a control one, which decodes to nothing) ends a run of bytes.
        return self._drain(final=True) + self._table.texts[token_id]

    def flush(self) -> str:
        """The text of bytes still held back at the end of the stream ("" if none)."""
        return self._drain(final=True)

    def _drain(self, final: bool) -> str:
        if not self._pending:
            return ""
        text, used = _decode_bytes(self._pending, final)
        del self._pending[:used]
        return text


class StopMatcher:
    """Cuts a stream of text deltas at the first stop string.

    Text that could be the start of a stop string is held back until it either completes the
    stop string or continues differently. When several stop strings occur, the one that is
    complete first wins (at equal ends, the one starting first).
    """

    def __init__(self, stops: Sequence[str], include_stop: bool = False):
        """Match `stops`; with `include_stop` the emitted text ends with the stop string found.

        Raises:
            ValueError: if `stops` is a single string, holds more than 4 strings, an empty
                string or something that is not a string.
        """
        if isinstance(stops, (str, bytes)):
            raise ValueError("stop must be a list of strings, not a single string: pass [stop]")
        stops = list(stops)
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}")
        for stop in stops:
            if not isinstance(stop, str) or not stop:
                raise ValueError(f"each stop string must be a non-empty str, got {stop!r}")
        self.stops = stops
        self.include_stop = include_stop
        self.stopped = False
        self._held = ""
        self._max_held = max((len(s) for s in stops), default=1) - 1

    def feed(self, text: str) -> Tuple[str, bool]:
        """Take the next delta.

        Returns:
            (text safe to emit now, whether a stop string was found). Once stopped, every
            further call returns ("", True).
        """
        if self.stopped:
            return "", True
        buf = self._held + text
        found = None
        for stop in self.stops:
            start = buf.find(stop)
            if start >= 0:
                key = (start + len(stop), start)
                if found is None or key < found[0]:
                    found = (key, stop)
        if found is not None:
            (_, start), stop = found
            self.stopped = True
            self._held = ""
            return buf[: start + len(stop)] if self.include_stop else buf[:start], True
        hold = self._partial_match_length(buf)
        self._held = buf[len(buf) - hold :]
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        """The text held back at the end of the stream (it never completed a stop string)."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _partial_match_length(self, buf: str) -> int:
        """Length of the longest suffix of `buf` that is a proper prefix of a stop string."""
        for length in range(min(len(buf), self._max_held), 0, -1):
            tail = buf[-length:]
            if any(stop.startswith(tail) for stop in self.stops):
                return length
        return 0
