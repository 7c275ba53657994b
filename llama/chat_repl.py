"""The terminal chat loop: read a line, answer it within the conversation so far, repeat.

Lines starting with `/` are commands: `/reset` forgets the conversation (the system message stays),
`/system TEXT` sets the system message and starts over (`/system` alone removes it), `/exit` ends.
Ctrl-C while an answer is printed stops that answer (it is not kept in the conversation); Ctrl-D or
the end of standard input ends the chat.
"""

import sys
from typing import Callable, Iterator, List, Optional, TextIO

from llama.prompts import Dialog, Message

HELP = "commands: /reset, /system TEXT, /exit"

# Streams the answer to a dialog as text pieces; closing the iterator early stops the generation.
AnswerStream = Callable[[Dialog], Iterator[str]]
# The next line typed, or None at the end of the input.
LineReader = Callable[[], Optional[str]]


class ChatSession:
    """One conversation: an optional system message and the turns so far."""

    def __init__(self, answer: AnswerStream, turn_format: bool = False, system: Optional[str] = None):
        self.answer = answer
        self.turn_format = turn_format  # 70B Instruct: replies carry a destination
        self.system = system
        self.turns: List[Message] = []

    def dialog(self, user_text: str) -> Dialog:
        """The conversation so far plus a new user message, ready to be answered."""
        head: Dialog = [] if not self.system else [{"role": "system", "content": self.system}]
        return head + self.turns + [{"role": "user", "content": user_text}]

    def reset(self) -> None:
        """Forget the turns so far (the system message stays)."""
        self.turns = []

    def ask(self, user_text: str, out: TextIO) -> Optional[str]:
        """Stream the answer to `user_text` to `out` and keep the turn; on Ctrl-C stop the answer,
        keep nothing and return None.

        Raises:
            ValueError: if the dialog cannot be answered (e.g. longer than max_seq_len); the
                conversation is unchanged.
        """
        stream = self.answer(self.dialog(user_text))
        pieces = []
        try:
            for piece in stream:
                pieces.append(piece)
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            close = getattr(stream, "close", None)
            if close is not None:  # a generator: stops the generation it drives
                close()
            out.write("\n")
            out.flush()
            return None
        out.write("\n")
        out.flush()
        reply: Message = {"role": "assistant", "content": "".join(pieces)}
        if self.turn_format:
            reply["destination"] = "user"
        self.turns += [{"role": "user", "content": user_text}, reply]
        return reply["content"]


def run_chat(
    session: ChatSession, read_line: LineReader, out: Optional[TextIO] = None, err: Optional[TextIO] = None
) -> None:
    """Answer lines from `read_line` until `/exit` or the end of input (see the module docstring);
    answers go to `out` (default stdout), notes to `err` (default stderr)."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    while True:
        line = read_line()
        if line is None:
            return
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command, _, argument = text.partition(" ")
            if command in ("/exit", "/quit"):
                return
            if command == "/reset":
                session.reset()
                print("(conversation reset)", file=err)
            elif command == "/system":
                session.system = argument.strip() or None
                session.reset()
                print("(system message set; conversation restarted)", file=err)
            else:
                print(f"unknown command {command}: {HELP}", file=err)
            continue
        try:
            if session.ask(text, out) is None:
                print("(answer stopped)", file=err)
        except ValueError as error:
            print(f"error: {error}", file=err)
