"""Which keys each query token attends to when prompts are prefilled, as a grid of tokens.

The grid is built from the model's own layout code (`llama.model.pack_segments`, the layout of a
packed prefill, and `llama.model.causal_visibility`, the mask its attention applies to each
segment), so it shows what the engine computes: rows are query tokens, columns key tokens, and a
prompt packed next to others sees only its own tokens.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence

import torch

from llama.model import causal_visibility, pack_segments
from llama.tokenizer import Tokenizer

VISIBLE, HIDDEN = "■", "⬚"


@dataclass
class MaskGrid:
    """The attention mask of one packed prefill."""

    pieces: List[str]  # the token pieces of the chunk, prompt after prompt
    prompt_of: List[int]  # which prompt each token belongs to
    visible: torch.Tensor  # [tokens, tokens] bool: query row sees key column


def packed_mask(prompts: Sequence[Sequence[int]]) -> torch.Tensor:
    """[T, T] bool mask of `prompts` prefilled together in one pass (T = their total length):
    entry (i, j) says whether chunk token i attends to chunk token j.

    Raises:
        ValueError: if there is no prompt or a prompt is empty.
    """
    lengths = [len(p) for p in prompts]
    if not lengths or min(lengths) < 1:
        raise ValueError("the mask needs at least one prompt, each with at least one token")
    total = sum(lengths)
    mask = torch.zeros(total, total, dtype=torch.bool)
    # Each prompt from position 0 of its own cache row, as a batch's prefill lays them out.
    for seg in pack_segments([(row, 0, n) for row, n in enumerate(lengths)]):
        keys = seg.start + seg.length
        seen = causal_visibility(seg.length, keys, seg.start)
        # In a prefill the row's cache positions 0.. hold this segment's own tokens.
        first_key = seg.offset - seg.start
        mask[seg.offset : seg.offset + seg.length, first_key : first_key + keys] = seen
    return mask


def mask_grid(tokenizer: Tokenizer, prompts: Sequence[Sequence[int]]) -> MaskGrid:
    """The mask of `prompts` (token ids) packed into one prefill, with each token's piece."""
    pieces = [tokenizer.token_piece(t) for prompt in prompts for t in prompt]
    prompt_of = [index for index, prompt in enumerate(prompts) for _ in prompt]
    return MaskGrid(pieces, prompt_of, packed_mask(prompts))


def _label(piece: str, width: int) -> str:
    shown = piece.replace("\n", "\\n").replace("\t", "\\t")
    return shown if len(shown) <= width else shown[: width - 1] + "…"


def render_text(grid: MaskGrid, label_width: int = 12) -> str:
    """The grid as lines of text: a header, then one line per query token

        `  3 p0 ▁def         │ ■ ■ ■ ■ ⬚ ⬚`

    (token index, prompt number when several are packed, piece, then one cell per key token:
    `■` attends, `⬚` masked)."""
    several = len(set(grid.prompt_of)) > 1
    n = len(grid.pieces)
    prompts = len(set(grid.prompt_of))
    what = f"{prompts} prompts packed into one prefill" if several else "one prompt"
    legend = f"rows: queries, columns: keys; {VISIBLE} attends, {HIDDEN} masked"
    lines = [f"attention mask: {what}, {n} tokens ({legend})"]
    prefix_width = 4 + 1 + (4 if several else 0) + label_width
    digits = " ".join(str(j % 10) for j in range(n))
    lines.append(" " * prefix_width + " │ " + digits)
    for i, piece in enumerate(grid.pieces):
        tag = f"p{grid.prompt_of[i]:<2} " if several else ""
        cells = " ".join(VISIBLE if seen else HIDDEN for seen in grid.visible[i].tolist())
        lines.append(f"{i:>4} {tag}{_label(piece, label_width):<{label_width}} │ {cells}")
    return "\n".join(lines)


CELL_PX = 16
LABEL_PX = 120


def write_png(grid: MaskGrid, path: Path) -> None:
    """Draw the grid as a PNG image (Pillow, or matplotlib if Pillow is missing): `CELL_PX`-pixel
    cells after a `LABEL_PX` margin on the left and the top holding the pieces; attended cells dark,
    masked cells light.

    Raises:
        ValueError: if neither Pillow nor matplotlib is installed.
    """
    try:
        from PIL import Image, ImageDraw
    except ImportError:
        return _write_png_matplotlib(grid, path)
    n = len(grid.pieces)
    size = LABEL_PX + n * CELL_PX
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    for i, piece in enumerate(grid.pieces):
        # The default bitmap font has no "▁" (SentencePiece's space): draw it as "_".
        draw.text((2, LABEL_PX + i * CELL_PX + 2), _label(piece.replace("▁", "_"), 14), fill="black")
        draw.text((LABEL_PX + i * CELL_PX + 2, LABEL_PX - 14), str(i % 100), fill="black")
        for j, seen in enumerate(grid.visible[i].tolist()):
            x, y = LABEL_PX + j * CELL_PX, LABEL_PX + i * CELL_PX
            colour = (40, 90, 200) if seen else (235, 235, 235)
            draw.rectangle([x + 1, y + 1, x + CELL_PX - 2, y + CELL_PX - 2], fill=colour)
    image.save(path, format="PNG")


def _write_png_matplotlib(grid: MaskGrid, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ValueError(
            "--png needs Pillow or matplotlib: pip install 'codellama[mask]' (or pillow)"
        ) from err
    n = len(grid.pieces)
    figure, axes = plt.subplots(figsize=(2 + n * 0.3, 2 + n * 0.3))
    axes.imshow(grid.visible.numpy(), cmap="Blues", vmin=0, vmax=1.3)
    labels = [_label(p, 14) for p in grid.pieces]
    axes.set_xticks(range(n), labels, rotation=90)
    axes.set_yticks(range(n), labels)
    axes.set_xlabel("key token")
    axes.set_ylabel("query token")
    figure.tight_layout()
    figure.savefig(path, format="png")
    plt.close(figure)
