"""STAND-IN (replaced by the real module)."""

from typing import List, Sequence, Tuple


class IncrementalDetokenizer:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: List[int] = []
        self.sent = ""

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode_infilling(self.ids)
        if text.endswith("\ufffd"):
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta

    def flush(self) -> str:
        text = self.tokenizer.decode_infilling(self.ids)
        delta, self.sent = text[len(self.sent) :], text
        return delta


class StopMatcher:
    def __init__(self, stops: Sequence[str], include_stop: bool = False) -> None:
        self.stops = list(stops)
        self.include_stop = include_stop
        self.held = ""

    def feed(self, text: str) -> Tuple[str, bool]:
        buf = self.held + text
        for stop in self.stops:
            at = buf.find(stop)
            if at >= 0:
                self.held = ""
                return buf[: at + (len(stop) if self.include_stop else 0)], True
        keep = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(buf)), 0, -1):
                if buf.endswith(stop[:n]):
                    keep = max(keep, n)
                    break
        self.held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held
